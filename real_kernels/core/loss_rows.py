"""The per-row half of loss mode: the caller's loss on one chunk, and its derivatives.

``judge_loss`` (docs/design.md, "Loss mode") forms the gradient during the
forward.  For a chunk of rows the fused pass gives a handful of per-row
statistics of the logits ``z = h W^T / tau``: ``lse``, the target logit, the m
score-token logits and the entropy.  Every output of the head is a function of
those alone, so the caller's ``loss_fn`` is run by autograd on these small
tensors, and its derivatives become the coefficients of ``dlogits``:

    dz_v = p_v (g_lse - g_H (log p_v + H)) + g_t 1[v = y] + sum_j g_j 1[v = k_j]

(``g_lse``, ``g_t``, ``g_j``, ``g_H``: derivatives of the loss w.r.t. lse, the
target logit, the score logits and the entropy).  Everything here is O(rows m);
the O(rows V) work is the backends' (``loss_torch.py``, ``ops/chunk_pass.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .outputs import JudgeHeadOutput
from .reference import score_epilogue
from .validation import HeadArgs

LossFn = Callable[[JudgeHeadOutput, slice], torch.Tensor]


@dataclass
class ChunkStats:
    """Per-row statistics of a chunk's logits ``z = raw / tau`` (all fp32)."""

    lse: torch.Tensor  # [C]
    special: torch.Tensor  # [C, 1 + m], z at ``special_columns``: the target (any value on ignored rows), the score ids
    entropy: Optional[torch.Tensor]  # [C] or None

    @property
    def target_logit(self) -> torch.Tensor:
        return self.special[:, 0]

    @property
    def score_logit(self) -> torch.Tensor:
        return self.special[:, 1:]


@dataclass
class RowCoefficients:
    """``d loss / d raw_v = p_v (dense - ent * log p_v) + target 1[v = y] + sum_j score_j 1[v = k_j]``.

    All already multiplied by ``1 / tau`` (``z = raw / tau``), fp32.
    """

    dense: torch.Tensor  # [C]
    ent: Optional[torch.Tensor]  # [C] or None when the loss does not use the entropy
    target: torch.Tensor  # [C], 0 on ignored rows
    score: torch.Tensor  # [C, m]


def check_scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar (0-dim) tensor, got {got}")
    return loss


def clamp_max_zero(x: torch.Tensor) -> torch.Tensor:
    """min(x, 0) in value (log-probs never come out > 0), identity in gradient, NaN kept."""
    return x - (x - x.clamp_max(0.0)).detach()


def clamp_min_zero(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) in value (an entropy never comes out < 0), identity in gradient, NaN kept."""
    return x - (x - x.clamp_min(0.0)).detach()


def special_columns(targets: torch.Tensor, score_ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[C, 1 + m]`` vocabulary columns whose dlogits carry a delta: the target, then the score ids.

    An ignored target points at column 0, whose delta is then 0 (see ``special_values``).
    """
    safe_t = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
    return torch.cat([safe_t[:, None], score_ids[None, :].expand(targets.shape[0], -1)], dim=1)


def chunk_loss(stats: ChunkStats, args: HeadArgs, rows: slice, loss_fn: LossFn
               ) -> Tuple[torch.Tensor, JudgeHeadOutput, RowCoefficients]:
    """Run ``loss_fn`` on the chunk's outputs; return (loss value, detached outputs, dlogits coefficients)."""
    inv_temp = 1.0 / args.temperature
    targets = args.targets[rows]
    with torch.enable_grad():
        lse = stats.lse.detach().requires_grad_(True)
        tgt = stats.target_logit.detach().requires_grad_(True)
        sco = stats.score_logit.detach().requires_grad_(True)
        leaves = [lse, tgt, sco]
        entropy = None
        if stats.entropy is not None:
            ent_leaf = stats.entropy.detach().requires_grad_(True)
            leaves.append(ent_leaf)
            entropy = clamp_min_zero(ent_leaf)
        valid = targets != args.ignore_index
        logprobs = torch.where(valid, clamp_max_zero(tgt - lse), torch.zeros_like(lse))
        score_logp = clamp_max_zero(sco - lse[:, None])
        score_targets = None if args.score_targets is None else args.score_targets[rows]
        score_mask = None if args.score_mask is None else args.score_mask[rows]
        score_logp, expected, sq_error = score_epilogue(score_logp, args.score_values, score_targets,
                                                        score_mask, args.normalize)
        out = JudgeHeadOutput(logprobs, score_logp, expected, sq_error, entropy)
        loss = check_scalar(loss_fn(out, rows))
        grads = [None] * len(leaves)
        if loss.requires_grad:
            grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
    g_lse, g_t, g_s = (g if g is not None else torch.zeros_like(x) for g, x in zip(grads[:3], leaves[:3]))
    g_e = grads[3] if len(grads) > 3 else None
    dense = g_lse if g_e is None else g_lse - g_e * stats.entropy
    coefs = RowCoefficients(
        dense=dense * inv_temp,
        ent=None if g_e is None else g_e * inv_temp,
        target=torch.where(valid, g_t, torch.zeros_like(g_t)) * inv_temp,
        score=g_s * inv_temp,
    )
    detached = JudgeHeadOutput(*(None if t is None else t.detach() for t in
                                 (logprobs, score_logp, expected, sq_error, entropy)))
    return loss.detach().float(), detached, coefs


def special_values(z_special: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor,
                   coefs: RowCoefficients) -> torch.Tensor:
    """dlogits at the special columns (``z_special = raw / tau`` there), in fp32: the dense term plus
    every delta landing there.

    A target that is also a score id gets both deltas in both of its entries,
    so that writing the entries in any order leaves the same value.
    """
    logp = z_special.float() - lse[:, None]
    factor = coefs.dense[:, None] if coefs.ent is None else coefs.dense[:, None] - coefs.ent[:, None] * logp
    deltas = torch.cat([coefs.target[:, None], coefs.score], dim=1)  # [C, 1 + m]
    same = (cols[:, :, None] == cols[:, None, :]).to(deltas.dtype)
    return logp.exp() * factor + torch.bmm(same, deltas[:, :, None]).squeeze(-1)
