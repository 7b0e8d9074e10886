"""``judge_loss``: the judge head in loss mode, gradients formed during the forward (6NHV).

``judge_head`` keeps O(N) memory for any upstream gradient, at the price of
computing the logits twice (forward, then again in backward: 8NHV).  When the
caller's loss is a sum of per-row terms known at forward time (every
REAL-family loss is), the gradient can be formed while the logits are at hand:
per chunk of rows, one GEMM for the logits over the whole vocabulary, one
fused pass for the statistics, the caller's loss and its per-row derivatives on
small tensors (``loss_rows.py``), dlogits written over the logits, then
``dh = dlogits W`` and ``dW += dlogits^T h`` by the BLAS: three GEMMs, no
atomics, deterministic (docs/design.md, "Loss mode").

The result is a scalar whose ``backward()`` hands back the stored gradients
(scaled by the incoming gradient); nothing is recomputed.  Tensors that
``loss_fn`` closes over (advantages, old or reference log-probs) are constants.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple, Union

import torch

from .core import reference
from .core.grad_gemms import GradBuffers
from .core.loss_rows import LossFn, check_scalar, chunk_loss, special_columns
from .loss_torch import TorchChunkPass
from .core.sizing import default_chunk_size, plan_chunks
from .core.outputs import JudgeHeadOutput
from .core.validation import HeadArgs, first_order_only, resolve_backend, validate_head_args

__all__ = ["judge_loss", "default_chunk_size", "plan_chunks", "PHASES"]

# the phases of loss mode's loop, as a phase timer sees them (benchmarks/loss_phases.py)
PHASES = ("logits GEMM", "stats pass", "loss_fn", "dlogits pass", "dh GEMM", "dW GEMM", "accumulation")
PhaseTimer = Callable[[str], ContextManager]
_UNTIMED = contextlib.nullcontext()


def _untimed(phase: str) -> ContextManager:
    return _UNTIMED


def _make_pass(backend: str, chunk: int, args: HeadArgs):
    vocab, device = args.weight.shape[0], args.hidden.device
    if backend == "torch":
        return TorchChunkPass(chunk, vocab, device, args.return_entropy)
    if not args.hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton "
            "to run the kernels on the CPU interpreter; use backend='torch' on the CPU"
        )
    from .ops.chunk_pass import TritonChunkPass  # here, not at the top: triton is optional (CPU torch builds lack it)

    return TritonChunkPass(chunk, vocab, device, args.return_entropy, args.hidden.dtype)


class _Run:
    """One judge_loss call: its arguments and chunk plan, then its results once the forward ran."""

    def __init__(self, args: HeadArgs, loss_fn: LossFn, plan: List[slice], backend: str):
        self.args, self.loss_fn, self.plan, self.backend = args, loss_fn, plan, backend
        self.outputs: Optional[JudgeHeadOutput] = None
        self.grad_enabled = torch.is_grad_enabled()  # the caller's mode (autograd turns it off inside forward)

    def execute(self, need_dh: bool, need_dw: bool, phase: Optional[PhaseTimer] = None):
        """(loss, dh, dW); ``phase(name)``, when given, is entered around each of ``PHASES`` per chunk."""
        phase = phase or _untimed
        args = self.args
        inv_temp = 1.0 / args.temperature
        chunk_pass = _make_pass(self.backend, max(r.stop - r.start for r in self.plan), args)
        grads = GradBuffers(args.hidden, args.weight, chunk_pass.compute_dtype, need_dh, need_dw)
        w_t = grads.w.T
        total = torch.zeros((), dtype=torch.float32, device=args.hidden.device)
        pieces: List[JudgeHeadOutput] = []
        for i, rows in enumerate(self.plan):
            h_c = grads.h[rows]
            with phase("logits GEMM"):
                z = chunk_pass.logits(h_c, w_t)
            with phase("stats pass"):
                cols = special_columns(args.targets[rows], args.score_ids, args.ignore_index)
                stats = chunk_pass.stats(z, cols, inv_temp, args.return_entropy)
            with phase("loss_fn"):
                loss_c, out_c, coefs = chunk_loss(stats, args, rows, self.loss_fn)
            with phase("accumulation"):
                total += loss_c
                pieces.append(out_c)
            if need_dh or need_dw:
                with phase("dlogits pass"):
                    dz = chunk_pass.dlogits_(z, stats, coefs, cols, inv_temp)
                with phase("dh GEMM"):
                    grads.add_dh(dz, rows)
                with phase("dW GEMM"):
                    grads.add_dw(dz, rows, first=i == 0)
        with phase("accumulation"):
            self.outputs = _concat(pieces, args.return_entropy)
            result = (total,) + grads.finish(args.hidden.dtype, args.weight.dtype)
        return result


def _concat(pieces: List[JudgeHeadOutput], entropy: bool) -> JudgeHeadOutput:
    return JudgeHeadOutput(
        logprobs=torch.cat([p.logprobs for p in pieces]),
        score_logprobs=torch.cat([p.score_logprobs for p in pieces]),
        expected_score=torch.cat([p.expected_score for p in pieces]),
        sq_error=torch.cat([p.sq_error for p in pieces]),
        entropy=torch.cat([p.entropy for p in pieces]) if entropy else None,
    )


class _JudgeLossFunction(torch.autograd.Function):
    """(hidden, weight) -> the scalar loss; the gradients are computed in forward and kept until backward."""

    @staticmethod
    def forward(ctx, hidden, weight, run: _Run):
        grad_on = run.grad_enabled
        total, dh, dw = run.execute(grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1])
        ctx.dh, ctx.dw = dh, dw
        return total

    @staticmethod
    def backward(ctx, grad):
        first_order_only("judge_loss")
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None  # a second backward through the same loss is refused by autograd anyway
        if dh is None and dw is None:
            raise RuntimeError("judge_loss: backward ran twice through the same loss (its stored gradients "
                               "were handed out the first time); call judge_loss again")
        if not bool((grad == 1).all()):
            dh = None if dh is None else dh * grad.to(dh.dtype)
            dw = None if dw is None else dw * grad.to(dw.dtype)
        return dh, dw, None


def _reference_loss(args: HeadArgs, loss_fn: LossFn, plan: List[slice]) -> Tuple[torch.Tensor, JudgeHeadOutput]:
    """The spec: the reference head under autograd, then the caller's loss summed over the same chunks."""
    outs = reference.judge_head(
        args.hidden, args.weight, args.targets, args.score_ids, args.score_values,
        score_targets=args.score_targets, score_mask=args.score_mask, normalize=args.normalize,
        temperature=args.temperature, ignore_index=args.ignore_index, return_entropy=args.return_entropy,
    )
    full = JudgeHeadOutput(*outs)
    total = (args.hidden.sum() + args.weight[:0].sum()) * 0.0  # 0, with a graph even for N = 0
    for rows in plan:
        loss = check_scalar(loss_fn(JudgeHeadOutput(*(None if t is None else t[rows] for t in outs)), rows))
        total = total + loss.float()
    detached = JudgeHeadOutput(*(None if t is None else t.detach() for t in
                                 (full.logprobs, full.score_logprobs, full.expected_score, full.sq_error, full.entropy)))
    return total, detached


