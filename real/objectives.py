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
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from real.head import JudgeForward, cot_entropy_mean, judge_forward

# The CoT term's aggregation, named as verl names it (``loss_agg_mode``):
# token-mean: every CoT token of the batch weighs the same (the released REAL code's setting);
# seq-mean-token-sum: the sum over a sequence's tokens, then the mean over sequences;
# seq-mean-token-mean: the mean over a sequence's tokens, then the mean over sequences.
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
RENAMED_AGGREGATIONS = {"sequence-sum": "seq-mean-token-sum", "batch-token-mean": "token-mean"}
# How leave-one-out advantages are scaled within a group: by the std of the group's rewards, by the std of
# the advantages themselves (the released REAL code: A / (std(A) + eps), which is G/(G-1) times smaller), or not.
ADVANTAGE_NORMS = ("reward-std", "advantage-std", "none")


def check_aggregation(agg: str) -> str:
    """``agg`` if it is one of AGGREGATIONS; an old name is an error that names its new one."""
    if agg in RENAMED_AGGREGATIONS:
        raise ValueError(f"loss aggregation {agg!r} was renamed {RENAMED_AGGREGATIONS[agg]!r} (verl's names: "
                         f"{', '.join(AGGREGATIONS)}; 'token-mean' now means every token of the batch weighs the same)")
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


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str,
               tokens_per_row: Optional[float] = None) -> torch.Tensor:
    """The CoT term aggregated as ``agg`` says (see AGGREGATIONS).

    ``tokens_per_row``: for token-mean over a larger batch than this one (a micro-batch, one rank's
    share), that batch's tokens per row; the sum here is then divided by ``rows x tokens_per_row``, so
    that micro-batch losses weighted by their share of rows add up to the whole batch's token mean.
    """
    per_token = per_token * mask
    agg = check_aggregation(agg)
    if agg == "seq-mean-token-mean":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if agg == "seq-mean-token-sum":
        return per_token.sum(1).mean()
    if tokens_per_row is not None:
        return per_token.sum() / max(mask.shape[0] * tokens_per_row, 1e-12)
    return per_token.sum() / mask.sum().clamp(min=1)


def _policy_gradient(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ppo_clip: Optional[float],
    agg: str,
    tokens_per_row: Optional[float] = None,
) -> Tuple[torch.Tensor, float]:
    """Clipped-surrogate policy-gradient term and the fraction of clipped tokens.

    With no old log-probs the batch is on-policy: the term is ``-A log pi``
    (plain REINFORCE, the gradient the ratio form would give at ratio 1).
    """
    mask = mask.bool()
    adv = advantages.detach().to(logprobs.dtype)[:, None]
    if old_logprobs is None:
        # on-policy: the ratio is 1, its gradient is grad log pi; write the REINFORCE form directly
        return _aggregate(-adv * logprobs, mask, agg, tokens_per_row), 0.0
    old = old_logprobs.detach().to(logprobs.dtype)
    if old.shape != logprobs.shape:
        raise ValueError(f"old_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(old.shape)}")
    ratio = torch.exp((logprobs - old) * mask)
    surrogate = -adv * ratio
    clip_frac = 0.0
    if ppo_clip is not None:
        clipped = -adv * ratio.clamp(1.0 - ppo_clip, 1.0 + ppo_clip)
        clip_frac = float(((clipped > surrogate) & mask).sum() / mask.sum().clamp(min=1))
        surrogate = torch.maximum(surrogate, clipped)
    return _aggregate(surrogate, mask, agg, tokens_per_row), clip_frac


def _k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, agg: str,
           tokens_per_row: Optional[float] = None) -> torch.Tensor:
    """Low-variance KL(pi || ref) estimator: exp(ref - logp) - (ref - logp) - 1 per token."""
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs must have shape {tuple(logprobs.shape)}, got {tuple(ref_logprobs.shape)}")
    delta = (ref_logprobs.detach().to(logprobs.dtype) - logprobs) * mask
    return _aggregate(torch.exp(delta) - delta - 1, mask.bool(), agg, tokens_per_row)


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
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """REAL: ``mean_i [ -A_i agg_t log pi(c_{i,t}) - beta * r_i ] (+ kl_coef * k3 KL)``.

    ``advantages`` ``[B*G]`` overrides the RLOO advantages of the current
    rewards (pass the first epoch's when reusing a rollout batch, together with
    its ``old_logprobs`` ``[B, T]``); else they are :func:`real_advantages`
    (``normalize_advantages``: see :func:`rloo_advantages`; ``prob_bonus``).
    ``ref_logprobs`` ``[B, T]`` with ``kl_coef > 0`` adds the k3 KL; it is off
    by default.  ``tokens_per_row``: see ``_aggregate`` (token-mean over a larger batch).
    """
    rewards = _rewards_of(fwd, lam, mu)
    if advantages is None:
        advantages = combined_advantages(rewards.detach(), fwd.pi_star.detach(), group_size,
                                         normalize=normalize_advantages, clip=advantage_clip, eps=eps,
                                         prob_bonus=prob_bonus)
    elif advantages.shape != rewards.shape:
        raise ValueError(f"advantages must have shape {tuple(rewards.shape)}, got {tuple(advantages.shape)}")
    else:
        _grouped(rewards, group_size)
    pg, clip_frac = _policy_gradient(fwd.cot_logprobs, fwd.cot_mask, advantages, old_logprobs, ppo_clip, agg,
                                     tokens_per_row)
    prediction = -rewards.mean()
    loss = pg + beta * prediction
    kl = torch.zeros((), device=loss.device)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = _k3_kl(fwd.cot_logprobs, ref_logprobs, fwd.cot_mask, agg, tokens_per_row)
        loss = loss + kl_coef * kl
    grouped = _grouped(rewards.detach(), group_size)
    terms = {
        "loss": float(loss.detach()),
        "pg_loss": float(pg.detach()),
        "prediction_loss": float(prediction.detach()),
        "reward_mean": float(grouped.mean()),
        "reward_group_std": float(grouped.std(dim=1, unbiased=False).mean()),
        "sq_error": float(fwd.sq_error.detach().mean()),
        "log_pi_star": float(fwd.log_pi_star.detach().mean()),
        "expected_score": float(fwd.expected_score.detach().mean()),
        "advantage_abs": float(advantages.abs().mean()),
        "clip_frac": clip_frac,
        "kl": float(kl.detach()),
        "entropy": cot_entropy_mean(fwd),
        "cot_tokens": float(fwd.cot_token_count.float().mean()),
    }
    return loss, terms


