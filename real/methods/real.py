"""REAL: policy gradient on the CoT with leave-one-out advantages, plus the differentiable prediction term.

``L = mean_i [ -A_i agg_t log pi(c_{i,t}) - beta * r_i ] (+ kl_coef * KL)``
with ``r = -(yhat - y*)^2 + lam * log pi(k*) + mu * pi(k*)`` (``real.methods.objectives.real_loss``,
docs/design.md section 1); ``A`` optionally carries the released code's probability bonus
(``--prob-bonus``).  A prompt group may be split over micro-batches: its advantages then come from
the pre-pass over the whole batch.  ``--group-filter partial`` keeps only the prompt groups whose
written scores are neither all right nor all wrong (the released ``real_data_type="partial"``), and
fills the step's batch with ``--prompts-per-step`` of them over as many rollout rounds as it takes
(at most ``--max-fill-rounds``), as the released code fills its buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import torch

from real.multi_gpu import distributed as dist_utils
from real.methods.base import MicroBatch, PolicyGradientConfig, PolicyGradientMethod, StepBatch, reward_metrics
from real.methods.objectives import (ADVANTAGE_NORMS, binary_rewards, combined_advantages, real_advantages, real_loss,
                                     regression_reward)
from real.methods.settings import setting


@dataclass
class RealConfig(PolicyGradientConfig):
    """REAL's own settings: the reward and its weights, the advantages, the partial-group filter."""

    beta: float = setting(1.0, "weight of REAL's differentiable -r term (the regression, or prediction, term)")
    lam: float = setting(0.0, "reward weight of log pi(k*), the log-probability of the true score token")
    mu: float = setting(0.0, "reward weight of pi(k*) inside r (differentiated in both terms). Not the released "
                        "code's probability bonus: that is --prob-bonus")
    prob_bonus: float = setting(0.0, "the released code's probability-bonus advantage (its beta_supp): the "
                                "leave-one-out advantages of pi(k*), normalised (--adv-norm) and clipped on their "
                                "own, times this weight, added to the advantages; moves the CoT term only")
    adv_clip: float = setting(1.0, "clip advantages to [-adv_clip, adv_clip]; <= 0 disables")
    adv_norm: str = setting("reward-std", "scaling of the leave-one-out advantages within a group: reward-std "
                            "(divide by the std of the group's rewards), advantage-std (by the std of the "
                            "advantages themselves, as the released code: G/(G-1) times smaller) or none",
                            ADVANTAGE_NORMS)
    group_filter: str = setting("all", "which prompt groups REAL trains on: all, or partial (the released "
                                "real_data_type='partial': rollouts also write their score, and only groups whose "
                                "written scores are neither all right nor all wrong against round(y*) are kept)",
                                ("all", "partial"))
    max_fill_rounds: int = setting(10, "with --group-filter partial, rollout rounds of --prompts-per-step prompts "
                                   "at most to fill the step's batch with --prompts-per-step partial groups (the "
                                   "released code keeps generating until it holds them); a step that reaches the cap "
                                   "trains on the groups it has (metrics fill_rounds, prompts_trained)")

    POSITIVE = ("max_fill_rounds",)

    @property
    def advantage_clip(self) -> Optional[float]:
        """``adv_clip`` as real.methods.objectives takes it: None when clipping is off."""
        return self.adv_clip if self.adv_clip > 0 else None


def partial_groups(decoded_scores, targets, group_size: int) -> List[int]:
    """Indices of the groups whose written scores are neither all right nor all wrong against round(y*)."""
    right = binary_rewards(decoded_scores, targets).view(-1, group_size)
    mixed = (right.min(dim=1).values != right.max(dim=1).values)
    return [int(i) for i in torch.nonzero(mixed).flatten()]


