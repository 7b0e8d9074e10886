"""Running the demo's stages: worker processes, one progress bar per stage, and the time estimate.

Every stage of ``real demo`` is a plain ``real train`` run (``run_phase``) in a
worker process: the warm-up stages one after the other, then the branches that
start from the warm-up side by side.  The main process draws a bar per stage by
counting the ``"train"`` lines that the run appends to its ``metrics.jsonl``
after each step, so the workers need no channel back; bars show on a terminal
only (``tqdm``'s ``disable=None``), the ``[demo]`` lines always.

The estimate printed at the start is a cost model, ``seconds = start-up +
steps x (a + b x rows)`` per stage, with ``a`` and ``b`` measured on a quiet
2-core machine, one thread per process (``COST_S``), and the branches packed
onto ``--jobs`` processes longest first, as the pool runs them.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Dict, List, Sequence, Tuple

from tqdm.auto import tqdm

from real.methods import METHODS
from real.loop.run_dir import METRICS_FILE

# (per step, per row of the step's batch) seconds; rows are prompts x sampled CoTs for the RL methods.
COST_S = {"tract": (0.019, 0.00107), "raft": (0.010, 0.00040), "real": (0.02, 0.0034), "grpo": (0.02, 0.0041)}
START_S = 4.0  # a worker's imports and model build, and the final evaluation
# Warm-up stage 1's reference-CoT cross-entropy, mean of its last COT_WINDOW steps: a plateau near 0.16 until the
# tiny model finds the CoT's pattern (after 250 to 700 steps, by seed), then a drop to about 0.05.
COT_LEARNED_CE, COT_WINDOW, COT_EXTEND_STEPS = 0.08, 50, 100


def stage_seconds(cfg) -> float:
    """Expected seconds of one stage on a quiet core (``cfg``: its ``TrainConfig``)."""
    per_step, per_row = COST_S.get(cfg.method, COST_S["real"])
    rows = cfg.prompts_per_step * (cfg.group_size if METHODS[cfg.method].needs_rollouts else 1)
    return START_S + cfg.steps * (per_step + per_row * rows)


def packed_seconds(seconds: Sequence[float], jobs: int) -> float:
    """Wall time of independent stages on ``jobs`` processes, each taking the next stage when it is free."""
    loads = [0.0] * max(1, jobs)
    for s in seconds:  # submitted longest first (see run_stages' callers), so this is the pool's own order
        loads[loads.index(min(loads))] += s
    return max(loads)


def estimate_seconds(warmups, branches, jobs: int) -> float:
    """Expected wall time of the demo: the warm-up stages in a row, then the branches side by side."""
    return (sum(stage_seconds(cfg) for _, cfg, _ in warmups)
            + packed_seconds(sorted((stage_seconds(cfg) for _, cfg, _ in branches), reverse=True), jobs))


def steps_done(output_dir: str) -> int:
    """Training steps a running stage has logged so far (its ``metrics.jsonl`` ``"train"`` lines)."""
    try:
        with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as fh:
            return sum('"type": "train"' in line for line in fh)
    except OSError:
        return 0


def tail_ce(records: Sequence[dict]) -> float:
    """Mean reference-CoT cross-entropy of the last ``COT_WINDOW`` training steps (inf when none logged one)."""
    ce = [r["ce"] for r in records if r.get("type") == "train" and r.get("ce") is not None][-COT_WINDOW:]
    return sum(ce) / len(ce) if ce else float("inf")


def cot_learned(records: Sequence[dict]) -> bool:
    return tail_ce(records) < COT_LEARNED_CE


def run_stages(pool: ProcessPoolExecutor, stages: List[Tuple[str, object, str]], worker: Callable,
               on_done: Callable, threads: int, first_eval: Sequence[str] = ()) -> None:
    """Run ``stages`` ``[(name, TrainConfig, label)]`` on ``pool`` (``worker(config dict, threads,
    evaluate_first)``), a bar per stage; ``on_done(name, result)`` as each one finishes."""
    bars: Dict[str, tqdm] = {}
    futures = {}
    for i, (name, cfg, label) in enumerate(stages):
        bars[name] = tqdm(total=cfg.steps, desc=f"{label:<34}", unit="step", position=i, leave=True,
                          file=sys.stderr, disable=None, dynamic_ncols=True)
        futures[pool.submit(worker, cfg.to_dict(), threads, name in first_eval)] = (name, cfg)
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for name, cfg, _ in stages:
                bar = bars[name]
                n = min(steps_done(cfg.output_dir), cfg.steps)
                if n > bar.n:
                    bar.update(n - bar.n)
            for future in done:
                name, cfg = futures[future]
                result = future.result()
                bars[name].update(cfg.steps - bars[name].n)
                bars[name].close()
                on_done(name, result)
    finally:
        for bar in bars.values():
            bar.close()


def make_pool(jobs: int) -> ProcessPoolExecutor:
    """Worker processes for the stages (spawned: a fresh interpreter, no forked torch threads)."""
    return ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=multiprocessing.get_context("spawn"))


def format_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
