"""RAFT, the paper's SFT baseline without a CoT: ``mean (yhat(x) - y*)^2`` right after the prompt.

The judge is evaluated the same way (RAIL with no CoT).
"""
from __future__ import annotations

from dataclasses import dataclass

from real.methods.base import Method, StepBatch, teacher_forced
from real.methods.settings import MethodConfig
from real.multi_gpu import distributed as dist_utils
from real.methods.objectives import raft_loss


@dataclass
class RAFTConfig(MethodConfig):
    """RAFT reads no settings of its own: its loss is the squared error alone."""


class RAFT(Method):
    name = "raft"
    description = "regression SFT, no CoT"
    config_class = RAFTConfig
    eval_with_cot = False

    def collect(self, loop, step: int, examples: list) -> StepBatch:
        examples = dist_utils.shard_for_rank(examples, loop.env)
        return StepBatch(teacher_forced(loop, [e.prompt for e in examples], None, [e.target for e in examples]))

    def loss(self, fwd, inputs, norms):
        return raft_loss(fwd, norms=norms)
