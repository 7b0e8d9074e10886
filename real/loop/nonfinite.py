"""Non-finite training: a NaN or infinite loss or gradient norm skips the update instead of writing it into the
weights, and a run that keeps producing them stops, saying where, without a checkpoint of those steps.

``--lr 1e30`` moves every weight by ~1e30 in one AdamW step; the next forward overflows.  Before, such a run
either finished with exit 0 and a NaN checkpoint, or died in ``torch.multinomial`` while sampling rollouts.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

from real.multi_gpu import distributed as dist_utils

MAX_NON_FINITE_STEPS = 3  # steps in a row whose update was skipped before the run stops


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. non-finite training); the message says why and which checkpoint is good."""


class NonFiniteStep(Exception):
    """A step that cannot be trained because the policy is not finite (e.g. NaN sampling probabilities)."""


def finite_on_all_ranks(loss: float, grad_norm: float, env=None) -> bool:
    """Whether an update may be taken: loss and gradient norm finite on every rank (collective under torchrun)."""
    bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
    return not dist_utils.max_over_ranks(int(bad), env)


def skipped_record(step: int, method: str, reason: str, data_position: int) -> Dict[str, Any]:
    """The metrics line of a step that had nothing to train on."""
    return {"type": "train", "step": step, "method": method, "update_skipped": True, "skip_reason": reason,
            "data_position": data_position}


class SkippedSteps:
    """Counts the steps in a row whose update was skipped; logs each, and stops the run (``TrainingFailed``)
    after ``limit`` of them or when the run's last step is one."""

    def __init__(self, log: Callable[[str], None], newest_checkpoint: Callable[[], Optional[str]], lr: float,
                 limit: int = MAX_NON_FINITE_STEPS):
        self.log, self.newest_checkpoint, self.lr, self.limit = log, newest_checkpoint, lr, limit
        self.streak = 0

    def observe(self, record: Dict[str, Any], last_step: bool) -> None:
        if not record.get("update_skipped"):
            self.streak = 0
            return
        self.streak += 1
        step = record["step"]
        self.log(f"step {step}: {record['skip_reason']}: update skipped ({self.streak} in a row)")
        if self.streak < self.limit and not last_step:
            return
        raise TrainingFailed(
            f"step {step}: non-finite loss or gradient norm, {self.streak} steps in a row (steps "
            f"{step - self.streak + 1}-{step}); stopped without a checkpoint of them (newest: "
            f"{self.newest_checkpoint()}). Lower --lr (now {self.lr:g}) or check the data")
