"""The Triton head's launches, built from tensors (real ones, or meta ones for the compile check).

``forward_launches`` allocates the forward's partial and output buffers on the
inputs' device and returns the two launches that fill them (``combine_launch``
alone merges partials that another pass filled: ``chunked_forward.py``); ``score_grad_launch``
does the same for the backward's O(N m) first step.  ``fused_head.py`` runs
them; ``compile_check.py`` compiles them at the benchmark shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .forward import head_forward_combine_kernel, head_forward_partial_kernel
from .head_config import BlockConfig, interpreting, sm_count, vocab_split
from .launch import Launch
from .score_grad import score_grad_kernel

COMBINE_BLOCK_ROWS = 64


def m_pad(m: int) -> int:
    return max(16, triton.next_power_of_2(max(m, 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep fp32 accuracy (plain tf32 would cost ~1e-3 relative error): exact products under
    the interpreter, tf32x3 on the GPU (the ieee path is CUDA-core FMAs that spill; see compile_check)."""
    if dtype != torch.float32:
        return "tf32"  # unused for bf16 / fp16 operands
    return "ieee" if interpreting() else "tf32x3"


@dataclass
class ForwardOutputs:
    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor  # [N], or [0] without the entropy
    slogp: torch.Tensor
    yhat: torch.Tensor
    sq: torch.Tensor
    mask_u8: Optional[torch.Tensor]


@dataclass
class ForwardPartials:
    """Per-split row statistics ``[n_splits, N]`` (``score``: ``[n_splits, N, max(m, 1)]``) that the combine merges."""

    max: torch.Tensor
    sum: torch.Tensor
    ent: torch.Tensor  # ``sum`` itself without the entropy (never read then)
    tgt: torch.Tensor
    score: torch.Tensor

    @property
    def n_splits(self) -> int:
        return self.max.shape[0]


def forward_partials(n_splits: int, n: int, m: int, return_entropy: bool, device) -> ForwardPartials:
    f32 = dict(dtype=torch.float32, device=device)
    part_sum = torch.empty(n_splits, n, **f32)
    return ForwardPartials(
        max=torch.empty(n_splits, n, **f32), sum=part_sum,
        ent=torch.empty(n_splits, n, **f32) if return_entropy else part_sum,
        tgt=torch.empty(n_splits, n, **f32), score=torch.empty(n_splits, n, max(m, 1), **f32),
    )


