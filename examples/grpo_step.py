"""A plain PyTorch GRPO-style step with ``real_kernels`` as the loss backend.

What a hand-written RL loop looks like when the log-probs come from the fused
head instead of ``model(...).logits``: the decoder runs to hidden states, and
``real_kernels.hf`` sends them with the LM-head weight through
``linear_logprobs`` / ``judge_head``, so no ``[batch, tokens, vocab]`` logits
are ever built, in the forward or the backward.

One step:

1. sample ``--group-size`` completions (feedback) per grading prompt;
2. reward each one with the judge's own regression reward: append the score
   marker, read the expected score ``sum_k p_k v_k`` at the score position
   (``real_kernels.hf.judge_outputs``, under ``torch.no_grad()``) and score
   ``-(expected - target)^2`` (REAL's reward with lambda = 0, score
   distribution renormalised over the score tokens);
3. group-normalised advantages ``(r - mean) / (std + eps)`` per prompt;
4. old-policy log-probs under ``torch.no_grad()`` (``real_kernels.hf.token_logprobs``);
5. ``--epochs`` passes of the PPO-clipped surrogate, token-mean over the
   completion tokens, gradient clipping, an AdamW step.

Run it on the built-in tiny random judge (no download; a few seconds on a CPU):

    python examples/grpo_step.py --steps 2
    python examples/grpo_step.py --model /path/to/Qwen3-0.6B --device cuda --group-size 8

The loss code (``policy_loss``, ``completion_logprobs``) only needs torch and
``real_kernels``; prompts, the tiny model and the score tokens come from
``real`` for convenience.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from real_kernels.hf import judge_outputs, token_logprobs

DEMO_ITEMS = (
    ("Explain why the sky is blue.", "Because of Rayleigh scattering of sunlight by air molecules.", 4.33),
    ("Give the capital of Australia.", "Sydney is the capital of Australia.", 1.67),
)
DEMO_RUBRIC = "Is the response correct, clear and complete?"


@dataclass
class Rollouts:
    """Prompt + completion token rows of one step, right-padded."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    completion_mask: torch.Tensor  # [R, T-1] True where row t predicts a completion token t+1
    prompt_lens: List[int]
    completions: List[List[int]]  # completion token ids (eos excluded)
    group: torch.Tensor  # [R] index of the prompt each row answers


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: Sequence[str], *, group_size: int, max_new_tokens: int,
                    temperature: float, top_p: float) -> Rollouts:
    """``group_size`` sampled completions per prompt (transformers ``generate``), re-packed right-padded."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation continues from the right edge
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    model.eval()
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         num_return_sequences=group_size, pad_token_id=tokenizer.pad_token_id)
    width = enc["input_ids"].shape[1]
    rows, prompt_lens, completions = [], [], []
    for r in range(out.shape[0]):
        p = r // group_size
        prompt = enc["input_ids"][p][enc["attention_mask"][p].bool()].tolist()
        completion = out[r, width:].tolist()
        if tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]  # keep the eos: it was sampled
        completion = [t for t in completion if t != tokenizer.pad_token_id] or [tokenizer.eos_token_id]
        rows.append(prompt + completion)
        prompt_lens.append(len(prompt))
        completions.append([t for t in completion if t != tokenizer.eos_token_id])
    ids, mask = _right_pad(rows, tokenizer.pad_token_id, device)
    completion_mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
    for i, (row, plen) in enumerate(zip(rows, prompt_lens)):
        completion_mask[i, plen - 1: len(row) - 1] = True  # row t predicts token t+1
    group = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    return Rollouts(ids, mask, completion_mask, prompt_lens, completions, group)


@torch.no_grad()
def regression_rewards(model, tokenizer, rollouts: Rollouts, targets: torch.Tensor, *, score_token_ids,
                       score_values, marker_id: int, normalize: bool = True) -> torch.Tensor:
    """``-(expected score - target)^2`` at the score position after each completion + the score marker.

    ``normalize`` renormalises the score distribution over the score tokens
    (an untrained model puts almost no mass on them, so its full-vocabulary
    expected score is near 0 whatever it wrote).
    """
    device = rollouts.input_ids.device
    rows = [rollouts.input_ids[i, : plen].tolist() + comp + [marker_id]
            for i, (plen, comp) in enumerate(zip(rollouts.prompt_lens, rollouts.completions))]
    ids, mask = _right_pad(rows, tokenizer.pad_token_id, device)
    score_pos = torch.tensor([len(r) - 1 for r in rows], device=device)  # the marker: its next token is the score
    out = judge_outputs(model, ids, mask, targets[rollouts.group], score_token_ids, score_values, score_pos=score_pos,
                        normalize=normalize)
    return -out.sq_error


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, over the group's std (+eps)."""
    adv = torch.empty_like(rewards)
    for g in group.unique():
        sel = group == g
        r = rewards[sel]
        adv[sel] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return adv



