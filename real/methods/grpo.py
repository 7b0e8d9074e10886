"""GRPO, the paper's standard-RL baseline: binary reward on the score the policy wrote, PPO clip.

The reward is ``1[decoded score == round(y*)]`` (``real.methods.objectives.binary_rewards``),
the advantage the group-normalised reward (computed once, when the rollouts are read); the
policy's own score token is part of the action (``grpo_token_logprobs``).  The head's regression
outputs are only reported.
"""
from __future__ import annotations

from dataclasses import dataclass

from real.methods.base import MicroBatch, PolicyGradientConfig, PolicyGradientMethod, StepBatch, reward_metrics
from real.methods.objectives import (binary_rewards, group_normalized_advantages, grpo_action_mask, grpo_loss,
                             grpo_token_logprobs, loss_norms, sampled_score_indices)


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """GRPO's settings: the policy-gradient ones (its reward and advantages take none)."""


class GRPO(PolicyGradientMethod):
    name = "grpo"
    description = "binary-reward GRPO"
    with_score = True
    config_class = GRPOConfig

    def read_rollouts(self, loop, rollouts, targets, step_batch: StepBatch) -> None:
        decoded = rollouts.decoded_scores
        rewards = binary_rewards(decoded, targets).to(loop.device)
        step_batch.rows["rewards"] = rewards
        step_batch.rows["advantages"] = group_normalized_advantages(rewards.view(-1, self.config.group_size)
                                                                    ).reshape(-1)
        step_batch.rows["sampled_index"] = sampled_score_indices(decoded, self.scale.values).to(loop.device)
        step_batch.metrics["decoded_rate"] = sum(d is not None for d in decoded) / len(targets)

    def action_logprobs(self, fwd, mb: MicroBatch):
        return grpo_token_logprobs(fwd, mb.rows["sampled_index"])[0]

    def loss_norms(self, part, rows, tokens_per_row):  # the written score token is an action too
        actions, _ = grpo_action_mask(part.cot_mask, part.score_pos, rows["sampled_index"])
        return loss_norms(actions, cot_mask=part.cot_mask, tokens_per_row=tokens_per_row)

    def loss(self, fwd, inputs, norms):
        s = self.settings
        return grpo_loss(fwd, inputs["rewards"], self.config.group_size, sampled_score_index=inputs["sampled_index"],
                         advantages=inputs["advantages"], agg=s.loss_agg, old_logprobs=inputs.get("old_logprobs"),
                         ppo_clip=s.clip_ratio, ref_logprobs=inputs.get("ref_logprobs"), kl_coef=s.kl_coef,
                         norms=norms)

    def action_tokens(self, step_batch: StepBatch, start: int, end: int) -> float:  # the written score too
        written = float((step_batch.rows["sampled_index"][start:end] >= 0).sum())
        return super().action_tokens(step_batch, start, end) + written

    def step_metrics(self, step_batch: StepBatch, micro_batches, forwards):
        rewards = step_batch.rows["rewards"].float()
        advantages = step_batch.rows["advantages"]
        return dict(step_batch.metrics, **reward_metrics(rewards, advantages, self.config.group_size))
