"""The implementations compared by the suite, behind one small interface.

Every provider computes the same two things from ``hidden [N, H]`` and
``weight [V, H]``:

- ``logprobs``: per-token ``log softmax(hidden @ weight.T)[targets]``, fp32,
  differentiable (the quantity a policy-gradient trainer needs);
- ``judge``: the full judge head of REAL (docs/design.md section 1): the CoT
  tokens' log-probs on every row, and on the few score rows the score-token
  log-probs, the expected score and its squared error.

Providers:

- ``naive``: what a plain PyTorch trainer does: ``hidden @ weight.T`` in the
  input dtype (fp32 on the CPU), ``log_softmax`` in fp32, ``gather``.
- ``torch`` / ``triton``: this library (``real_kernels``), one backend each:
  ``linear_logprobs`` / ``judge_head`` under autograd (recomputing backward);
- ``loss``: this library's loss mode, ``real_kernels.judge_loss`` with
  ``backend="auto"`` (torch on the CPU, triton on CUDA): the caller's loss is
  given to the op, which forms the gradients during its forward (3 GEMMs).
- ``liger``: Liger-Kernel's fused linear cross entropy, ``reduction="none"``.
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy``, ``reduction="none"``
  (its ``torch_compile`` implementation on the CPU, its Triton ``cce`` one on CUDA).

How the peers get the judge head (a fair composition from their own op):
a peer computes one per-token cross entropy over *all* rows, with the true
score token ``k*`` as the target of each score row (that is the token the
teacher-forced batch holds there).  Since ``CE_i = lse_i - z_{i, y_i}``, the
full-vocabulary log-sum-exp of a score row is ``lse_s = CE_s + h_s . W[k*]``:
the peer's own fused pass does the ``O(N V H)`` work, and the score-token
log-probs ``h_s . W[k_j] - lse_s`` cost one ``[B, m]`` matmul on the ``m``
score rows of ``W``.  Gradients flow through the peer's backward (which takes
any per-token upstream gradient) and through that small matmul, so a peer
pays its own fused pass plus ``O(B m H)``, with no second pass over the
vocabulary and no ``[B, V]`` logits.  The CE of the score rows is left out of
the CoT term (as ``ignore_index`` is for ours).  The test suite checks this
composition against the naive judge head, values and gradients.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

IGNORE_INDEX = -100
CPU_TRITON_REASON = "needs CUDA (the CPU interpreter is for tests, not speed)"


@dataclass
class HeadInputs:
    """One benchmark problem (built by ``workloads.make_inputs``), laid out like a teacher-forced batch.

    ``next_tokens`` is the token that follows each row, as the batch holds it:
    a CoT token, or the true score token ``k*`` on each sequence's score row.
    """

    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    next_tokens: torch.Tensor  # [N] int64, every row valid
    cot_targets: torch.Tensor  # [N] next_tokens with IGNORE_INDEX on the score rows
    score_ids: torch.Tensor  # [m] vocabulary ids of the score tokens
    score_values: torch.Tensor  # [m] fp32 their numeric values
    score_rows: torch.Tensor  # [B] row index of each sequence's score position
    score_mask: torch.Tensor  # [N] bool, True on score rows
    score_targets: torch.Tensor  # [B] fp32 ground-truth scores
    score_targets_full: torch.Tensor  # [N] fp32, score_targets on score rows, 0 elsewhere
    grad_logprobs: torch.Tensor  # [N] fp32 per-token upstream gradient (advantages)


def score_epilogue(score_logp: torch.Tensor, score_values: torch.Tensor, score_targets: torch.Tensor) -> torch.Tensor:
    """Squared error of the expected score on the score rows, from their score-token log-probs."""
    expected = score_logp.exp() @ score_values
    return (expected - score_targets) ** 2


def judge_objective(logprobs: torch.Tensor, sq_error: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The judge-head scalar every provider differentiates: per-token weighted CoT term + regression term.

    ``advantages`` are the per-token weights of ``logprobs`` (``HeadInputs.grad_logprobs``, or a slice of them).
    """
    return (advantages * logprobs).sum() + sq_error.sum()


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class Provider:
    """Interface: ``logprobs``, ``advantage_loss`` and ``judge``; ``unavailable_reason`` says why it cannot run here."""

    name = ""
    description = ""

    def unavailable_reason(self, device: str) -> Optional[str]:
        return None

    def release_caches(self) -> None:
        """Drop memory the provider keeps between calls, so that the measured call allocates (and counts) it."""

    def version(self) -> str:
        raise NotImplementedError

    def logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def advantage_loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       advantages: torch.Tensor) -> torch.Tensor:
        """``sum(advantages * logprobs)``: the policy-gradient scalar whose gradient ``logprobs-fwdbwd`` times.

        Its gradient is that of ``logprobs`` with ``advantages`` as the upstream gradient.
        """
        return (advantages * self.logprobs(hidden, weight, targets)).sum()

    def judge(self, inputs: HeadInputs) -> torch.Tensor:
        """The scalar ``judge_objective`` of this provider's judge head."""
        raise NotImplementedError