def completion_logprobs(model, rollouts: Rollouts, *, temperature: float = 1.0, backend: str = "auto"):
    """Log-probs ``[R, T-1]`` (0 off the completion) and entropies of the completion tokens, via the fused head."""
    out = token_logprobs(model, rollouts.input_ids, rollouts.attention_mask, token_mask=rollouts.completion_mask,
                         temperature=temperature, return_entropy=True, backend=backend)
    return out.logprobs, out.entropy


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float) -> tuple:
    """PPO-clipped surrogate, token-mean over the completion tokens; returns (loss, clip fraction)."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    m = mask.float()
    loss = -(surrogate * m).sum() / m.sum().clamp_min(1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, ((clipped * m).sum() / m.sum().clamp_min(1)).item()


def grpo_step(model, tokenizer, optimizer, prompts: Sequence[str], targets: torch.Tensor, *, score_token_ids,
              score_values, marker_id: int, group_size: int = 4, max_new_tokens: int = 32, temperature: float = 1.0,
              top_p: float = 1.0, clip_eps: float = 0.2, epochs: int = 1, max_grad_norm: float = 1.0,
              backend: str = "auto") -> Dict[str, float]:
    rollouts = sample_rollouts(model, tokenizer, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p)
    rewards = regression_rewards(model, tokenizer, rollouts, targets, score_token_ids=score_token_ids,
                                 score_values=score_values, marker_id=marker_id)
    advantages = group_advantages(rewards, rollouts.group)
    with torch.no_grad():  # the behaviour policy: reference log-probs without a graph
        old_logprobs, _ = completion_logprobs(model, rollouts, temperature=temperature, backend=backend)
    model.train()
    stats: Dict[str, float] = {}
    for _ in range(epochs):
        new_logprobs, entropy = completion_logprobs(model, rollouts, temperature=temperature, backend=backend)
        loss, clip_frac = policy_loss(new_logprobs, old_logprobs, advantages, rollouts.completion_mask, clip_eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        m = rollouts.completion_mask
        stats = {
            "loss": loss.item(), "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
            "entropy": (entropy[m].mean().item() if m.any() else 0.0), "clip_frac": clip_frac,
            "grad_norm": float(grad_norm), "completion_tokens": int(m.sum()),
        }
    model.eval()
    return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A plain PyTorch GRPO-style step with real_kernels as the loss "
                                                 "backend (no [B, T, V] logits).")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, built on the spot) or a local model folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps (default 2)")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="completion length cap (default 24)")
    parser.add_argument("--epochs", type=int, default=1, help="optimisation passes over each batch (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon (default 0.2)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling and log-prob temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: the exact policy)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"),
                        help="real_kernels backend (default auto: triton on CUDA, torch on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "group_size", "max_new_tokens", "epochs"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    from real.judge.prompts import SCORE_MARKER, render_prompt, resolve_score_token_ids
    from real.model.loading import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    score_ids = resolve_score_token_ids(tokenizer)
    marker_id = tokenizer.convert_tokens_to_ids(SCORE_MARKER)
    if marker_id is None or marker_id == tokenizer.unk_token_id:
        marker_id = tokenizer(SCORE_MARKER, add_special_tokens=False)["input_ids"][-1]
    prompts = [render_prompt(q, a, DEMO_RUBRIC) for q, a, _ in DEMO_ITEMS]
    targets = torch.tensor([t for _, _, t in DEMO_ITEMS], device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        stats = grpo_step(model, tokenizer, optimizer, prompts, targets, score_token_ids=score_ids,
                          score_values=[1.0, 2.0, 3.0, 4.0, 5.0], marker_id=marker_id, group_size=args.group_size,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          clip_eps=args.clip, epochs=args.epochs, backend=args.backend)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
