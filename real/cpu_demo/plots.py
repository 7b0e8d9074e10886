"""``curves.png`` of ``real demo``: the warm-up and the RL phase each on an axis fitted to it.

Four panels: held-out Pearson and held-out MSE (RAIL, greedy CoT), for the
warm-up (steps from scratch) and for the branches that start from the warm-up
checkpoint (steps after the branch point, which is labelled; values as the
change since that point, so seeds whose warm-ups ended at different levels
share one axis).  The RL phase gets its own panels because its differences (a
few points of Pearson) vanish on an axis sized for the warm-up's climb from 0.  With several seeds each
curve is the mean over seeds with a band from the lowest to the highest seed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

WARMUPS = ("warmup_cot", "warmup")
LABELS = {"warmup_cot": "TRACT warm-up, CoT stage", "warmup": "TRACT warm-up, score stage", "real": "REAL",
          "grpo": "GRPO (binary reward)", "tract": "TRACT continued (control)", "raft": "RAFT"}
COLOURS = {"warmup_cot": "tab:gray", "warmup": "black", "real": "tab:red", "grpo": "tab:blue", "tract": "tab:green",
           "raft": "tab:purple"}


def _evals(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in records if r.get("type") == "eval" and r.get("pearson") is not None]


def _curve(seed_runs: List[Dict[str, List[Dict[str, Any]]]], name: str, start_from: Optional[str],
           untrained: List[Optional[Dict[str, Any]]], metric: str, relative: bool = False):
    """(steps, [seeds x steps] values) of one run's held-out metric, each seed's curve starting at its start
    (``relative``: minus that start, so a seed's curve shows what the run changed)."""
    per_seed = []
    for runs, first in zip(seed_runs, untrained):
        evals = _evals(runs.get(name, []))
        if start_from is None:
            start = dict(first, step=0) if first and first.get(metric) is not None else None
        else:
            before = _evals(runs.get(start_from, []))
            start = dict(before[-1], step=0) if before else None
        points = ([start] if start else []) + evals
        per_seed.append({r["step"]: r.get(metric) for r in points if r.get(metric) is not None})
    steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
    values = np.array([[c[s] for s in steps] for c in per_seed], dtype=float)
    if relative and steps and steps[0] == 0:
        values = values - values[:, :1]
    return steps, values


def plot_curves(path: str, seed_runs: List[Dict[str, List[Dict[str, Any]]]], warmup_steps: int,
                untrained: List[Optional[Dict[str, Any]]]) -> None:
    """``seed_runs``: per seed, run name -> its metrics.jsonl records; ``warmup_steps``: where the branches start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    names = [n for n in LABELS if any(n in runs for runs in seed_runs)]
    seeds = len(seed_runs)
    for col, phase in enumerate(("warm-up", "rl")):
        for row, metric in enumerate(("pearson", "mse")):
            ax = axes[row, col]
            for name in names:
                if (name in WARMUPS) != (phase == "warm-up"):
                    continue
                start_from = {"warmup_cot": None, "warmup": "warmup_cot"}.get(name, "warmup")
                steps, values = _curve(seed_runs, name, start_from, untrained, metric, relative=phase == "rl")
                if not steps:
                    continue
                offset = {"warmup": _last_step(seed_runs, "warmup_cot")}.get(name, 0)
                xs = [offset + s for s in steps]
                mean = values.mean(axis=0)
                ax.plot(xs, mean, marker="o", markersize=3, color=COLOURS[name],
                        label=LABELS[name] + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
                if seeds > 1:
                    ax.fill_between(xs, values.min(axis=0), values.max(axis=0), color=COLOURS[name], alpha=0.15)
            if phase == "rl":
                ax.axvline(0, color="black", linestyle=":", linewidth=1)
                ax.annotate(f"branch point: warm-up checkpoint (step {warmup_steps})", xy=(0, 0.95),
                            xycoords=("data", "axes fraction"), xytext=(4, 0), textcoords="offset points",
                            fontsize=8)
                ax.set_xlabel("steps after the branch point (all branches start from the same warm-up checkpoint)")
            else:
                ax.set_xlabel("warm-up step (from scratch)")
            label = "held-out Pearson" if metric == "pearson" else "held-out MSE of the expected score"
            if phase == "rl":
                label = "change since the branch point"
                ax.axhline(0, color="black", linewidth=0.8)
            elif metric == "mse":
                ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8, loc="lower left" if phase == "rl" else "best")
    axes[0, 0].set_title("warm-up: held-out correlation (RAIL, greedy CoT)")
    axes[0, 1].set_title("after the warm-up: change in held-out correlation (own axis)")
    axes[1, 0].set_title("warm-up: held-out MSE")
    axes[1, 1].set_title("after the warm-up: change in held-out MSE (lower is better)")
    axes[0, 1].set_ylabel("change in held-out Pearson since the branch point")
    axes[1, 1].set_ylabel("change in held-out MSE since the branch point")
    band = f"; band: lowest to highest of {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"real demo: held-out metrics{band}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _last_step(seed_runs, name: str) -> int:
    steps = [r["step"] for runs in seed_runs for r in runs.get(name, []) if r.get("step") is not None]
    return max(steps) if steps else 0
