"""REAL's rewards, RLOO advantages and loss, and the paper's baselines (RAFT, TRACT, GRPO).

Every quantity comes from the fused judge head (``real_kernels.judge_head``
through ``real_kernels.hf``), never from ``[tokens x vocab]`` logits.  The math
is docs/design.md section 1:

- reward of a sampled CoT ``r = -(yhat - y*)^2 + lam * log pi(k*) + mu * pi(k*)``,
  differentiable in the parameters;
- REAL's gradient ``E_c[r grad log pi(c|x)] + E_c[grad r]``, estimated with G
  CoTs per prompt by the loss
  ``L = (1/G) sum_i [ -A_i agg_t log pi(c_{i,t}) - beta * r_i ]``
  (which is ``+ beta ((yhat_i - y*)^2 - lam log pi_i(k*))`` when mu = 0),
  ``A_i`` the leave-one-out advantage computed without grad (optionally plus the
  released code's probability bonus, ``prob_bonus``);
- PPO-style ratio clipping against old log-probs when one rollout batch is
  used for several epochs (without old log-probs the batch is on-policy and the
  term is plain REINFORCE, ``-A log pi``), optional k3 KL to a reference policy.

Sequences of one prompt must be contiguous: rows ``b*G .. b*G+G-1`` form group b.

Every loss is a pure function of tensors: a sum of per-sequence terms divided by
the batch's denominators (:class:`LossNorms`: sequences, tokens), so that the
loss of a batch equals the sum of the losses of any split of it into whole
sequences evaluated with the batch's norms (``real.model.head.micro_batch_loss`` runs
it once per chunk of sequences).  Its terms are detached 0-dim tensors that add
up over such a split the same way; nothing is read back to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from real.model.head import JudgeForward

Terms = Dict[str, torch.Tensor]

# The CoT term's aggregation, named as verl names it (``loss_agg_mode``):
# token-mean: every CoT token of the batch weighs the same (the released REAL code's setting);
# seq-mean-token-sum: the sum over a sequence's tokens, then the mean over sequences;
# seq-mean-token-mean: the mean over a sequence's tokens, then the mean over sequences.
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
# How leave-one-out advantages are scaled within a group: by the std of the group's rewards, by the std of
# the advantages themselves (the released REAL code: A / (std(A) + eps), which is G/(G-1) times smaller), or not.
ADVANTAGE_NORMS = ("reward-std", "advantage-std", "none")


@dataclass(frozen=True)
class LossNorms:
    """The denominators of a loss's means, fixed for a whole (micro-)batch.

    A loss evaluated on a part of the batch (some of its sequences) with the
    batch's norms is that part's share of the batch loss: the shares of a split
    into whole sequences add up to the batch loss, value and gradient.
    """

    sequences: int  # sequences of the batch: every mean over sequences divides by it
    tokens: Union[torch.Tensor, float]  # the token-mean's denominator: action tokens, or sequences x tokens_per_row
    action_tokens: torch.Tensor  # 0-dim, the batch's action tokens (at least 1): the clip fraction's denominator
    cot_tokens: torch.Tensor  # 0-dim, the batch's CoT tokens (at least 1): the entropy mean's denominator


def loss_norms(action_mask: torch.Tensor, *, cot_mask: Optional[torch.Tensor] = None,
               tokens_per_row: Optional[float] = None) -> LossNorms:
    """The norms of a batch whose action tokens are ``action_mask`` ``[B, T]`` (its CoT tokens ``cot_mask``,
    by default the same).  ``tokens_per_row``: the token-mean is over a larger batch (a micro-batch of a
    step, one rank's share) with that many action tokens per row: its denominator is then ``B x
    tokens_per_row``, so that micro-batch losses weighted by their share of rows add up to the whole
    batch's token mean."""
    if not isinstance(action_mask, torch.Tensor) or action_mask.dim() != 2:
        raise ValueError(f"action_mask must be a [B, T] tensor, got {getattr(action_mask, 'shape', action_mask)!r}")
    if cot_mask is not None and cot_mask.shape != action_mask.shape:
        raise ValueError(f"cot_mask must have the shape of action_mask {tuple(action_mask.shape)}, got "
                         f"{tuple(cot_mask.shape)}")
    if tokens_per_row is not None and not (isinstance(tokens_per_row, (int, float)) and tokens_per_row >= 0):
        raise ValueError(f"tokens_per_row must be a number >= 0 or None, got {tokens_per_row!r}")
    rows = action_mask.shape[0]
    action = action_mask.sum().clamp(min=1)
    tokens = action if tokens_per_row is None else max(rows * tokens_per_row, 1e-12)
    cot = action if cot_mask is None else cot_mask.sum().clamp(min=1)
    return LossNorms(sequences=rows, tokens=tokens, action_tokens=action, cot_tokens=cot)


def _norms_for(fwd: JudgeForward, norms: Optional[LossNorms], tokens_per_row: Optional[float],
               action_mask: Optional[torch.Tensor] = None) -> LossNorms:
    """``norms`` when given (then ``tokens_per_row`` must not be), else the norms of ``fwd`` as a whole batch."""
    if norms is None:
        mask = fwd.cot_mask if action_mask is None else action_mask
        return loss_norms(mask, cot_mask=fwd.cot_mask, tokens_per_row=tokens_per_row)
    if not isinstance(norms, LossNorms):
        raise TypeError(f"norms must be a LossNorms (real.methods.objectives.loss_norms), got {type(norms).__name__}")
    if tokens_per_row is not None:
        raise ValueError("pass tokens_per_row to loss_norms, not together with norms")
    return norms


def _mean(x: torch.Tensor, norms: LossNorms) -> torch.Tensor:
    """The batch mean of the per-sequence ``x`` (this part's share of it)."""
    return x.sum() / norms.sequences


def entropy_mean(fwd: JudgeForward, norms: LossNorms) -> torch.Tensor:
    """Mean entropy over the batch's CoT tokens (this part's share; NaN when the head pass did not compute it)."""
    if fwd.cot_entropy is None:
        return torch.full((), float("nan"), device=fwd.cot_mask.device)
    return (fwd.cot_entropy.detach() * fwd.cot_mask).sum() / norms.cot_tokens


def check_aggregation(agg: str) -> str:
    """``agg`` if it is one of AGGREGATIONS (verl's names), else an error that lists them."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    return agg


def regression_reward(expected, target, log_pi_star=None, pi_star=None, lam: float = 0.0, mu: float = 0.0):
    """``-(expected - target)^2 + lam * log_pi_star + mu * pi_star`` (differentiable; pi_star defaults to exp(log_pi_star))."""
    reward = -(expected - target) ** 2
    if lam:
        if log_pi_star is None:
            raise ValueError("lam != 0 needs log_pi_star")
        reward = reward + lam * log_pi_star
    if mu:
        if pi_star is None:
            if log_pi_star is None:
                raise ValueError("mu != 0 needs pi_star or log_pi_star")
            pi_star = log_pi_star.exp()
        reward = reward + mu * pi_star
    return reward


def _rewards_of(fwd: JudgeForward, lam: float, mu: float) -> torch.Tensor:
    # sq_error is (yhat - y*)^2 from the head; the reward reuses it instead of recomputing.
    reward = -fwd.sq_error
    if lam:
        reward = reward + lam * fwd.log_pi_star
    if mu:
        reward = reward + mu * fwd.pi_star
    return reward


def rloo_advantages(rewards: torch.Tensor, normalize=True, clip: Optional[float] = 1.0, eps: float = 1e-6):
    """Leave-one-out advantages ``r_i - mean_{j != i} r_j`` for ``rewards`` ``[B, G]`` (no grad).

    ``normalize``: ``True`` or ``"reward-std"`` divides by the population std of the group's rewards + eps;
    ``"advantage-std"`` by the population std of the group's advantages + eps (the released code);
    ``False`` or ``"none"`` leaves them as they are (see ADVANTAGE_NORMS).  ``clip`` clamps to
    ``[-clip, clip]`` (None: no clipping).
    """
    norm = ("reward-std" if normalize else "none") if isinstance(normalize, bool) else normalize
    if norm not in ADVANTAGE_NORMS:
        raise ValueError(f"normalize must be a bool or one of {ADVANTAGE_NORMS}, got {normalize!r}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a [B, G] tensor, got {getattr(rewards, 'shape', type(rewards))}")
    g = rewards.shape[1]
    if g < 2:
        raise ValueError(f"rewards needs G >= 2 samples per prompt for a leave-one-out baseline, got G = {g}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    with torch.no_grad():
        r = rewards.detach().float()
        baseline = (r.sum(dim=1, keepdim=True) - r) / (g - 1)
        adv = r - baseline
        if norm != "none":
            scale = r if norm == "reward-std" else adv
            adv = adv / (scale.std(dim=1, unbiased=False, keepdim=True) + eps)
        if clip is not None:
            adv = adv.clamp(-clip, clip)
    return adv


def real_advantages(fwd: JudgeForward, group_size: int, *, lam: float = 0.0, mu: float = 0.0,
                    normalize=True, clip: Optional[float] = 1.0, eps: float = 1e-6,
                    prob_bonus: float = 0.0) -> torch.Tensor:
    """[B*G] RLOO advantages of REAL's rewards; keep them to reuse a rollout batch for several epochs.

    ``prob_bonus`` adds the released code's probability-bonus advantage: the leave-one-out advantages
    of ``pi(k*)``, normalised and clipped on their own, times ``prob_bonus`` (the released
    ``beta_supp``).  Unlike ``mu`` (a weight of ``pi(k*)`` inside the reward, differentiated in both
    terms), it moves only the CoT term, not the prediction term.
    """
    return combined_advantages(_rewards_of(fwd, lam, mu).detach(), fwd.pi_star.detach(), group_size,
                               normalize=normalize, clip=clip, eps=eps, prob_bonus=prob_bonus)


def combined_advantages(rewards: torch.Tensor, pi_star: torch.Tensor, group_size: int, *, normalize=True,
                        clip: Optional[float] = 1.0, eps: float = 1e-6, prob_bonus: float = 0.0) -> torch.Tensor:
    """[B*G] RLOO advantages of ``rewards`` plus ``prob_bonus`` times those of ``pi_star`` (each normalised
    and clipped on its own, as the released code adds its probability bonus)."""
    adv = rloo_advantages(_grouped(rewards, group_size), normalize=normalize, clip=clip, eps=eps)
    if prob_bonus:
        bonus = rloo_advantages(_grouped(pi_star, group_size), normalize=normalize, clip=clip, eps=eps)
        adv = adv + prob_bonus * bonus
    return adv.reshape(-1)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} sequences is not a whole number of groups of group_size={group_size}")
    return x.reshape(-1, group_size)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str, norms: LossNorms) -> torch.Tensor:
    """The CoT term aggregated as ``agg`` says (see AGGREGATIONS), over the batch ``norms`` describe."""
    per_token = per_token * mask
    agg = check_aggregation(agg)
    if agg == "seq-mean-token-mean":
        return _mean(per_token.sum(1) / mask.sum(1).clamp(min=1), norms)
    if agg == "seq-mean-token-sum":
        return _mean(per_token.sum(1), norms)
    return per_token.sum() / norms.tokens


def _policy_gradient(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ppo_clip: Optional[float],
    agg: str,
    norms: LossNorms,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped-surrogate policy-gradient term and the fraction of clipped tokens (a detached tensor).

    With no old log-probs the batch is on-policy: the term is ``-A log pi``
    (plain REINFORCE, the gradient the ratio form would give at ratio 1).
    """
    mask = mask.bool()
    adv = advantages.detach().to(logprobs.dtype)[:, None]
    if old_logprobs is None:
        # on-policy: the ratio is 1, its gradient is grad log pi; write the REINFORCE form directly
        return _aggregate(-adv * logprobs, mask, agg, norms), _zero(logprobs)
    old = old_logprobs.detach().to(logprobs.dtype)
    if old.shape != logprobs.shape:
        raise ValueError(f"old_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(old.shape)}")
    ratio = torch.exp((logprobs - old) * mask)
    surrogate = -adv * ratio
    clip_frac = _zero(logprobs)
    if ppo_clip is not None:
        clipped = -adv * ratio.clamp(1.0 - ppo_clip, 1.0 + ppo_clip)
        clip_frac = (((clipped > surrogate) & mask).sum() / norms.action_tokens).detach()
        surrogate = torch.maximum(surrogate, clipped)
    return _aggregate(surrogate, mask, agg, norms), clip_frac


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, agg: str,
           norms: LossNorms) -> torch.Tensor:
    """Low-variance KL(pi || ref) estimator: exp(ref - logp) - (ref - logp) - 1 per token."""
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
    delta = (ref_logprobs.detach().to(logprobs.dtype) - logprobs) * mask
    return _aggregate(torch.exp(delta) - delta - 1, mask.bool(), agg, norms)