def forward_launches(hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                     normalize: bool, temperature: float, ignore_index: int, return_entropy: bool,
                     cfg: BlockConfig):
    """(partial launch, combine launch, outputs)."""
    n, d = hidden.shape
    v, m = weight.shape[0], score_ids.numel()
    tiles_per_split, n_splits = vocab_split(n, v, cfg, sm_count(hidden.device))
    row_blocks = triton.cdiv(n, cfg.block_n)
    parts = forward_partials(n_splits, n, m, return_entropy, hidden.device)
    partial = Launch(
        "forward_partial", head_forward_partial_kernel, (row_blocks * n_splits,),
        dict(h_ptr=hidden, w_ptr=weight, tgt_ptr=targets, sid_ptr=score_ids, part_max_ptr=parts.max,
             part_sum_ptr=parts.sum, part_ent_ptr=parts.ent, part_tgt_ptr=parts.tgt, part_score_ptr=parts.score,
             N=n, V=v, D=d, M=m, tiles_per_split=tiles_per_split, row_blocks=row_blocks, n_splits=n_splits,
             stride_hn=hidden.stride(0), stride_wv=weight.stride(0), inv_temp=1.0 / temperature),
        dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, M_PAD=m_pad(m), GROUP_N=cfg.group_n,
             HAS_SCORES=m > 0, RETURN_ENTROPY=return_entropy,
             UPCAST=interpreting() or hidden.dtype == torch.float32, DOT_PRECISION=dot_precision(hidden.dtype)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    combine, out = combine_launch(parts, targets, score_values, score_targets, score_mask, normalize,
                                  ignore_index, return_entropy)
    return partial, combine, out


def combine_launch(parts: ForwardPartials, targets, score_values, score_targets, score_mask, normalize: bool,
                   ignore_index: int, return_entropy: bool):
    """(launch, outputs): merge the splits, then the O(N m) score epilogue."""
    n_splits, n = parts.max.shape
    m = score_values.numel()
    dev = parts.max.device
    f32 = dict(dtype=torch.float32, device=dev)
    pad = m_pad(m)
    has_scores = m > 0
    out = ForwardOutputs(
        lse=torch.empty(n, **f32), logp=torch.empty(n, **f32), entropy=torch.empty(n if return_entropy else 0, **f32),
        slogp=torch.empty(n, m, **f32), yhat=torch.zeros(n, **f32), sq=torch.zeros(n, **f32),
        mask_u8=score_mask.to(torch.uint8) if score_mask is not None else None,
    )
    combine = Launch(
        "forward_combine", head_forward_combine_kernel, (triton.cdiv(n, COMBINE_BLOCK_ROWS),),
        dict(part_max_ptr=parts.max, part_sum_ptr=parts.sum, part_ent_ptr=parts.ent, part_tgt_ptr=parts.tgt,
             part_score_ptr=parts.score, tgt_ptr=targets, sval_ptr=score_values,
             ytgt_ptr=score_targets if score_targets is not None else out.lse,
             ymask_ptr=out.mask_u8 if out.mask_u8 is not None else targets,
             lse_ptr=out.lse, logp_ptr=out.logp, ent_ptr=out.entropy if return_entropy else out.lse,
             slogp_ptr=out.slogp, yhat_ptr=out.yhat, sq_ptr=out.sq, N=n, M=m, n_splits=n_splits,
             ignore_index=ignore_index),
        dict(BLOCK_N=COMBINE_BLOCK_ROWS, M_PAD=pad, HAS_SCORES=has_scores, RETURN_ENTROPY=return_entropy,
             NORMALIZE=normalize, HAS_YTGT=score_targets is not None, HAS_YMASK=out.mask_u8 is not None),
        num_warps=4,
    )
    return combine, out


def score_grad_launch(targets, g_logp, slogp, yhat, score_values, score_targets, mask_u8, g_slogp, g_yhat, g_sq,
                      normalize: bool, ignore_index: int):
    """(launch, g_raw [N, m], coef [N]): the per-row gradients that the vocabulary pass needs."""
    n, m = slogp.shape
    dev = slogp.device
    coef = torch.empty(n, dtype=torch.float32, device=dev)
    g_raw = torch.empty(n, m, dtype=torch.float32, device=dev)
    has_scores = m > 0
    dummy = coef

    def given(t):
        return t.contiguous() if t is not None else dummy

    launch = Launch(
        "score_grad", score_grad_kernel, (triton.cdiv(n, COMBINE_BLOCK_ROWS),),
        dict(tgt_ptr=targets, glogp_ptr=given(g_logp), slogp_ptr=slogp, yhat_ptr=yhat, sval_ptr=score_values,
             ytgt_ptr=given(score_targets), ymask_ptr=mask_u8 if mask_u8 is not None else targets,
             gslogp_ptr=given(g_slogp), gyhat_ptr=given(g_yhat), gsq_ptr=given(g_sq), graw_ptr=g_raw,
             coef_ptr=coef, N=n, M=m, ignore_index=ignore_index),
        dict(BLOCK_N=COMBINE_BLOCK_ROWS, M_PAD=m_pad(m), HAS_SCORES=has_scores, NORMALIZE=normalize,
             HAS_YTGT=score_targets is not None, HAS_YMASK=mask_u8 is not None, HAS_GLOGP=g_logp is not None,
             HAS_GSLOGP=g_slogp is not None and has_scores, HAS_GYHAT=g_yhat is not None and has_scores,
             HAS_GSQ=g_sq is not None and has_scores),
        num_warps=4,
    )
    return launch, g_raw, coef

