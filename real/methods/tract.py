"""TRACT / CoT-RAFT: SFT on reference CoTs plus the regression term (``--tract-cots own``: TRACT's
second stage, on CoTs the model samples itself).

``CE(c_gt | x) + w * (yhat(x, c_gt) - y*)^2`` (``real.methods.objectives.tract_loss``,
whose ``lam`` is the paper's name for ``w``).  ``w`` is ``--beta``, the weight
of the regression (prediction) term in every method; ``--lam`` is REAL's reward
weight of ``log pi(k*)`` and plays no part here.  One reference CoT per prompt
is drawn per step, seeded by (seed, step), for the whole step before it is
shared out, so any number of ranks trains on the same CoTs.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

from real.multi_gpu import distributed as dist_utils
from real.methods.base import Method, StepBatch, sampled_or_kept, step_tokens_per_row, teacher_forced
from real.methods.objectives import tract_loss
from real.methods.settings import MethodConfig, setting
from real.judge.prompts import SCORE_MARKER, format_cot


def reference_cot(example, rng: random.Random, marker: str = SCORE_MARKER) -> str:
    """One of the example's reference feedbacks (drawn by ``rng``), written as a scored CoT."""
    j = rng.randrange(len(example.feedback))
    grade = example.grades[j] if len(example.grades) == len(example.feedback) else example.target
    return format_cot(example.feedback[j], grade, marker)


@dataclass
class TRACTConfig(MethodConfig):
    """TRACT's own settings: the weight of its squared error and which CoTs it trains on."""

    beta: float = setting(1.0, "weight of TRACT's squared error of the expected score (the regression term)")
    tract_cots: str = setting("reference", "the CoTs tract trains on: reference (the data's feedback texts; "
                              "TRACT's first stage) or own (TRACT's second stage: CoTs the model samples itself, one "
                              "per prompt per step at --temperature / --top-p; start it from the first stage with "
                              "--init-from, and use --group-size 1 so that no extra CoTs are sampled)",
                              ("reference", "own"))


class TRACT(Method):
    name = "tract"
    description = "SFT on reference CoTs + regression"
    config_class = TRACTConfig

    def __init__(self, config, scale):
        super().__init__(config, scale)
        # TRACT's second stage samples its own CoTs: the loop then provides a rollout engine
        self.needs_rollouts = self.settings.tract_cots == "own"

    @property
    def group_size(self) -> int:
        return 1

    @property
    def head_temperature(self) -> float:
        return 1.0

    def check_data(self, examples: list) -> list:
        if self.needs_rollouts:  # own CoTs: no reference CoT needed
            return examples
        usable = [e for e in examples if e.feedback]
        if not usable:
            raise ValueError("--method tract trains on reference CoTs, but no training example has feedback")
        if len(usable) < len(examples):
            warnings.warn(f"tract: {len(examples) - len(usable)} of {len(examples)} examples have no reference "
                          "CoT and are left out", stacklevel=2)
        return usable

    def collect(self, loop, step: int, examples: list) -> StepBatch:
        if self.needs_rollouts:  # stage 2: one CoT per prompt sampled by the model itself
            examples = dist_utils.shard_for_rank(examples, loop.env)
            rollouts = loop.sample_rollouts([e.prompt for e in examples], step, with_score=False)
            cots = rollouts.cots[::self.config.group_size]
            batch = teacher_forced(loop, [e.prompt for e in examples], cots, [e.target for e in examples], quiet=True)
            return StepBatch(batch, generated_tokens=sampled_or_kept(rollouts, batch))
        rng = random.Random(loop.step_seed(step))
        cots = dist_utils.shard_for_rank([reference_cot(e, rng, loop.scale.marker) for e in examples], loop.env)
        examples = dist_utils.shard_for_rank(examples, loop.env)
        return StepBatch(teacher_forced(loop, [e.prompt for e in examples], cots, [e.target for e in examples]))

    def tokens_per_row(self, loop, step_batch: StepBatch, ranges):
        if len(ranges) > 1 or loop.env.is_distributed:
            # TRACT's CE is a mean over all CoT tokens of the update's mini-batch: normalise every micro-batch
            # (and rank) by it
            start, end = (ranges[0][0], ranges[-1][1]) if ranges else (0, 0)
            tokens = float(step_batch.batch.cot_mask[start:end].sum())
            return step_tokens_per_row(loop, tokens, end - start)
        return None

    def loss(self, fwd, inputs, norms):
        return tract_loss(fwd, lam=self.settings.beta, norms=norms)
