"""REAL: policy gradient on the CoT with leave-one-out advantages, plus the differentiable prediction term.

``L = mean_i [ -A_i agg_t log pi(c_{i,t}) - beta * r_i ] (+ kl_coef * KL)``
with ``r = -(yhat - y*)^2 + lam * log pi(k*) + mu * pi(k*)`` (``real.objectives.real_loss``,
docs/design.md section 1).  A prompt group may be split over micro-batches: its
advantages then come from the pre-pass over the whole batch.
"""
from __future__ import annotations

from typing import List

import torch

from real.methods.base import MicroBatch, PolicyGradientMethod, StepBatch, reward_metrics
from real.objectives import real_advantages, real_loss, regression_reward, rloo_advantages


class Real(PolicyGradientMethod):
    name = "real"
    description = "REAL policy gradient + regression term"
    split_groups = True

    def _reward(self, fwd) -> torch.Tensor:
        return regression_reward(fwd.expected_score, fwd.targets, fwd.log_pi_star, lam=self.config.lam,
                                 mu=self.config.mu)

    def prepare(self, loop, step_batch: StepBatch, ranges, n_slots: int) -> List[MicroBatch]:
        rows = len(step_batch.batch)
        self.rewards = torch.zeros(rows, device=loop.device)  # epoch 0's rewards and advantages, for the log
        self.advantages = torch.zeros(rows, device=loop.device)
        self._prepass_rewards = torch.zeros(rows, device=loop.device)
        return super().prepare(loop, step_batch, ranges, n_slots)

    def observe_prepass(self, fwd, mb: MicroBatch) -> None:
        self._prepass_rewards[mb.start:mb.end] = self._reward(fwd)

    def finish_prepass(self, micro_batches: List[MicroBatch]) -> None:
        cfg = self.config
        adv = rloo_advantages(self._prepass_rewards.view(-1, cfg.group_size), normalize=cfg.normalize_adv,
                              clip=cfg.advantage_clip).reshape(-1)
        for mb in micro_batches:
            mb.inputs["advantages"] = adv[mb.start:mb.end]

    def loss(self, fwd, mb: MicroBatch, epoch: int):
        cfg, inputs = self.config, mb.inputs
        if "advantages" not in inputs:  # no pre-pass: whole groups, on-policy
            inputs["advantages"] = real_advantages(fwd, cfg.group_size, lam=cfg.lam, mu=cfg.mu,
                                                   normalize=cfg.normalize_adv, clip=cfg.advantage_clip)
        rows = fwd.targets.shape[0]
        # A micro-batch holding part of a group carries precomputed advantages; real_loss then only
        # uses group_size to report the group std, which step_metrics recomputes over the whole batch.
        group = cfg.group_size if rows % cfg.group_size == 0 else rows
        loss, terms = real_loss(fwd, group, beta=cfg.beta, lam=cfg.lam, mu=cfg.mu, agg=cfg.loss_agg,
                                normalize_advantages=cfg.normalize_adv, advantage_clip=cfg.advantage_clip,
                                advantages=inputs["advantages"], old_logprobs=inputs.get("old_logprobs"),
                                ppo_clip=cfg.clip_ratio, ref_logprobs=inputs.get("ref_logprobs"),
                                kl_coef=cfg.kl_coef)
        if epoch == 0:
            with torch.no_grad():
                self.advantages[mb.start:mb.end] = inputs["advantages"]
                self.rewards[mb.start:mb.end] = self._reward(fwd)
        return loss, terms

    def step_metrics(self, step_batch: StepBatch):
        return reward_metrics(self.rewards, self.advantages, self.config.group_size)
