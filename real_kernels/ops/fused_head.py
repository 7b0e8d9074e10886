"""Autograd wrapper of the Triton judge head.

Forward, two ways (``memory``):

- ``"low"``: the fused partial pass over vocabulary splits (block sizes
  autotuned on CUDA, ``head_config.py``), then the combine + epilogue kernel;
  O(N * (splits + m)) extra memory, never ``[N, V]``;
- ``"high"``: loss mode's chunks (``chunked_forward.py``): cuBLAS logits into
  one fp32 ``[chunk, V]`` buffer, one statistics pass, the same combine kernel;
  faster on the GPU, the backward's memory already in the forward;
- ``"auto"`` (default): ``"high"`` on CUDA when a buffer of at least
  ``min(N, 128)`` rows fits in a quarter of the free memory
  (``chunk_plan.chunk_buffer_fits``), ``"low"`` otherwise (and on the CPU
  interpreter, where the fused kernel is what is tested).

Backward: the score-epilogue gradient
kernel, then ``recompute_backward`` (logits again in chunks through cuBLAS,
dlogits in place, two GEMMs: no atomics, deterministic), whose extra memory is
one ``[chunk, V]`` buffer plus the fp32 ``dW``.  The launches themselves are
built in ``head_launches.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.validation import HeadArgs, first_order_only, unit_column_stride
from ..core.sizing import chunk_buffer_fits, default_chunk_size, plan_chunks
from .chunked_forward import chunked_forward
from .head_config import BlockConfig, default_config, tuned_config
from .head_launches import forward_launches, score_grad_launch
from .recompute_backward import recompute_backward

__all__ = ["BlockConfig", "default_config", "judge_head", "TritonHead"]


def uses_chunks(memory: str, hidden: torch.Tensor, vocab: int) -> bool:
    """Whether the forward runs through loss mode's chunks (see the module docstring)."""
    if memory == "auto":
        return hidden.is_cuda and chunk_buffer_fits(hidden.shape[0], vocab, hidden.device)
    return memory == "high"


class TritonHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                normalize, temperature, ignore_index, return_entropy, cfg, memory):
        # the kernels take row strides: a weight view (tied embeddings, a column slice) is not copied
        hidden = unit_column_stride(hidden)
        weight = unit_column_stride(weight)
        n, d = hidden.shape
        v, m = weight.shape[0], score_ids.numel()

        def launches(c: BlockConfig):
            return forward_launches(hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                                    normalize, temperature, ignore_index, return_entropy, c)

        chunk_rows = None if cfg is None else cfg.chunk_rows
        if uses_chunks(memory, hidden, v):
            plan = plan_chunks(n, v, hidden.device, hidden.dtype, chunk_size=chunk_rows)
            out = chunked_forward(hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                                  normalize, temperature, ignore_index, return_entropy, plan)
        else:
            if cfg is None:
                cfg = tuned_config(n, d, v, hidden.dtype, hidden.device, lambda c: launches(c)[0]())
            partial, combine, out = launches(cfg)
            partial()
            combine()

        ctx.save_for_backward(hidden, weight, targets, score_ids, score_values, score_targets, out.mask_u8,
                              out.entropy, out.slogp, out.yhat)
        ctx.chunk_rows, ctx.temperature, ctx.ignore_index = chunk_rows, temperature, ignore_index
        ctx.normalize, ctx.return_entropy = normalize, return_entropy
        has_scores = m > 0
        non_diff = [t for t, used in ((out.slogp, has_scores), (out.yhat, has_scores), (out.sq, has_scores),
                                      (out.entropy, return_entropy)) if not used]
        ctx.mark_non_differentiable(*non_diff)
        return out.logp, out.slogp, out.yhat, out.sq, out.entropy

    @staticmethod
    def backward(ctx, g_logp, g_slogp, g_yhat, g_sq, g_ent):
        first_order_only("triton")
        (hidden, weight, targets, score_ids, score_values, score_targets, mask_u8,
         entropy, slogp, yhat) = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        has_gent = ctx.return_entropy and g_ent is not None
        launch, g_raw, coef = score_grad_launch(targets, g_logp, slogp, yhat, score_values, score_targets, mask_u8,
                                                g_slogp, g_yhat, g_sq, ctx.normalize, ctx.ignore_index)
        launch()
        chunk = ctx.chunk_rows or default_chunk_size(n, v, hidden.device, hidden.dtype)
        dh, dw = recompute_backward(
            hidden, weight, targets, score_ids, entropy if has_gent else None, coef, g_raw,
            g_logp, g_ent if has_gent else None, ctx.temperature, ctx.ignore_index,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], chunk,
        )
        return dh, dw, None, None, None, None, None, None, None, None, None, None, None


def judge_head(args: HeadArgs, cfg: Optional[BlockConfig] = None, memory: str = "auto"):
    """Run the Triton head on validated arguments; returns the five outputs.

    ``cfg=None``: the default configuration under the interpreter, the autotuned one on CUDA (the fused
    forward's tiles; ``cfg.chunk_rows``, when set, the rows per chunk of the chunked passes).
    ``memory``: one of ``validation.MEMORY_MODES`` (see the module docstring).
    """
    logp, slogp, yhat, sq, entropy = TritonHead.apply(
        args.hidden, args.weight, args.targets, args.score_ids, args.score_values,
        args.score_targets, args.score_mask, args.normalize, args.temperature,
        args.ignore_index, args.return_entropy, cfg, memory,
    )
    return logp, slogp, yhat, sq, (entropy if args.return_entropy else None)
