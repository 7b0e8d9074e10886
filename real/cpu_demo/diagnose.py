"""``python -m real.cpu_demo.diagnose CHECKPOINT... --seed S``: why a demo run got the Pearson it got.

The demo's task (``real.judge.synthetic``) has one flaw for RL to fix: the reference
CoTs mark near misses (an answer one off the key) ``yes``.  A run's held-out
Pearson is then set by two things, which this prints for each checkpoint from
greedy CoTs on held-out prompts:

- **the CoT**: how often it says ``yes`` to a right answer, ``no`` to a near
  miss and ``no`` to a far miss, its running-score arithmetic, and how well the
  score it walks to correlates with the labels;
- **the head**: the correlation of the expected score with the labels, and its
  slope on the CoT's score (1: it copies the CoT; below 1: it also reads the
  prompt and discounts the CoT, as a head calibrated on sloppy CoTs learns to).

``--signal`` adds, from ``--group-size`` CoTs sampled per training prompt, how
informative each method's advantages are about the CoT's quality (their
within-group correlation with an oracle reward, ``-(CoT score - E[y|x])^2``,
``real.judge.synthetic.expected_target``), and the gradient norms of REAL's policy
term and of its prediction term on that batch.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from real.judge.synthetic import NO, YES, expected_target, is_near_miss, running_scores
from real.judge.inference import generate_cots
from real.loop.config import make_config
from real.loop.train import Trainer
from real.methods.base import teacher_forced
from real.methods.objectives import (binary_rewards, group_normalized_advantages, real_loss, regression_reward,
                                     rloo_advantages)

_WORD = re.compile(rf"\b({YES}|{NO}|[1-5])\b")


def read_cot(cot: str) -> tuple:
    """``(verdicts, running scores)`` a synthetic-task CoT writes, before its ``[RESULT]``."""
    words = _WORD.findall(cot.split("[RESULT]")[0])
    return [w == YES for w in words if w in (YES, NO)], [int(w) for w in words if w not in (YES, NO)]


def verdict_stats(examples, cots: Sequence[str]) -> Dict[str, float]:
    """Verdict rates by kind of answer, arithmetic errors, and the CoT's final score per example."""
    counts = {k: [0, 0] for k in ("right_yes", "near_miss_no", "far_no")}
    arith = [0, 0]
    finals = []
    for ex, cot in zip(examples, cots):
        verdicts, scores = read_cot(cot)
        for ok, key, answer in zip(verdicts, ex.meta["key"], ex.meta["answers"]):
            kind = "right_yes" if key == answer else "near_miss_no" if is_near_miss(key, answer) else "far_no"
            counts[kind][0] += ok if kind == "right_yes" else not ok
            counts[kind][1] += 1
        walked = running_scores(verdicts)
        arith[0] += sum(a != b for a, b in zip(walked, scores))
        arith[1] += min(len(walked), len(scores))
        finals.append(float(scores[-1]) if scores else float("nan"))
    out = {k: (hit / n if n else float("nan")) for k, (hit, n) in counts.items()}
    out["arithmetic_errors"] = arith[0] / arith[1] if arith[1] else float("nan")
    out["finals"] = np.array(finals)
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    keep = ~(np.isnan(a) | np.isnan(b))
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 2 else float("nan")


def checkpoint_report(trainer, examples) -> Dict[str, float]:
    """Greedy CoTs of ``examples`` from the trainer's model: the CoT and head figures of the module docstring."""
    trainer.model.eval()
    prompts = [e.prompt for e in examples]
    with torch.no_grad():
        cots = [c[0] for c in generate_cots(trainer.model, trainer.tokenizer, prompts, n=1, greedy=True,
                                            top_p=1.0, max_new_tokens=trainer.config.max_new_tokens,
                                            batch_size=len(prompts), progress=False, marker=trainer.scale.marker)]
        fwd = trainer.forward(teacher_forced(trainer, prompts, cots, [e.target for e in examples], quiet=True),
                              entropy=False)
    stats = verdict_stats(examples, cots)
    finals = stats.pop("finals")
    yhat = fwd.expected_score.float().numpy()
    y = np.array([e.target for e in examples])
    keep = ~np.isnan(finals)
    slope = float(np.polyfit(finals[keep], yhat[keep], 1)[0]) if keep.sum() > 2 else float("nan")
    return dict(stats, cot_pearson=_corr(finals, y), pearson=_corr(yhat, y), head_slope=slope)


