"""The protocol every training method follows, and what the methods share.

A method is a small class; the training loop (``real.loop.train``) calls it in this
order every step and never asks which method it is:

1. ``collect(loop, step, examples)``: this rank's teacher-forced batch of the
   step (sampled rollouts, reference CoTs, or none) and the per-row inputs the
   loss needs besides it (:class:`StepBatch`);
2. ``prepare(loop, step_batch, plan, slots)``: per optimizer update (mini-batch,
   ``--mini-batch-size``) the per-micro-batch inputs
   (:class:`MicroBatch`: per-row tensors and the micro-batch's denominators,
   ``real.methods.objectives.LossNorms``), after a pre-pass where the method needs one:
   old and reference log-probs, group advantages over the whole batch;
3. ``loss(fwd, inputs, norms)``: a pure function of tensors, the loss of some
   whole sequences of a micro-batch (their head outputs ``fwd`` and per-row
   ``inputs``; ``real.model.head.micro_batch_loss`` calls it once per chunk of the
   head) as their share of the micro-batch's loss, and its terms as detached
   0-dim tensors that add up over the chunks (read once per update);
   ``sequence_group(mb)``: how many consecutive sequences a chunk must keep
   together (a prompt group, when the loss computes its advantages);
4. ``step_metrics(step_batch, micro_batches, forwards)``: what the method logs
   once per step, from the first epoch's detached forwards.

Class attributes say what the loop must provide: ``needs_rollouts`` (a rollout
engine, G sampled CoTs per prompt), ``split_groups`` (a prompt group may be
split over micro-batches: its advantages are computed beforehand),
``eval_with_cot`` (RAIL after a greedy CoT, or right after the prompt);
``config_class`` is the method's own section of settings
(:class:`~real.methods.settings.MethodConfig`), read from ``loop.config.method_config``
(``self.settings``).

``loop`` is the trainer; a method uses ``loop.config``, ``loop.env``,
``loop.device``, ``loop.tokenizer``, ``loop.scale``, ``loop.step_seed(step)``,
``loop.next_examples()`` (more prompts of the data stream, e.g. to fill a
filtered batch), ``loop.sample_rollouts(prompts, step, with_score=, fill_round=)``, ``loop.forward(mb,
entropy=)``, ``loop.reference_forward(mb)`` and ``loop.dummy_forward(batch,
grad=)`` (a forward that changes nothing, for ranks with fewer micro-batches).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from real.multi_gpu import distributed as dist_utils
from real.judge.batching import TeacherForcedBatch, build_teacher_forced_batch, slice_batch
from real.model.head import JudgeForward
from real.methods.objectives import AGGREGATIONS, LossNorms, check_aggregation, loss_norms
from real.methods.settings import MethodConfig, setting
from real.judge.prompts import ScoreScale

LossTerms = Tuple[torch.Tensor, Dict[str, torch.Tensor]]


@dataclass
class StepBatch:
    """One rank's teacher-forced batch of a step and what the loss needs besides it."""

    batch: TeacherForcedBatch
    rows: Dict[str, torch.Tensor] = field(default_factory=dict)  # per-row inputs, cut per micro-batch
    generated_tokens: int = 0
    metrics: Dict[str, Any] = field(default_factory=dict)  # logged as they are (e.g. GRPO's decoded_rate)
    prepass: bool = False  # set by prepare(): a pre-pass ran (one more forward over the batch)
    trainable: bool = True  # False: nothing to learn from on this rank (its loss is weighted 0, collectives run)


@dataclass
class MicroBatch:
    """Rows ``[start, end)`` of the step's batch, the loss's per-row inputs for them, its denominators."""

    start: int
    end: int
    rows: Dict[str, torch.Tensor]  # per-row loss inputs: advantages, old / reference log-probs, rewards, ...
    norms: LossNorms  # the micro-batch's denominators: the chunks' losses add up to its loss

    def inputs(self, seqs: slice) -> Dict[str, torch.Tensor]:
        """The per-row inputs of the micro-batch's rows ``seqs`` (one chunk of its loss)."""
        return {name: values[seqs] for name, values in self.rows.items()}


@dataclass
class PolicyGradientConfig(MethodConfig):
    """The settings REAL and GRPO share: the PPO clip, the KL term and the CoT term's aggregation."""

    clip_ratio: float = setting(0.2, "PPO ratio clip epsilon when a rollout batch is reused")
    kl_coef: float = setting(0.0, "weight of the k3 KL penalty to the initial policy (0 = off, no reference "
                             "model kept)")
    loss_agg: str = setting("seq-mean-token-mean", "aggregation of the CoT term, named as verl names it: token-mean "
                            "(every CoT token of the step's batch weighs the same; the released code's), "
                            "seq-mean-token-sum (sum per sequence, mean over sequences), seq-mean-token-mean (mean "
                            "per sequence, mean over sequences); one of " + ", ".join(AGGREGATIONS))

    NON_NEGATIVE = ("kl_coef",)

    def validate(self) -> "PolicyGradientConfig":
        super().validate()
        check_aggregation(self.loss_agg)
        return self