def real_loss(
    fwd: JudgeForward,
    group_size: int,
    *,
    beta: float = 1.0,
    lam: float = 0.0,
    mu: float = 0.0,
    agg: str = "seq-mean-token-mean",
    normalize_advantages=True,
    advantage_clip: Optional[float] = 1.0,
    eps: float = 1e-6,
    prob_bonus: float = 0.0,
    advantages: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ppo_clip: Optional[float] = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    tokens_per_row: Optional[float] = None,
    norms: Optional[LossNorms] = None,
) -> Tuple[torch.Tensor, Terms]:
    """REAL: ``mean_i [ -A_i agg_t log pi(c_{i,t}) - beta * r_i ] (+ kl_coef * k3 KL)``.

    ``advantages`` ``[B*G]`` overrides the RLOO advantages of the current
    rewards (pass the first epoch's when reusing a rollout batch, together with
    its ``old_logprobs`` ``[B, T]``); else they are :func:`real_advantages`
    (``normalize_advantages``: see :func:`rloo_advantages`; ``prob_bonus``), and
    ``fwd`` must hold whole groups of ``group_size``.  ``ref_logprobs`` ``[B, T]``
    with ``kl_coef > 0`` adds the k3 KL; it is off by default.  ``norms``: the
    denominators of the batch ``fwd`` is a part of (default: ``fwd`` is the batch;
    ``tokens_per_row``: see :func:`loss_norms`).
    """
    norms = _norms_for(fwd, norms, tokens_per_row)
    rewards = _rewards_of(fwd, lam, mu)
    if advantages is None:
        advantages = combined_advantages(rewards.detach(), fwd.pi_star.detach(), group_size,
                                         normalize=normalize_advantages, clip=advantage_clip, eps=eps,
                                         prob_bonus=prob_bonus)
    elif advantages.shape != rewards.shape:
        raise ValueError(f"advantages must have shape {tuple(rewards.shape)}, got {tuple(advantages.shape)}")
    pg, clip_frac = _policy_gradient(fwd.cot_logprobs, fwd.cot_mask, advantages, old_logprobs, ppo_clip, agg, norms)
    prediction = -_mean(rewards, norms)
    loss = pg + beta * prediction
    kl = torch.zeros((), device=loss.device)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = _k3_kl(fwd.cot_logprobs, ref_logprobs, fwd.cot_mask, agg, norms)
        loss = loss + kl_coef * kl
    terms = {
        "loss": loss.detach(),
        "pg_loss": pg.detach(),
        "prediction_loss": prediction.detach(),
        "reward_mean": _mean(rewards.detach(), norms),
        "sq_error": _mean(fwd.sq_error.detach(), norms),
        "log_pi_star": _mean(fwd.log_pi_star.detach(), norms),
        "expected_score": _mean(fwd.expected_score.detach(), norms),
        "advantage_abs": _mean(advantages.detach().abs(), norms),
        "clip_frac": clip_frac,
        "kl": kl.detach(),
        "entropy": entropy_mean(fwd, norms),
        "cot_tokens": _mean(fwd.cot_token_count.float(), norms),
    }
    return loss, terms