class NaiveProvider(Provider):
    name = "naive"
    description = "materialised logits in the input dtype, fp32 log_softmax, gather"

    def version(self) -> str:
        return f"torch {torch.__version__}"

    @staticmethod
    def _log_softmax(hidden, weight):
        return torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V]

    def logprobs(self, hidden, weight, targets):
        return self._log_softmax(hidden, weight).gather(1, targets[:, None]).squeeze(1)

    def judge(self, inputs):
        logp_all = self._log_softmax(inputs.hidden, inputs.weight)
        valid = inputs.cot_targets != IGNORE_INDEX
        picked = logp_all.gather(1, torch.where(valid, inputs.cot_targets, 0)[:, None]).squeeze(1)
        logprobs = torch.where(valid, picked, 0.0)
        score_logp = logp_all[inputs.score_rows][:, inputs.score_ids]
        sq_error = score_epilogue(score_logp, inputs.score_values, inputs.score_targets)
        return judge_objective(logprobs, sq_error, inputs.grad_logprobs)


class RealKernelsProvider(Provider):
    """This library, one backend."""

    def __init__(self, backend: str):
        self.name = backend
        self.backend = backend
        self.description = f"real_kernels, backend={backend!r}"

    def unavailable_reason(self, device):
        if self.backend == "triton" and device != "cuda":
            return CPU_TRITON_REASON
        if self.backend == "triton" and importlib.util.find_spec("triton") is None:
            return "not installed: pip install triton"
        return None

    def version(self):
        import real_kernels

        return f"real-kernels {real_kernels.__version__}"

    def logprobs(self, hidden, weight, targets):
        from real_kernels import linear_logprobs

        return linear_logprobs(hidden, weight, targets, backend=self.backend).logprobs

    def judge(self, inputs):
        from real_kernels import judge_head

        out = judge_head(
            inputs.hidden, inputs.weight, inputs.cot_targets, inputs.score_ids, inputs.score_values,
            score_targets=inputs.score_targets_full, score_mask=inputs.score_mask, backend=self.backend,
        )
        return judge_objective(out.logprobs, out.sq_error, inputs.grad_logprobs)


