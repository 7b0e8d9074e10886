"""Shared helpers of the kernel tests: build a case, run a backend, compare with fp64."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from real_kernels import judge_head
from real_kernels.core import reference
from real_kernels.ops.fused_head import BlockConfig
from real_kernels.core.validation import validate_head_args

OUTPUTS = ("logprobs", "score_logprobs", "expected_score", "sq_error", "entropy")
# small tiles under the interpreter so that every case crosses several vocabulary tiles and splits
SMALL_TILES = BlockConfig(block_n=32, block_v=128, block_d=32, vocab_splits=3, chunk_rows=16)


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    score_ids: List[int]
    score_values: List[float]
    score_targets: Optional[torch.Tensor]
    score_mask: Optional[torch.Tensor]
    normalize: bool = False
    temperature: float = 1.0
    return_entropy: bool = False
    ignore_index: int = -100
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)

    def kwargs(self):
        return dict(score_targets=self.score_targets, score_mask=self.score_mask, normalize=self.normalize,
                    temperature=self.temperature, ignore_index=self.ignore_index,
                    return_entropy=self.return_entropy)


def signed_rows(n: int, cols: Optional[int] = None, gen=None) -> torch.Tensor:
    """Upstream gradient with positive, negative, zero and mixed rows."""
    shape = (n,) if cols is None else (n, cols)
    g = torch.randn(shape, generator=gen)
    kind = torch.arange(n) % 4  # rows: 0 positive, 1 negative, 2 zero, 3 mixed signs
    g[kind == 0] = g[kind == 0].abs()
    g[kind == 1] = -g[kind == 1].abs()
    g[kind == 2] = 0.0
    return g


def make_case(n, h, v, *, dtype=torch.float32, score_ids=None, normalize=False, temperature=1.0,
              return_entropy=False, scale=1.0, seed=0, ignore_every=5, with_targets=True) -> Case:
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * scale / h ** 0.25).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * scale / h ** 0.25).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = -100
    if score_ids is None:
        score_ids = sorted({0, v - 1, min(v - 1, 127), min(v - 1, 128), v // 2})
    m = len(score_ids)
    values = [float(j + 1) for j in range(m)]
    score_targets = torch.rand(n, generator=gen) * (m - 1) + 1 if with_targets else None
    score_mask = (torch.rand(n, generator=gen) > 0.3) if with_targets else None
    case = Case(hidden, weight, targets, score_ids, values, score_targets, score_mask,
                normalize, temperature, return_entropy)
    case.grads = {
        "logprobs": signed_rows(n, gen=gen),
        "score_logprobs": signed_rows(n, m, gen=gen),
        "expected_score": signed_rows(n, gen=gen),
        "sq_error": signed_rows(n, gen=gen),
        "entropy": signed_rows(n, gen=gen),
    }
    return case


def extreme_case(n=37, h=48, v=1000, **options) -> Case:
    """Logits of magnitude ~1e4; rows 1 and 2 put all the mass on the first and the last score token."""
    case = make_case(n, h, v, **{"normalize": False, "return_entropy": True, **options})
    gen = torch.Generator().manual_seed(1)
    # logits of magnitude ~1e4: one dominant direction per row, some rows with near-ties
    w = torch.randn(v, h, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    hid = torch.randn(n, h, generator=gen)
    hid = hid / hid.norm(dim=1, keepdim=True) * 1e4
    hid[1] = w[case.score_ids[0]] * 1e4  # a row whose score token takes all the mass
    hid[2] = w[case.score_ids[-1]] * 1e4
    case.hidden, case.weight = hid, w
    return case


def _backward(outs: Dict[str, torch.Tensor], case: Case, hidden, weight):
    loss = sum((outs[k].double() * case.grads[k].double()).sum() for k in OUTPUTS if outs.get(k) is not None)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    return dh, dw


def run_backend(case: Case, backend: str, cfg: Optional[BlockConfig] = None):
    """Outputs and (dh, dW) of one backend under the case's upstream gradients."""
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    if backend == "triton" and cfg is not None:
        from real_kernels.ops import fused_head
        args = validate_head_args(hidden, weight, case.targets, case.score_ids, case.score_values, **case.kwargs())
        res = fused_head.judge_head(args, cfg)
    else:
        o = judge_head(hidden, weight, case.targets, case.score_ids, case.score_values, backend=backend, **case.kwargs())
        res = (o.logprobs, o.score_logprobs, o.expected_score, o.sq_error, o.entropy)
    outs = dict(zip(OUTPUTS, res))
    dh, dw = _backward(outs, case, hidden, weight)
    return outs, dh, dw


def run_exact(case: Case, compute_dtype=torch.float64, low_precision_naive=False):
    """The reference in fp64 (the truth), or naive in the inputs' own dtype (low_precision_naive)."""
    dtype = case.hidden.dtype if low_precision_naive else compute_dtype
    hidden = case.hidden.detach().to(dtype).requires_grad_(True)
    weight = case.weight.detach().to(dtype).requires_grad_(True)
    ids = torch.tensor(case.score_ids)
    values = torch.tensor(case.score_values, dtype=dtype)
    res = reference.judge_head(
        hidden, weight, case.targets, ids, values, compute_dtype=dtype,
        score_targets=None if case.score_targets is None else case.score_targets.to(dtype),
        score_mask=case.score_mask, normalize=case.normalize, temperature=case.temperature,
        ignore_index=case.ignore_index, return_entropy=case.return_entropy,
    )
    outs = dict(zip(OUTPUTS, res))
    dh, dw = _backward(outs, case, hidden, weight)
    return outs, dh, dw


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): an error relative to the tensor's scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if b.numel() else 0.0


def check_against(outs, dh, dw, truth, rtol, label):
    """Every output (fp32, same shape, None where the truth is None) and dh, dW within rtol of truth."""
    t_outs, t_dh, t_dw = truth
    for k in OUTPUTS:
        if t_outs[k] is None:
            assert outs[k] is None, f"{label}: {k} should be None"
            continue
        assert outs[k].dtype == torch.float32, f"{label}: {k} must be fp32"
        assert outs[k].shape == t_outs[k].shape
        err = rel_err(outs[k], t_outs[k])
        assert err <= rtol, f"{label}: {k} relative error {err:.2e} > {rtol:.0e}"
    for name, a, b in (("dh", dh, t_dh), ("dW", dw, t_dw)):
        err = rel_err(a, b)
        assert err <= rtol, f"{label}: {name} relative error {err:.2e} > {rtol:.0e}"


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any op while active.

    ``allocations_only``: skip ops whose output aliases an input (views, in-place ops, and the
    ``set_`` the Triton interpreter uses to wrap existing storage), counting only new memory.
    """

    def __init__(self, allocations_only: bool = False):
        super().__init__()
        self.largest = 0
        self.op = None
        self.allocations_only = allocations_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.allocations_only and any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out