def raft_loss(fwd: JudgeForward) -> Tuple[torch.Tensor, Dict[str, float]]:
    """RAFT: ``mean (yhat(x) - y*)^2`` at the position right after the prompt (batch built with cots=None)."""
    loss = fwd.sq_error.mean()
    return loss, {"loss": float(loss.detach()), "sq_error": float(loss.detach()),
                  "expected_score": float(fwd.expected_score.detach().mean())}


def tract_loss(fwd: JudgeForward, *, lam: float = 1.0,
               tokens_per_row: Optional[float] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """TRACT / CoT-RAFT: ``CE(c_gt | x) + lam * (yhat(x, c_gt) - y*)^2``, teacher-forced on reference CoTs.

    CE is the mean over all reference-CoT tokens of the batch (the score token
    is not a CoT token, so it is excluded); the regression term is the batch mean.
    ``fwd`` may be one micro-batch (or one rank's share) of a larger batch whose
    mean CoT tokens per row is ``tokens_per_row``: CE is then the micro-batch's
    token sum over ``rows x tokens_per_row``, so that micro-batch losses weighted
    by their share of rows add up to the whole batch's token mean.
    """
    ce = -_aggregate(fwd.cot_logprobs, fwd.cot_mask, "token-mean", tokens_per_row)
    regression = fwd.sq_error.mean()
    loss = ce + lam * regression
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "sq_error": float(regression.detach()),
                  "expected_score": float(fwd.expected_score.detach().mean())}


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


def grpo_token_logprobs(fwd: JudgeForward, sampled_score_index: Optional[torch.Tensor]):
    """CoT log-probs with the policy's own sampled score token added at the score position.

    Standard RL rewards the decoded score, so the token that carried it is part
    of the action.  ``sampled_score_index`` ``[B]`` is the index (into the score
    tokens) of the score the policy wrote, -1 when it wrote none / an unreadable one.
    Returns ``(logprobs [B, T], mask [B, T])``; compute old / reference log-probs the same way.
    """
    if sampled_score_index is None:
        return fwd.cot_logprobs, fwd.cot_mask
    idx = torch.as_tensor(sampled_score_index, device=fwd.cot_logprobs.device).long()
    has = idx >= 0
    score_lp = fwd.score_logprobs.gather(1, idx.clamp(min=0)[:, None]).squeeze(1)
    rows = torch.arange(idx.shape[0], device=idx.device)
    at_score = torch.zeros_like(fwd.cot_mask)
    at_score[rows[has], fwd.score_pos[has]] = True
    logprobs = torch.where(at_score, score_lp[:, None].expand_as(fwd.cot_logprobs), fwd.cot_logprobs)
    return logprobs, fwd.cot_mask | at_score


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
    old_logprobs: Optional[torch.Tensor] = None,
    ppo_clip: Optional[float] = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    tokens_per_row: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Standard RL baseline: GRPO with binary rewards ``[B*G]`` (see :func:`binary_rewards`), PPO clip.

    The judge head's regression outputs are not used in the loss (only reported).
    ``old_logprobs`` / ``ref_logprobs`` are ``[B, T]`` from :func:`grpo_token_logprobs`.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32, device=fwd.cot_logprobs.device)
    advantages = group_normalized_advantages(_grouped(rewards, group_size), eps=eps).reshape(-1)
    logprobs, mask = grpo_token_logprobs(fwd, sampled_score_index)
    pg, clip_frac = _policy_gradient(logprobs, mask, advantages, old_logprobs, ppo_clip, agg, tokens_per_row)
    loss = pg
    kl = torch.zeros((), device=loss.device)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = _k3_kl(logprobs, ref_logprobs, mask, agg, tokens_per_row)
        loss = loss + kl_coef * kl
    return loss, {
        "loss": float(loss.detach()), "pg_loss": float(pg.detach()), "reward_mean": float(rewards.mean()),
        "advantage_abs": float(advantages.abs().mean()), "clip_frac": clip_frac, "kl": float(kl.detach()),
        "sq_error": float(fwd.sq_error.detach().mean()), "entropy": cot_entropy_mean(fwd),
        "cot_tokens": float(fwd.cot_token_count.float().mean()),
    }


__all__ = [
    "AGGREGATIONS", "ADVANTAGE_NORMS", "RENAMED_AGGREGATIONS", "check_aggregation", "JudgeForward", "judge_forward", "regression_reward", "rloo_advantages", "real_advantages", "combined_advantages",
    "real_loss", "raft_loss", "tract_loss", "binary_rewards", "group_normalized_advantages",
    "grpo_token_logprobs", "sampled_score_indices", "grpo_loss",
]
