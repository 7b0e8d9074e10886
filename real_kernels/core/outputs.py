"""Result types returned by the public ops (docs/design.md section 4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LinearLogprobsOutput:
    logprobs: torch.Tensor  # [N] fp32, 0 where targets == ignore_index
    entropy: Optional[torch.Tensor] = None  # [N] fp32 when asked for


@dataclass(frozen=True)
class JudgeHeadOutput:
    logprobs: torch.Tensor  # [N] fp32 log p(targets)
    score_logprobs: torch.Tensor  # [N, m] fp32 log pi(k_j) (renormalised over K if normalize)
    expected_score: torch.Tensor  # [N] fp32 sum_j p_j v_j
    sq_error: torch.Tensor  # [N] fp32 (expected_score - score_targets)^2 on score_mask rows, else 0
    entropy: Optional[torch.Tensor] = None  # [N] fp32 when asked for
