"""Autograd wrapper and launch configuration of the Triton judge head.

Forward: partial pass over vocabulary splits, then the combine + epilogue
kernel; O(N * (splits + m)) extra memory, never ``[N, V]``.  Backward: the
score-epilogue gradient kernel, then ``recompute_backward`` (logits again in
chunks through cuBLAS, dlogits in place, two GEMMs: no atomics, deterministic),
whose extra memory is one ``[chunk, V]`` buffer plus the fp32 ``dW``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from ..validation import HeadArgs, first_order_only, unit_column_stride
from ..loss import default_chunk_size
from .recompute_backward import recompute_backward
from .forward import head_forward_combine_kernel, head_forward_partial_kernel
from .score_grad import score_grad_kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class BlockConfig:
    block_n: int
    block_v: int
    block_d: int
    vocab_splits: Optional[int] = None  # None: enough splits to fill the device
    num_warps: int = 8
    num_stages: int = 2
    chunk_rows: Optional[int] = None  # backward: rows of logits recomputed at a time (None: default_chunk_size)


def default_config(n: int, d: int, device: torch.device) -> BlockConfig:
    if _interpreting() or device.type != "cuda":
        # the interpreter runs programs one after another on numpy: few, large programs are fastest
        return BlockConfig(block_n=64, block_v=256, block_d=min(128, max(16, triton.next_power_of_2(d))), vocab_splits=1)
    block_n = 64 if n <= 4096 else 128
    return BlockConfig(block_n=block_n, block_v=128, block_d=64)


def _vocab_split(n: int, v: int, cfg: BlockConfig, device: torch.device) -> Tuple[int, int]:
    """(tiles per split, number of splits): every split starts inside the vocabulary."""
    tiles = triton.cdiv(v, cfg.block_v)
    if cfg.vocab_splits is not None:
        splits = max(1, min(cfg.vocab_splits, tiles))
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        row_blocks = triton.cdiv(n, cfg.block_n)
        splits = max(1, min(tiles, triton.cdiv(2 * sms, row_blocks)))
    per_split = triton.cdiv(tiles, splits)
    return per_split, triton.cdiv(tiles, per_split)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would cost ~1e-3 relative error)
    return "ieee" if dtype == torch.float32 else "tf32"


class TritonHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                normalize, temperature, ignore_index, return_entropy, cfg):
        # the kernels take row strides: a weight view (tied embeddings, a column slice) is not copied
        hidden = unit_column_stride(hidden)
        weight = unit_column_stride(weight)
        n, d = hidden.shape
        v, m = weight.shape[0], score_ids.numel()
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        m_pad = max(16, triton.next_power_of_2(max(m, 1)))
        tiles_per_split, n_splits = _vocab_split(n, v, cfg, dev)
        upcast = _interpreting() or hidden.dtype == torch.float32
        has_scores = m > 0

        part_max = torch.empty(n_splits, n, **f32)
        part_sum = torch.empty(n_splits, n, **f32)
        part_ent = torch.empty(n_splits, n, **f32) if return_entropy else part_sum
        part_tgt = torch.empty(n_splits, n, **f32)
        part_score = torch.empty(n_splits, n, max(m, 1), **f32)
        grid = (triton.cdiv(n, cfg.block_n), n_splits)
        head_forward_partial_kernel[grid](
            hidden, weight, targets, score_ids,
            part_max, part_sum, part_ent, part_tgt, part_score,
            n, v, d, m, tiles_per_split, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, M_PAD=m_pad,
            HAS_SCORES=has_scores, RETURN_ENTROPY=return_entropy, UPCAST=upcast,
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

        lse = torch.empty(n, **f32)
        logp = torch.empty(n, **f32)
        entropy = torch.empty(n if return_entropy else 0, **f32)
        slogp = torch.empty(n, m, **f32)
        yhat = torch.zeros(n, **f32)
        sq = torch.zeros(n, **f32)
        mask_u8 = score_mask.to(torch.uint8) if score_mask is not None else None
        block_rows = 64
        head_forward_combine_kernel[(triton.cdiv(n, block_rows),)](
            part_max, part_sum, part_ent, part_tgt, part_score,
            targets, score_values, score_targets if score_targets is not None else lse,
            mask_u8 if mask_u8 is not None else targets,
            lse, logp, entropy if return_entropy else lse, slogp, yhat, sq,
            n, m, n_splits, ignore_index,
            BLOCK_N=block_rows, M_PAD=m_pad, HAS_SCORES=has_scores, RETURN_ENTROPY=return_entropy,
            NORMALIZE=normalize, HAS_YTGT=score_targets is not None, HAS_YMASK=mask_u8 is not None,
        )

        ctx.save_for_backward(hidden, weight, targets, score_ids, score_values, score_targets, mask_u8,
                              lse, entropy, slogp, yhat)
        ctx.cfg, ctx.temperature, ctx.ignore_index = cfg, temperature, ignore_index
        ctx.normalize, ctx.return_entropy, ctx.m_pad = normalize, return_entropy, m_pad
        non_diff = [t for t, used in ((slogp, has_scores), (yhat, has_scores), (sq, has_scores),
                                      (entropy, return_entropy)) if not used]
        ctx.mark_non_differentiable(*non_diff)
        return logp, slogp, yhat, sq, entropy

    @staticmethod
    def backward(ctx, g_logp, g_slogp, g_yhat, g_sq, g_ent):
        first_order_only("triton")
        (hidden, weight, targets, score_ids, score_values, score_targets, mask_u8,
         lse, entropy, slogp, yhat) = ctx.saved_tensors
        cfg = ctx.cfg
        n = hidden.shape[0]
        v, m = weight.shape[0], score_ids.numel()
        dev = hidden.device
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_scores = m > 0
        has_gent = ctx.return_entropy and g_ent is not None

        coef = torch.empty(n, dtype=torch.float32, device=dev)
        g_raw = torch.empty(n, m, dtype=torch.float32, device=dev)
        dummy = lse
        block_rows = 64
        score_grad_kernel[(triton.cdiv(n, block_rows),)](
            targets, g_logp.contiguous() if g_logp is not None else dummy,
            slogp, yhat, score_values,
            score_targets if score_targets is not None else dummy,
            mask_u8 if mask_u8 is not None else targets,
            g_slogp.contiguous() if g_slogp is not None else dummy,
            g_yhat.contiguous() if g_yhat is not None else dummy,
            g_sq.contiguous() if g_sq is not None else dummy,
            g_raw, coef, n, m, ctx.ignore_index,
            BLOCK_N=block_rows, M_PAD=ctx.m_pad, HAS_SCORES=has_scores, NORMALIZE=ctx.normalize,
            HAS_YTGT=score_targets is not None, HAS_YMASK=mask_u8 is not None,
            HAS_GLOGP=g_logp is not None, HAS_GSLOGP=g_slogp is not None and has_scores,
            HAS_GYHAT=g_yhat is not None and has_scores, HAS_GSQ=g_sq is not None and has_scores,
        )

        chunk = cfg.chunk_rows or default_chunk_size(n, v, dev)
        dh, dw = recompute_backward(
            hidden, weight, targets, score_ids, entropy if has_gent else None, coef, g_raw,
            g_logp, g_ent if has_gent else None, ctx.temperature, ctx.ignore_index, need_dh, need_dw, chunk,
        )
        return dh, dw, None, None, None, None, None, None, None, None, None, None


def judge_head(args: HeadArgs, cfg: Optional[BlockConfig] = None):
    """Run the Triton head on validated arguments; returns the five outputs."""
    n, d = args.hidden.shape
    cfg = cfg or default_config(n, d, args.hidden.device)
    logp, slogp, yhat, sq, entropy = TritonHead.apply(
        args.hidden, args.weight, args.targets, args.score_ids, args.score_values,
        args.score_targets, args.score_mask, args.normalize, args.temperature,
        args.ignore_index, args.return_entropy, cfg,
    )
    return logp, slogp, yhat, sq, (entropy if args.return_entropy else None)
