"""GRPO, the paper's standard-RL baseline: binary reward on the score the policy wrote, PPO clip.

The reward is ``1[decoded score == round(y*)]`` (``real.objectives.binary_rewards``),
the advantage the group-normalised reward; the policy's own score token is part
of the action (``grpo_token_logprobs``).  The head's regression outputs are
only reported.
"""
from __future__ import annotations

from real.methods.base import MicroBatch, PolicyGradientMethod, StepBatch, reward_metrics
from real.objectives import (binary_rewards, group_normalized_advantages, grpo_loss, grpo_token_logprobs,
                             sampled_score_indices)


class GRPO(PolicyGradientMethod):
    name = "grpo"
    description = "binary-reward GRPO"
    with_score = True

    def read_rollouts(self, loop, rollouts, targets, step_batch: StepBatch) -> None:
        decoded = rollouts.decoded_scores
        step_batch.rows["rewards"] = binary_rewards(decoded, targets).to(loop.device)
        step_batch.rows["sampled_index"] = sampled_score_indices(decoded, self.scale.values).to(loop.device)
        step_batch.metrics["decoded_rate"] = sum(d is not None for d in decoded) / len(targets)

    def action_logprobs(self, fwd, mb: MicroBatch):
        return grpo_token_logprobs(fwd, mb.inputs["sampled_index"])[0]

    def loss(self, fwd, mb: MicroBatch, epoch: int):
        cfg, inputs = self.config, mb.inputs
        return grpo_loss(fwd, inputs["rewards"], cfg.group_size, sampled_score_index=inputs["sampled_index"],
                         agg=cfg.loss_agg, old_logprobs=inputs.get("old_logprobs"), ppo_clip=cfg.clip_ratio,
                         ref_logprobs=inputs.get("ref_logprobs"), kl_coef=cfg.kl_coef,
                         tokens_per_row=inputs.get("tokens_per_row"))

    def action_tokens(self, step_batch: StepBatch) -> float:  # the written score token is an action too
        return super().action_tokens(step_batch) + float((step_batch.rows["sampled_index"] >= 0).sum())

    def step_metrics(self, step_batch: StepBatch):
        rewards = step_batch.rows["rewards"].float()
        advantages = group_normalized_advantages(rewards.view(-1, self.config.group_size)).reshape(-1)
        return dict(step_batch.metrics, **reward_metrics(rewards, advantages, self.config.group_size))
