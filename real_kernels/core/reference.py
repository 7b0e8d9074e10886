"""The readable statement of the math (docs/design.md sections 1-2).

Materialises the full ``[N, V]`` logits in ``compute_dtype`` (fp32 by default,
fp64 in the precision tests) and lets autograd do the backward.  Every fast path
is tested against this file; keep it the simplest correct code, not a fast one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    score_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-row log p(target), full-vocabulary log pi(k_j) and entropy."""
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = logp_all.gather(1, safe_targets[:, None]).squeeze(1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    score_logp = logp_all[:, score_ids]  # [N, m]
    entropy = -(logp_all.exp() * logp_all).sum(-1) if return_entropy else None
    return logprobs, score_logp, entropy


def score_epilogue(
    score_logp: torch.Tensor,
    score_values: torch.Tensor,
    score_targets: Optional[torch.Tensor],
    score_mask: Optional[torch.Tensor],
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O(N m) tail: optional renormalisation over K, expected score, squared error."""
    if normalize:
        score_logp = torch.log_softmax(score_logp, dim=-1)
    expected = score_logp.exp() @ score_values.to(score_logp.dtype)
    if score_targets is None:
        sq_error = torch.zeros_like(expected)
    else:
        y = score_targets.to(expected.dtype)
        if score_mask is not None:
            # zero the excluded targets before the subtraction, not only the result: a NaN target on an
            # excluded row would otherwise reach dW through where's backward (0 * NaN = NaN)
            y = torch.where(score_mask, y, torch.zeros_like(y))
        sq_error = (expected - y) ** 2
        if score_mask is not None:
            sq_error = torch.where(score_mask, sq_error, torch.zeros_like(sq_error))
    return score_logp, expected, sq_error


def judge_head(
    hidden, weight, targets, score_ids, score_values, *,
    score_targets=None, score_mask=None, normalize=False, temperature=1.0,
    ignore_index=-100, return_entropy=False, compute_dtype=torch.float32,
):
    """Reference judge head; returns (logprobs, score_logprobs, expected, sq_error, entropy)."""
    logprobs, score_logp, entropy = head_logprobs(
        hidden, weight, targets, score_ids, temperature=temperature,
        ignore_index=ignore_index, return_entropy=return_entropy, compute_dtype=compute_dtype,
    )
    score_logp, expected, sq_error = score_epilogue(score_logp, score_values, score_targets, score_mask, normalize)
    return logprobs, score_logp, expected, sq_error, entropy
