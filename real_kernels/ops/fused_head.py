"""Autograd wrapper of the Triton judge head.

Forward: the partial pass over vocabulary splits (block sizes autotuned on
CUDA, ``head_config.py``), then the combine + epilogue kernel; O(N * (splits +
m)) extra memory, never ``[N, V]``.  Backward: the score-epilogue gradient
kernel, then ``recompute_backward`` (logits again in chunks through cuBLAS,
dlogits in place, two GEMMs: no atomics, deterministic), whose extra memory is
one ``[chunk, V]`` buffer plus the fp32 ``dW``.  The launches themselves are
built in ``head_launches.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .chunk_plan import default_chunk_size
from ..validation import HeadArgs, first_order_only, unit_column_stride
from .head_config import BlockConfig, default_config, tuned_config
from .head_launches import forward_launches, score_grad_launch
from .recompute_backward import recompute_backward

__all__ = ["BlockConfig", "default_config", "judge_head", "TritonHead"]


class TritonHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                normalize, temperature, ignore_index, return_entropy, cfg):
        # the kernels take row strides: a weight view (tied embeddings, a column slice) is not copied
        hidden = unit_column_stride(hidden)
        weight = unit_column_stride(weight)
        n, d = hidden.shape
        v, m = weight.shape[0], score_ids.numel()

        def launches(c: BlockConfig):
            return forward_launches(hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                                    normalize, temperature, ignore_index, return_entropy, c)

        if cfg is None:
            cfg = tuned_config(n, d, v, hidden.dtype, hidden.device, lambda c: launches(c)[0]())
        partial, combine, out = launches(cfg)
        partial()
        combine()

        ctx.save_for_backward(hidden, weight, targets, score_ids, score_values, score_targets, out.mask_u8,
                              out.entropy, out.slogp, out.yhat)
        ctx.cfg, ctx.temperature, ctx.ignore_index = cfg, temperature, ignore_index
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
        chunk = ctx.cfg.chunk_rows or default_chunk_size(n, v, hidden.device)
        dh, dw = recompute_backward(
            hidden, weight, targets, score_ids, entropy if has_gent else None, coef, g_raw,
            g_logp, g_ent if has_gent else None, ctx.temperature, ctx.ignore_index,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], chunk,
        )
        return dh, dw, None, None, None, None, None, None, None, None, None, None


def judge_head(args: HeadArgs, cfg: Optional[BlockConfig] = None):
    """Run the Triton head on validated arguments; returns the five outputs.

    ``cfg=None``: the default configuration under the interpreter, the autotuned one on CUDA.
    """
    logp, slogp, yhat, sq, entropy = TritonHead.apply(
        args.hidden, args.weight, args.targets, args.score_ids, args.score_values,
        args.score_targets, args.score_mask, args.normalize, args.temperature,
        args.ignore_index, args.return_entropy, cfg,
    )
    return logp, slogp, yhat, sq, (entropy if args.return_entropy else None)