class Method:
    """The shared protocol (see the module docstring); subclasses override what differs."""

    name = ""
    description = ""
    needs_rollouts = False
    split_groups = False
    eval_with_cot = True
    config_class = MethodConfig

    def __init__(self, config, scale: ScoreScale):
        self.config, self.scale = config, scale
        self.settings = config.method_config  # this method's own section (config_class)

    @property
    def needs_reference_model(self) -> bool:
        """Whether the loop must keep a frozen copy of the initial policy (a KL term)."""
        return False

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ValueError for settings this method cannot train with."""

    @property
    def head_temperature(self) -> float:
        """The softmax temperature of every head pass in training: the distribution the CoTs were drawn
        from (the rollout temperature) for the methods that sample them, else 1."""
        return float(self.config.temperature) if self.needs_rollouts else 1.0

    @property
    def group_size(self) -> int:
        """Rows per prompt in the step's batch."""
        return self.config.group_size if self.needs_rollouts else 1

    def check_data(self, examples: list) -> list:
        """The training examples this method can use (an error when none)."""
        return examples

    def collect(self, loop, step: int, examples: list) -> StepBatch:
        raise NotImplementedError

    def prepare(self, loop, step_batch: StepBatch, plan: Sequence[Sequence[Tuple[int, int]]],
                slots: Sequence[int]) -> List[List[MicroBatch]]:
        """The micro-batches of each update's mini-batch (``plan``: their row ranges on this rank; ``slots``:
        how many micro-batches every rank runs in each, the most any rank has)."""
        mini_batches = []
        for ranges in plan:
            per_row = self.tokens_per_row(loop, step_batch, ranges)
            micro_batches = []
            for s, e in ranges:
                rows = {name: values[s:e] for name, values in step_batch.rows.items()}
                norms = self.loss_norms(slice_batch(step_batch.batch, s, e), rows, per_row)
                micro_batches.append(MicroBatch(s, e, rows, norms))
            mini_batches.append(micro_batches)
        return mini_batches

    def tokens_per_row(self, loop, step_batch: StepBatch, ranges: Sequence[Tuple[int, int]]) -> Optional[float]:
        """The mini-batch's (rows ``ranges``) action tokens per row when its token-mean spans more than one
        micro-batch (or rank), else None (see ``real.methods.objectives.loss_norms``); a collective under torchrun."""
        return None

    def loss_norms(self, part: TeacherForcedBatch, rows: Dict[str, torch.Tensor],
                   tokens_per_row: Optional[float]) -> LossNorms:
        """The denominators of the micro-batch ``part`` (its per-row inputs ``rows``)."""
        return loss_norms(part.cot_mask, tokens_per_row=tokens_per_row)

    def sequence_group(self, mb: MicroBatch) -> int:
        """Consecutive sequences of ``mb`` that one chunk of the loss must hold together."""
        return 1

    def loss(self, fwd: JudgeForward, inputs: Dict[str, torch.Tensor], norms: LossNorms) -> LossTerms:
        raise NotImplementedError

    def step_metrics(self, step_batch: StepBatch, micro_batches: List[MicroBatch],
                     forwards: List[JudgeForward]) -> Dict[str, Any]:
        """Logged once per step; ``forwards``: the first epoch's detached forward of each micro-batch."""
        return {}


def sampled_or_kept(rollouts, batch) -> int:
    """Tokens the engine generated for ``rollouts`` where it says, else the CoT tokens of their batch."""
    if rollouts.sampled_tokens is not None:
        return int(rollouts.sampled_tokens)
    return int(batch.cot_lengths.sum())


def teacher_forced(loop, prompts, cots, targets, *, quiet: bool = False) -> TeacherForcedBatch:
    """The step's batch on the loop's device (``quiet``: no truncation warnings, e.g. for sampled CoTs)."""
    cfg = loop.config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        return build_teacher_forced_batch(
            loop.tokenizer, prompts, cots, targets, loop.scale.token_ids, loop.scale.values,
            max_prompt_tokens=cfg.max_prompt_tokens, max_cot_tokens=cfg.max_cot_tokens, marker=loop.scale.marker,
            device=loop.device)


def step_tokens_per_row(loop, tokens: float, rows: int) -> float:
    """The step's action tokens per row over every rank: the normaliser of a token-mean taken over the
    whole step's batch when it is trained in micro-batches or on several ranks (see ``loss_norms``)."""
    return dist_utils.sum_over_ranks(float(tokens), loop.env) / dist_utils.sum_over_ranks(float(rows), loop.env)