def raft_loss(fwd: JudgeForward, *, norms: Optional[LossNorms] = None) -> Tuple[torch.Tensor, Terms]:
    """RAFT: ``mean (yhat(x) - y*)^2`` at the position right after the prompt (batch built with cots=None)."""
    norms = _norms_for(fwd, norms, None)
    loss = _mean(fwd.sq_error, norms)
    return loss, {"loss": loss.detach(), "sq_error": loss.detach(),
                  "expected_score": _mean(fwd.expected_score.detach(), norms)}


def tract_loss(fwd: JudgeForward, *, lam: float = 1.0, tokens_per_row: Optional[float] = None,
               norms: Optional[LossNorms] = None) -> Tuple[torch.Tensor, Terms]:
    """TRACT / CoT-RAFT: ``CE(c_gt | x) + lam * (yhat(x, c_gt) - y*)^2``, teacher-forced on reference CoTs.

    CE is the mean over all reference-CoT tokens of the batch (the score token
    is not a CoT token, so it is excluded); the regression term is the batch mean.
    ``fwd`` may be a part of a larger batch whose denominators are ``norms``
    (``tokens_per_row``: see :func:`loss_norms`).
    """
    norms = _norms_for(fwd, norms, tokens_per_row)
    ce = -_aggregate(fwd.cot_logprobs, fwd.cot_mask, "token-mean", norms)
    regression = _mean(fwd.sq_error, norms)
    loss = ce + lam * regression
    return loss, {"loss": loss.detach(), "ce": ce.detach(), "sq_error": regression.detach(),
                  "expected_score": _mean(fwd.expected_score.detach(), norms)}