class Real(PolicyGradientMethod):
    name = "real"
    description = "REAL policy gradient + regression term"
    split_groups = True
    config_class = RealConfig

    @property
    def with_score(self) -> bool:  # the partial filter reads the score each rollout writes
        return self.settings.group_filter == "partial"

    def collect(self, loop, step: int, examples: list) -> StepBatch:
        if self.settings.group_filter != "partial":
            return super().collect(loop, step, examples)
        return self._fill_with_partial_groups(loop, step, examples)

    def _fill_with_partial_groups(self, loop, step: int, examples: list) -> StepBatch:
        """As the released code fills its REAL buffer: rollout rounds of ``--prompts-per-step`` prompts until
        this rank holds its share of ``--prompts-per-step`` partial groups (the first ones found; every rank
        runs as many rounds, until all are full or ``--max-fill-rounds``), then exactly those groups."""
        g, env = self.config.group_size, loop.env
        need = len(dist_utils.shard_for_rank(examples, env))
        kept: list = []  # (rollouts, targets, group index) of each partial group, in the order found
        sampled = partial = rounds = 0
        tokens: Optional[int] = 0  # generated over every round, the discarded groups' too (None: an engine can't say)
        while True:
            rollouts, targets = self.sample(loop, step, examples, fill_round=rounds)
            rounds += 1
            tokens = None if tokens is None or rollouts.sampled_tokens is None else tokens + rollouts.sampled_tokens
            found = partial_groups(rollouts.decoded_scores, targets, g)
            sampled, partial = sampled + len(targets) // g, partial + len(found)
            kept += [(rollouts, targets, i) for i in found][:need - len(kept)]
            short = int(len(kept) < need)
            if rounds >= self.settings.max_fill_rounds or not dist_utils.max_over_ranks(short, env):
                break
            examples = loop.next_examples()
        # groups_kept: the share of sampled groups that were partial; prompts_trained: over all ranks
        metrics = {"fill_rounds": rounds, "groups_kept": partial / sampled,
                   "prompts_trained": int(dist_utils.sum_over_ranks(len(kept), env))}
        trainable = bool(kept)
        if not kept:  # nothing to learn from on this rank: one group goes through with its loss weighted 0
            kept = [(rollouts, targets, 0)]
        rows = [(r, t, i * g + j) for r, t, i in kept for j in range(g)]
        picked = replace(rollouts, prompts=[r.prompts[k] for r, _, k in rows], cots=[r.cots[k] for r, _, k in rows],
                         decoded_scores=[r.decoded_scores[k] for r, _, k in rows], sampled_tokens=tokens)
        return self.step_batch(loop, picked, [t[k] for _, t, k in rows], metrics, trainable)

    def _reward(self, fwd) -> torch.Tensor:
        return regression_reward(fwd.expected_score, fwd.targets, fwd.log_pi_star, lam=self.settings.lam,
                                 mu=self.settings.mu)

    def prepare(self, loop, step_batch: StepBatch, plan, slots) -> List[List[MicroBatch]]:
        rows = len(step_batch.batch)
        self._prepass_rewards = torch.zeros(rows, device=loop.device)
        self._prepass_pi_star = torch.zeros(rows, device=loop.device)
        return super().prepare(loop, step_batch, plan, slots)

    def observe_prepass(self, fwd, mb: MicroBatch) -> None:
        self._prepass_rewards[mb.start:mb.end] = self._reward(fwd)
        self._prepass_pi_star[mb.start:mb.end] = fwd.pi_star

    def _advantage_settings(self) -> dict:
        s = self.settings
        return dict(normalize=s.adv_norm, clip=s.advantage_clip, prob_bonus=s.prob_bonus)

    def finish_prepass(self, micro_batches: List[MicroBatch]) -> None:
        adv = combined_advantages(self._prepass_rewards, self._prepass_pi_star, self.config.group_size,
                                  **self._advantage_settings())
        for mb in micro_batches:
            mb.rows["advantages"] = adv[mb.start:mb.end]

    def sequence_group(self, mb: MicroBatch) -> int:
        # without a pre-pass the loss computes each group's advantages: a chunk holds whole groups
        return 1 if "advantages" in mb.rows else self.config.group_size

    def loss(self, fwd, inputs, norms):
        s, adv = self.settings, self._advantage_settings()
        return real_loss(fwd, self.config.group_size, beta=s.beta, lam=s.lam, mu=s.mu, agg=s.loss_agg,
                         normalize_advantages=adv["normalize"], advantage_clip=adv["clip"],
                         prob_bonus=adv["prob_bonus"], advantages=inputs.get("advantages"),
                         old_logprobs=inputs.get("old_logprobs"), ppo_clip=s.clip_ratio,
                         ref_logprobs=inputs.get("ref_logprobs"), kl_coef=s.kl_coef, norms=norms)

    def step_metrics(self, step_batch: StepBatch, micro_batches, forwards):
        """Rewards and advantages of the first epoch's forwards (the pre-pass's advantages where one ran)."""
        cfg = self.config
        rewards = torch.cat([self._reward(f) for f in forwards])
        advantages = torch.cat([
            mb.rows["advantages"] if "advantages" in mb.rows else
            real_advantages(f, cfg.group_size, lam=self.settings.lam, mu=self.settings.mu,
                            **self._advantage_settings())
            for mb, f in zip(micro_batches, forwards)])
        return dict(step_batch.metrics, **reward_metrics(rewards, advantages, cfg.group_size))