def reward_metrics(rewards: torch.Tensor, advantages: torch.Tensor, group_size: int) -> Dict[str, float]:
    """Rewards and advantages of the step's rollouts, as the RL methods log them."""
    return {
        "reward_group_std": float(rewards.view(-1, group_size).std(dim=1, unbiased=False).mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "advantage_mean": float(advantages.mean()),
        "advantage_std": float(advantages.std(unbiased=False)),
        "advantage_abs": float(advantages.abs().mean()),
        "advantage_min": float(advantages.min()),
        "advantage_max": float(advantages.max()),
    }


class PolicyGradientMethod(Method):
    """What REAL and GRPO share: G rollouts per prompt, the pre-pass, PPO epochs and the KL term.

    The pre-pass runs (on every rank, with as many forwards on each) when a
    rollout batch is reused for several epochs (old log-probs for the PPO
    ratio), with a KL term (reference log-probs), or when a group is split over
    micro-batches (``observe_prepass`` / ``finish_prepass`` then give the
    advantages of whole groups).
    """

    needs_rollouts = True
    with_score = False  # sample on past the marker until the policy writes its score
    config_class = PolicyGradientConfig

    @property
    def needs_reference_model(self) -> bool:
        return self.settings.kl_coef > 0

    @classmethod
    def check_config(cls, config) -> None:
        if config.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for method {config.method} (leave-one-out baseline); "
                             f"got {config.group_size}")

    def collect(self, loop, step: int, examples: list) -> StepBatch:
        rollouts, targets = self.sample(loop, step, examples)
        return self.step_batch(loop, rollouts, targets)

    def sample(self, loop, step: int, examples: list, fill_round: int = 0):
        """``(rollouts, targets)``: G rollouts of each of this rank's share of ``examples``, and their targets."""
        examples = dist_utils.shard_for_rank(examples, loop.env)
        rollouts = loop.sample_rollouts([e.prompt for e in examples], step, with_score=self.with_score,
                                        fill_round=fill_round)
        return rollouts, [e.target for e in examples for _ in range(self.config.group_size)]

    def step_batch(self, loop, rollouts, targets: List[float], metrics: Optional[Dict[str, Any]] = None,
                   trainable: bool = True) -> StepBatch:
        """The step's batch of ``rollouts`` (``trainable`` False: the rows only keep the collectives going)."""
        batch = teacher_forced(loop, rollouts.prompts, rollouts.cots, targets, quiet=True)
        step_batch = StepBatch(batch, generated_tokens=sampled_or_kept(rollouts, batch), metrics=metrics or {},
                               trainable=trainable)
        self.read_rollouts(loop, rollouts, targets, step_batch)
        return step_batch

    def read_rollouts(self, loop, rollouts, targets: List[float], step_batch: StepBatch) -> None:
        """Per-row loss inputs and metrics read off the rollouts (GRPO: rewards of the written scores)."""

    def action_tokens(self, step_batch: StepBatch, start: int, end: int) -> float:
        """Tokens the policy-gradient term sums over in rows ``[start, end)`` of the step's batch (this rank)."""
        return float(step_batch.batch.cot_mask[start:end].sum())

    def action_logprobs(self, fwd: JudgeForward, mb: MicroBatch) -> torch.Tensor:
        """[B, T] log-probs of the tokens the policy chose (the PPO ratio and the KL are over these)."""
        return fwd.cot_logprobs

    def observe_prepass(self, fwd: JudgeForward, mb: MicroBatch) -> None:
        """Called with each micro-batch's pre-pass forward (no grad)."""

    def finish_prepass(self, micro_batches: List[MicroBatch]) -> None:
        """Called once the pre-pass has seen every micro-batch."""

    def tokens_per_row(self, loop, step_batch: StepBatch, ranges) -> Optional[float]:
        if self.settings.loss_agg == "token-mean" and (len(ranges) > 1 or loop.env.is_distributed):
            start, end = (ranges[0][0], ranges[-1][1]) if ranges else (0, 0)
            return step_tokens_per_row(loop, self.action_tokens(step_batch, start, end), end - start)
        return None

    def prepare(self, loop, step_batch: StepBatch, plan, slots) -> List[List[MicroBatch]]:
        cfg, batch = self.config, step_batch.batch
        mini_batches = super().prepare(loop, step_batch, plan, slots)
        split = any((e - s) % self.group_size for ranges in plan for s, e in ranges)
        # more than one update per rollout batch: the PPO ratio against the pre-pass's log-probs from the 2nd on
        reused = cfg.epochs_per_batch > 1 or len(slots) > 1
        # Every rank must agree whether the pre-pass (more forwards) runs.
        step_batch.prepass = (reused or self.settings.kl_coef > 0 or dist_utils.max_over_ranks(int(split), loop.env) > 0)
        if not step_batch.prepass:
            return mini_batches
        for micro_batches, n_slots in zip(mini_batches, slots):
            for k in range(n_slots):
                if k >= len(micro_batches):  # this rank has fewer micro-batches: the same collectives as a real one
                    loop.dummy_forward(batch, grad=False)
                    if self.settings.kl_coef > 0:
                        loop.reference_forward(slice_batch(batch, 0, 1))
                    continue
                mb = micro_batches[k]
                part = slice_batch(batch, mb.start, mb.end)
                with torch.no_grad():
                    fwd = loop.forward(part, entropy=False)
                    self.observe_prepass(fwd, mb)
                    if reused:
                        mb.rows["old_logprobs"] = self.action_logprobs(fwd, mb).detach()
                if self.settings.kl_coef > 0:
                    mb.rows["ref_logprobs"] = self.action_logprobs(loop.reference_forward(part), mb)
        self.finish_prepass([mb for micro_batches in mini_batches for mb in micro_batches])
        return mini_batches
