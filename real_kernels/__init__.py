"""real-kernels: fused LM-head kernels for REAL (regression-aware RL for LLM judges).

``linear_logprobs`` and ``judge_head`` compute per-token log-probs, the
score-token softmax, the expected score and its squared error straight from
hidden states and the LM-head weight, never materialising ``[tokens x vocab]``
logits.  See docs/design.md section 4 for the contract.
"""
from .functional import judge_head, linear_logprobs
from .loss import judge_loss
from .modules import JudgeHead, JudgeLoss
from .core.sizing import plan_chunks
from .core.outputs import JudgeHeadOutput, LinearLogprobsOutput

__all__ = ["linear_logprobs", "judge_head", "judge_loss", "plan_chunks", "LinearLogprobsOutput", "JudgeHeadOutput",
           "JudgeHead", "JudgeLoss"]
__version__ = "0.1.0"