def signal_report(trainer, examples, group_size: int) -> Dict[str, float]:
    """How well REAL's and GRPO's advantages rank sampled CoTs by quality, and REAL's two gradient norms."""
    cfg = trainer.config
    p, g = len(examples), group_size
    trainer.model.train()
    rollouts = trainer.engine.generate(trainer.model, [e.prompt for e in examples], g, seed=cfg.seed, with_score=True)
    targets = [e.target for e in examples for _ in range(g)]
    oracle = np.array([expected_target(e) for e in examples for _ in range(g)])
    finals = np.array([(read_cot(c)[1] or [0])[-1] for c in rollouts.cots], dtype=float)
    quality = (-(finals - oracle) ** 2).reshape(p, g)
    batch = teacher_forced(trainer, rollouts.prompts, rollouts.cots, targets, quiet=True)
    fwd = trainer.forward(batch, entropy=False)
    rewards = regression_reward(fwd.expected_score, fwd.targets).detach().view(p, g)
    advantages = {
        "real_reward_std": rloo_advantages(rewards, normalize="reward-std", clip=cfg.method_config.adv_clip),
        "real_no_norm": rloo_advantages(rewards, normalize="none", clip=None),
        "grpo_binary": group_normalized_advantages(binary_rewards(rollouts.decoded_scores, targets).view(p, g)),
    }
    varied = quality.std(axis=1) > 1e-9
    out: Dict[str, float] = {"groups_with_a_better_cot": float(varied.mean())}
    for name, adv in advantages.items():
        a = adv.numpy()
        cors = [np.corrcoef(a[i], quality[i])[0, 1] for i in range(p) if varied[i] and a[i].std() > 1e-9]
        out[f"{name}_corr"] = float(np.mean(cors)) if cors else float("nan")
        out[f"{name}_abs_informative"] = float(np.abs(a[varied]).mean()) if varied.any() else float("nan")
        out[f"{name}_abs_uninformative"] = float(np.abs(a[~varied]).mean()) if (~varied).any() else float("nan")
    params = trainer.trainable

    def grad_norm(loss) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None)))

    policy, _ = real_loss(fwd, g, beta=0.0, advantages=advantages["real_reward_std"].reshape(-1), ppo_clip=None,
                          agg=cfg.method_config.loss_agg)
    out["grad_policy_term"] = grad_norm(policy)
    out["grad_prediction_term_beta1"] = grad_norm(fwd.sq_error.mean())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m real.cpu_demo.diagnose", description=__doc__.split("\n\n")[0] + " " +
                                "Prints, per checkpoint of a `real demo` run, what its greedy CoTs get right and "
                                "how much its head trusts them (see the module docstring).")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders of a demo run (e.g. runs/demo/real/checkpoint-300)")
    p.add_argument("--seed", type=int, default=0, help="the demo's seed: picks the same task data (default: 0)")
    p.add_argument("--eval-size", type=int, default=256, help="held-out prompts (default: 256)")
    p.add_argument("--signal", action="store_true", help="also the reward signal and gradient norms on sampled CoTs")
    p.add_argument("--prompts", type=int, default=64, help="training prompts for --signal (default: 64)")
    p.add_argument("--group-size", type=int, default=8, help="sampled CoTs per prompt for --signal (default: 8)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore")
    for path in args.checkpoints:
        with tempfile.TemporaryDirectory() as out:
            try:
                cfg = make_config(method="real", model="tiny", data=["synthetic"], seed=args.seed, init_from=path,
                                  synthetic_eval_size=args.eval_size, eval_size=args.eval_size, max_new_tokens=32,
                                  group_size=args.group_size, prompts_per_step=args.prompts, output_dir=out,
                                  overwrite=True, progress=False)
                trainer = Trainer(cfg, log=lambda msg: None)
            except (ValueError, FileNotFoundError) as exc:
                print(f"demo_diagnose: error: {exc}", file=sys.stderr)
                return 2
            r = checkpoint_report(trainer, trainer.eval_examples[: args.eval_size])
            print(f"{path}: right->yes {r['right_yes']:.2f}, near miss->no {r['near_miss_no']:.2f}, far miss->no "
                  f"{r['far_no']:.2f}, arithmetic errors {r['arithmetic_errors']:.3f}; Pearson of the CoT's score "
                  f"{100 * r['cot_pearson']:.1f}, of the expected score {100 * r['pearson']:.1f}; head slope on the "
                  f"CoT's score {r['head_slope']:.2f}")
            if args.signal:
                s = signal_report(trainer, trainer.train_examples[: args.prompts], args.group_size)
                print(f"  sampled CoTs: {100 * s['groups_with_a_better_cot']:.0f}% of groups hold CoTs of different "
                      "quality; within-group correlation of the advantages with the oracle reward: " + ", ".join(
                          f"{k} {s[k + '_corr']:+.2f} (|A| {s[k + '_abs_informative']:.2f} where a CoT is better, "
                          f"{s[k + '_abs_uninformative']:.2f} where none is)"
                          for k in ("real_reward_std", "real_no_norm", "grpo_binary")))
                print(f"  gradient norms: REAL policy term {s['grad_policy_term']:.3f}, prediction term "
                      f"{s['grad_prediction_term_beta1']:.3f} x beta")
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