def binary_rewards(decoded_scores: Sequence[Optional[float]], targets: Sequence[float]) -> torch.Tensor:
    """``1[decoded score == round(y*)]`` (halves round up); an unreadable score (None) gets 0."""
    if len(decoded_scores) != len(targets):
        raise ValueError(f"decoded_scores has {len(decoded_scores)} entries but targets has {len(targets)}")
    out = []
    for decoded, target in zip(decoded_scores, targets):
        target = float(target)
        if not math.isfinite(target):
            raise ValueError(f"targets holds {target}: ground-truth scores must be finite")
        out.append(float(decoded is not None and float(decoded) == math.floor(target + 0.5)))
    return torch.tensor(out)


def group_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's ``(r - mean_group) / (std_group + eps)`` for ``rewards`` ``[B, G]`` (sample std, as verl)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2, got {tuple(rewards.shape)}")
    with torch.no_grad():
        r = rewards.detach().float()
        return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)


def grpo_action_mask(cot_mask: torch.Tensor, score_pos: torch.Tensor,
                     sampled_score_index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(actions, at_score)`` ``[B, T]`` bool: GRPO's action tokens (the CoT tokens and the written score
    token) and the score position of the rows whose written score is readable (index >= 0)."""
    if sampled_score_index is None:
        return cot_mask, torch.zeros_like(cot_mask)
    idx = torch.as_tensor(sampled_score_index, device=cot_mask.device).long()
    if idx.shape != score_pos.shape:
        raise ValueError(f"sampled_score_index must have shape {tuple(score_pos.shape)}, got {tuple(idx.shape)}")
    columns = torch.arange(cot_mask.shape[1], device=cot_mask.device)
    at_score = (columns[None, :] == score_pos[:, None]) & (idx >= 0)[:, None]
    return cot_mask | at_score, at_score


def grpo_token_logprobs(fwd: JudgeForward, sampled_score_index: Optional[torch.Tensor]):
    """CoT log-probs with the policy's own sampled score token added at the score position.

    Standard RL rewards the decoded score, so the token that carried it is part
    of the action.  ``sampled_score_index`` ``[B]`` is the index (into the score
    tokens) of the score the policy wrote, -1 when it wrote none / an unreadable one.
    Returns ``(logprobs [B, T], mask [B, T])``; compute old / reference log-probs the same way.
    """
    if sampled_score_index is None:
        return fwd.cot_logprobs, fwd.cot_mask
    mask, at_score = grpo_action_mask(fwd.cot_mask, fwd.score_pos, sampled_score_index)
    idx = torch.as_tensor(sampled_score_index, device=fwd.cot_logprobs.device).long()
    score_lp = fwd.score_logprobs.gather(1, idx.clamp(min=0)[:, None]).squeeze(1)
    logprobs = torch.where(at_score, score_lp[:, None].expand_as(fwd.cot_logprobs), fwd.cot_logprobs)
    return logprobs, mask


def sampled_score_indices(decoded_scores: Sequence[Optional[float]], score_values: Sequence[float]) -> torch.Tensor:
    """[B] index of each decoded score among score_values, -1 when None or not one of them."""
    values = [float(v) for v in score_values]
    return torch.tensor([values.index(float(d)) if d is not None and float(d) in values else -1 for d in decoded_scores])


def grpo_loss(
    fwd: JudgeForward,
    rewards: torch.Tensor,
    group_size: int,
    *,
    sampled_score_index: Optional[torch.Tensor] = None,
    agg: str = "seq-mean-token-mean",
    eps: float = 1e-6,
    advantages: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ppo_clip: Optional[float] = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    tokens_per_row: Optional[float] = None,
    norms: Optional[LossNorms] = None,
) -> Tuple[torch.Tensor, Terms]:
    """Standard RL baseline: GRPO with binary rewards ``[B*G]`` (see :func:`binary_rewards`), PPO clip.

    The judge head's regression outputs are not used in the loss (only reported).
    ``advantages`` ``[B*G]``: the group-normalised rewards computed beforehand (else here, and
    ``fwd`` must hold whole groups).  ``old_logprobs`` / ``ref_logprobs`` are ``[B, T]`` from
    :func:`grpo_token_logprobs`.  ``norms``: as :func:`real_loss`'s, over GRPO's action tokens
    (:func:`grpo_action_mask`).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=fwd.cot_logprobs.device)
    if advantages is None:
        advantages = group_normalized_advantages(_grouped(rewards, group_size), eps=eps).reshape(-1)
    elif advantages.shape != rewards.shape:
        raise ValueError(f"advantages must have shape {tuple(rewards.shape)}, got {tuple(advantages.shape)}")
    logprobs, mask = grpo_token_logprobs(fwd, sampled_score_index)
    norms = _norms_for(fwd, norms, tokens_per_row, action_mask=mask)
    pg, clip_frac = _policy_gradient(logprobs, mask, advantages, old_logprobs, ppo_clip, agg, norms)
    loss = pg
    kl = torch.zeros((), device=loss.device)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = _k3_kl(logprobs, ref_logprobs, mask, agg, norms)
        loss = loss + kl_coef * kl
    return loss, {
        "loss": loss.detach(), "pg_loss": pg.detach(), "reward_mean": _mean(rewards, norms),
        "advantage_abs": _mean(advantages.detach().abs(), norms), "clip_frac": clip_frac, "kl": kl.detach(),
        "sq_error": _mean(fwd.sq_error.detach(), norms), "entropy": entropy_mean(fwd, norms),
        "cot_tokens": _mean(fwd.cot_token_count.float(), norms),
    }


__all__ = [
    "LossNorms", "loss_norms", "entropy_mean", "grpo_action_mask", "AGGREGATIONS", "ADVANTAGE_NORMS", "check_aggregation", "regression_reward", "rloo_advantages", "real_advantages", "combined_advantages",
    "real_loss", "raft_loss", "tract_loss", "binary_rewards", "group_normalized_advantages",
    "grpo_token_logprobs", "sampled_score_indices", "grpo_loss",
]