class LossProvider(Provider):
    """This library's loss mode: ``judge_loss`` with the caller's loss, gradients formed in the forward."""

    name = "loss"
    description = "real_kernels.judge_loss (loss mode, 3 GEMMs), backend='auto': torch on the CPU, triton on CUDA"

    def release_caches(self):
        from real_kernels.loss_torch import release_workspaces

        release_workspaces()  # the CPU pass keeps its logits buffer between calls: count it in the peak

    def unavailable_reason(self, device):
        if device == "cuda" and importlib.util.find_spec("triton") is None:
            return "not installed: pip install triton"
        return None

    def version(self):
        import real_kernels

        return f"real-kernels {real_kernels.__version__}"

    @staticmethod
    def _judge_loss(hidden, weight, targets, loss_fn, **kwargs):
        from real_kernels import judge_loss

        return judge_loss(hidden, weight, targets, loss_fn, backend="auto", **kwargs)

    def logprobs(self, hidden, weight, targets):
        """Detached log-probs (loss mode has no per-token upstream gradient to take later)."""
        _, out = self._judge_loss(hidden, weight, targets, lambda out, rows: out.logprobs.sum())
        return out.logprobs

    def advantage_loss(self, hidden, weight, targets, advantages):
        loss, _ = self._judge_loss(hidden, weight, targets, lambda out, rows: (advantages[rows] * out.logprobs).sum())
        return loss

    def judge(self, inputs):
        adv = inputs.grad_logprobs
        loss, _ = self._judge_loss(
            inputs.hidden, inputs.weight, inputs.cot_targets,
            lambda out, rows: judge_objective(out.logprobs, out.sq_error, adv[rows]),
            score_token_ids=inputs.score_ids, score_values=inputs.score_values,
            score_targets=inputs.score_targets_full, score_mask=inputs.score_mask,
        )
        return loss


class PeerProvider(Provider):
    """A library that offers a per-token fused linear cross entropy; the judge head is composed from it."""

    module = ""  # import name
    dist = ""  # pip distribution name

    def cross_entropy(self, hidden, weight, targets) -> torch.Tensor:
        """Per-token CE ``lse - z_target`` ``[N]``, no reduction."""
        raise NotImplementedError

    def unavailable_reason(self, device):
        if importlib.util.find_spec(self.module) is None:
            return f"not installed: pip install {self.dist}"
        return None

    def version(self):
        return f"{self.dist} {_package_version(self.dist)}"

    def logprobs(self, hidden, weight, targets):
        return -self.cross_entropy(hidden, weight, targets).float()

    def judge(self, inputs):
        ce = self.cross_entropy(inputs.hidden, inputs.weight, inputs.next_tokens).float()
        logprobs = torch.where(inputs.score_mask, 0.0, -ce)
        h_s = inputs.hidden[inputs.score_rows].float()  # [B, H]
        k_star = inputs.next_tokens[inputs.score_rows]
        lse_s = ce[inputs.score_rows] + (h_s * inputs.weight[k_star].float()).sum(-1)
        score_logp = h_s @ inputs.weight[inputs.score_ids].float().T - lse_s[:, None]  # [B, m]
        sq_error = score_epilogue(score_logp, inputs.score_values, inputs.score_targets)
        return judge_objective(logprobs, sq_error, inputs.grad_logprobs)


class LigerProvider(PeerProvider):
    name = "liger"
    description = "Liger-Kernel fused linear cross entropy, reduction='none'"
    module = "liger_kernel"
    dist = "liger-kernel"

    def unavailable_reason(self, device):
        reason = super().unavailable_reason(device)
        if reason is None and device != "cuda":
            return "needs CUDA (Liger-Kernel's fused linear cross entropy is Triton-only; no CPU path)"
        return reason

    def cross_entropy(self, hidden, weight, targets):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none")


class CCEProvider(PeerProvider):
    name = "cce"
    description = "Cut Cross-Entropy linear_cross_entropy, reduction='none' (torch_compile on CPU, cce on CUDA)"
    module = "cut_cross_entropy"
    dist = "cut-cross-entropy"

    def cross_entropy(self, hidden, weight, targets):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if hidden.is_cuda else "torch_compile"
        return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)


PROVIDERS: Dict[str, Callable[[], Provider]] = {
    "naive": NaiveProvider,
    "torch": lambda: RealKernelsProvider("torch"),
    "triton": lambda: RealKernelsProvider("triton"),
    "loss": LossProvider,
    "liger": LigerProvider,
    "cce": CCEProvider,
}


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {sorted(PROVIDERS)}")
    return PROVIDERS[name]()