def judge_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[JudgeHeadOutput, slice], torch.Tensor],
    *,
    score_token_ids: Optional[Union[Sequence[int], torch.Tensor]] = None,
    score_values: Optional[Union[Sequence[float], torch.Tensor]] = None,
    score_targets: Optional[torch.Tensor] = None,
    score_mask: Optional[torch.Tensor] = None,
    normalize: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    row_groups: Optional[Sequence[int]] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, JudgeHeadOutput]:
    """A per-row loss over the judge head's outputs, with its gradient formed in the forward.

    ``loss_fn(chunk_out, rows)`` gets the head's outputs for a chunk of rows
    (a ``JudgeHeadOutput`` of differentiable tensors) and ``rows``, a slice to
    index the caller's own per-row tensors (``adv[rows]``); it returns a scalar.
    Returns ``(loss, out)``: ``loss`` is the sum over chunks, and
    ``loss.backward()`` gives ``hidden.grad`` / ``weight.grad`` equal to
    ``judge_head`` followed by the same loss under autograd; ``out`` holds the
    detached outputs for all rows.  Without ``score_token_ids`` the score
    fields are empty (``[N, 0]``) and the expected score and error are 0.
    ``chunk_size`` rows per chunk (default: ``default_chunk_size``, equal
    chunks of a multiple of 128 rows sized from the free memory); extra memory
    is one ``[chunk, V]`` logits buffer plus an fp32 ``dW``.  ``row_groups``:
    sizes of consecutive groups of rows (summing to N) that no chunk may split,
    e.g. one sequence's score row and CoT rows; whole groups are packed into
    chunks of up to the chunk size.  ``plan_chunks`` gives the chunks in advance.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(chunk_out, rows), got {type(loss_fn).__name__}")
    need_scores = score_token_ids is not None or score_values is not None
    args = validate_head_args(
        hidden, weight, targets, score_token_ids, score_values, score_targets=score_targets,
        score_mask=score_mask, normalize=normalize, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, need_scores=need_scores,
    )
    n, vocab = args.hidden.shape[0], args.weight.shape[0]
    plan = plan_chunks(n, vocab, args.hidden.device, args.hidden.dtype, row_groups=row_groups, chunk_size=chunk_size)
    name = resolve_backend(backend, args.hidden)
    device_type = args.hidden.device.type
    # fp32 statistics and outputs whatever autocast says (as judge_head); the GEMMs run in the inputs' dtype
    with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext():
        if name == "reference" or n == 0:
            return _reference_loss(args, loss_fn, plan)
        run = _Run(args, loss_fn, plan, name)
        loss = _JudgeLossFunction.apply(args.hidden, args.weight, run)
        return loss, run.outputs
