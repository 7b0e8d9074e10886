"""Rollouts grouped by prompt and the score each sample wrote: what every rollout engine returns.

Its own module so that the engines (``rollout.HFRollout``, ``vllm_rollout``'s two) share it and
``rollout.make_rollout_engine`` can import the vLLM engines without an import circle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from real.judge.prompts import SCORE_MARKER


@dataclass
class Rollouts:
    """``len(prompts) * group_size`` samples, grouped by prompt."""

    prompts: List[str]  # each prompt repeated group_size times, contiguously
    cots: List[str]  # the generated text of each sample
    decoded_scores: List[Optional[float]]  # the score written after the first marker (with_score), else None
    group_size: int
    sampled_tokens: Optional[int] = None  # tokens the engine generated for them (past the marker too); None: unknown


def value_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def decoded_score(text: str, score_values: Sequence[float], marker: str = SCORE_MARKER) -> Optional[float]:
    """The score value written right after the first score marker, else None.

    Score values are single tokens, so the score is the value whose text starts
    what follows the marker (the longest one, should "1" and "10" both be
    values): ``"[RESULT] 35"`` reads 3, since the token after the marker is "3"
    and GRPO reinforces that token.  The first marker is where the
    teacher-forced batch puts the score position.
    """
    cut = text.find(marker)
    if cut < 0:
        return None
    rest = text[cut + len(marker):].lstrip()
    for value in sorted(score_values, key=lambda v: -len(value_text(v))):
        if rest.startswith(value_text(value)):
            return float(value)
    return None


def group_rollouts(prompts: Sequence[str], per_prompt: Sequence[Sequence[str]], group_size: int, with_score: bool,
                   score_values: Sequence[float], marker: str = SCORE_MARKER,
                   sampled_tokens: Optional[int] = None) -> Rollouts:
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat = [c for cots in per_prompt for c in cots]
    scores = [decoded_score(c, score_values, marker) if with_score else None for c in flat]
    return Rollouts(prompts=flat_prompts, cots=flat, decoded_scores=scores, group_size=group_size,
                    sampled_tokens=sampled_tokens)
