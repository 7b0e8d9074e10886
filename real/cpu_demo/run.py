"""`real demo`: REAL against its baselines on the synthetic judge task, on a CPU, in minutes.

What it runs (every phase is a plain ``real train`` run, its folder under
``--output-dir``):

1. ``warmup_cot/``  TRACT on the reference CoTs from a random tiny Qwen3, with
   a small regression weight (in a model this small, a large one stops the
   CoT from being learned);
2. ``warmup/``      TRACT continued with regression weight 1, to calibrate the
   score head: the warm-up every method below starts from;
3. ``real/``        REAL (rollouts, regression reward, prediction term);
4. ``grpo/``        binary-reward GRPO, same prompts and rollout budget;
5. ``raft/``       RAFT, the paper's other baseline: regression on the labels
   with no CoT, the same labelled prompts per step and steps as REAL;
6. ``tract/``       a control: the warm-up continued with the same labelled
   prompts per step, steps and learning rate as REAL (the same label budget;
   is a gain from RL, or just from more supervised training?).

Every stage runs in a worker process (``real.cpu_demo.stages``: a progress bar per
stage, and the expected total time printed first); steps 3-6 start from the
same checkpoint and run side by side (``--jobs`` processes, one thread each by
default: the tiny model's ops are too small to split across threads).

The synthetic task (``real.judge.synthetic``) is built so that a CoT helps (the grade
is a clipped running score, which depends on the order of right and wrong
answers), labels are noisy means of three grades, and the reference CoTs
over-score near misses while the labels do not: imitation learns the flaw,
training on the labels through the model's own CoTs can unlearn it.

It prints held-out Pearson / Spearman / Kendall (RAIL: expected score after a
greedy CoT) for the untrained model and after each phase, and writes
``results.json`` (the table, timings, settings) and ``curves.png`` (held-out
Pearson and MSE, the warm-up and the branches on their own axes: ``real.cpu_demo.plots``).
``--seeds 0 1 2 --report DIR`` runs it once per seed and writes one markdown
table with mean +- std over the seeds, and the figures (``real.cpu_demo.report``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from real.methods import METHODS
from real.judge.metrics import json_safe
from real.cpu_demo.report import write_report
from real.cpu_demo.stages import (COT_EXTEND_STEPS, cot_learned, COT_LEARNED_CE, estimate_seconds, format_minutes,
                                  make_pool, run_stages, stage_seconds, tail_ce)
from real.loop.config import make_config
from real.loop.run_dir import METRICS_FILE, read_metrics
from real.loop.train import Trainer

DEFAULTS = dict(
    cot_steps=600, max_cot_steps=1200, score_steps=30, warmup_batch=128, warmup_lr=3e-3, score_lr=1e-3, cot_beta=0.02,
    rl_steps=300, rl_prompts=16, group_size=8, rl_lr=1e-4, rl_beta=0.1, rl_adv_norm="none", raft_lr=1e-3,
    eval_every=50, eval_size=256, train_size=4096, max_new_tokens=32,
)
QUICK = dict(
    cot_steps=8, max_cot_steps=8, score_steps=4, warmup_batch=16, warmup_lr=3e-3, score_lr=1e-3, cot_beta=0.02,
    rl_steps=3, rl_prompts=2, group_size=4, rl_lr=1e-4, rl_beta=0.1, rl_adv_norm="none", raft_lr=1e-3,
    eval_every=3, eval_size=16, train_size=128, max_new_tokens=20,
)
ROWS = (("untrained", "untrained (random tiny Qwen3)"), ("warmup", "after warm-up (TRACT)"),
        ("real", "after REAL"), ("grpo", "after GRPO (binary reward)"), ("raft", "after RAFT (no CoT)"),
        ("tract", "warm-up continued (TRACT)"))


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="real demo",
        description="Train a tiny judge from scratch on the synthetic judge task (real.judge.synthetic): a TRACT warm-up "
                    "on reference CoTs, then REAL and, for comparison, binary-reward GRPO and more TRACT from the "
                    "same warm-up. Prints held-out Pearson/Spearman/Kendall; writes results.json and curves.png. "
                    "A few minutes on 2 CPU cores.")
    p.add_argument("--output-dir", default="runs/demo", help="where the runs, results.json and curves.png go "
                   "(default: runs/demo; an earlier demo there is replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task data, the model and sampling (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", help="run the whole demo once per seed (OUTPUT_DIR/seed-S) "
                   "instead of --seed")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.md (per-seed and mean +- std table, run "
                   "times, the command and the commit) and DIR/curves.png (mean and band over the seeds)")
    p.add_argument("--quick", action="store_true", help="a drastically shortened run (seconds; for tests, the "
                   "numbers mean nothing)")
    p.add_argument("--cot-steps", type=int, help="warm-up stage 1: TRACT steps with a small regression weight, "
                   f"to learn the CoT (default: {d['cot_steps']})")
    p.add_argument("--max-cot-steps", type=int, help="warm-up stage 1 goes on past --cot-steps, 100 steps at a time, "
                   "until the reference-CoT cross-entropy of its last 50 steps is below "
                   f"0.08 (the CoT is learned), up to this many steps (default: {d['max_cot_steps']})")
    p.add_argument("--cot-beta", type=float, help="regression weight of warm-up stage 1 (default: "
                   f"{d['cot_beta']}; at 0.1 and above the tiny model stops learning the CoT)")
    p.add_argument("--score-steps", type=int, help="warm-up stage 2: TRACT steps with regression weight 1, to "
                   f"calibrate the score (default: {d['score_steps']}; a longer stage teaches the head to discount "
                   "the sloppy CoTs from the prompt, which every branch then has to unlearn)")
    p.add_argument("--warmup-batch", type=int, help=f"prompts per warm-up step (default: {d['warmup_batch']})")
    p.add_argument("--warmup-lr", type=float, help=f"learning rate of warm-up stage 1 (default: {d['warmup_lr']})")
    p.add_argument("--score-lr", type=float, help=f"learning rate of warm-up stage 2 (default: {d['score_lr']})")
    p.add_argument("--rl-steps", type=int, help=f"REAL / GRPO / control steps (default: {d['rl_steps']})")
    p.add_argument("--rl-prompts", type=int, help=f"prompts per REAL / GRPO / control step (default: "
                   f"{d['rl_prompts']})")
    p.add_argument("--group-size", type=int, help=f"sampled CoTs per prompt (default: {d['group_size']})")
    p.add_argument("--rl-lr", type=float, help=f"REAL / GRPO / control learning rate (default: {d['rl_lr']})")
    p.add_argument("--rl-beta", type=float, help=f"weight of REAL's prediction term (default: {d['rl_beta']}; its "
                   "gradient is 20 to 50 times the policy term's per unit weight at the warm-up: python -m real.cpu_demo.diagnose)")
    p.add_argument("--rl-adv-norm", choices=("none", "reward-std", "advantage-std"), help="REAL's advantage "
                   f"normalisation (default: {d['rl_adv_norm']}: dividing by the group's spread turns the tiny reward "
                   "differences of equally good CoTs into full-size advantages, and REAL then drifted on seed 2)")
    p.add_argument("--eval-every", type=int, help=f"held-out evaluation every N steps, for the curves "
                   f"(default: {d['eval_every']})")
    p.add_argument("--eval-size", type=int, help=f"held-out examples (default: {d['eval_size']})")
    p.add_argument("--train-size", type=int, help=f"training examples (default: {d['train_size']})")
    p.add_argument("--jobs", type=int, default=2, help="processes for the runs that start from the warm-up (REAL, "
                   "GRPO, control), each on --threads threads (default: 2)")
    p.add_argument("--raft-lr", type=float, help="learning rate of the RAFT baseline (default: "
                   f"{d['raft_lr']}, the warm-up's score stage's; at the RL rate it barely moves)")
    p.add_argument("--no-raft", action="store_true", help="skip the RAFT baseline run")
    p.add_argument("--no-control", action="store_true", help="skip the 'warm-up continued (TRACT)' control run")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1: the tiny model's ops are "
                   "too small to split, and one thread does not stall when other work shares the CPU)")
    return p


def _settings(args) -> Dict[str, Any]:
    base = dict(QUICK if args.quick else DEFAULTS)
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return base


def phase_configs(s: Dict[str, Any], out: str, seed: int, control: bool = True, raft: bool = True):
    """The demo's runs in order: ``(name, TrainConfig, step offset on the curves)``."""
    common = dict(model="tiny", data=["synthetic"], seed=seed, synthetic_train_size=s["train_size"],
                  synthetic_eval_size=s["eval_size"], eval_size=s["eval_size"], max_new_tokens=s["max_new_tokens"],
                  eval_every=s["eval_every"], progress=False, overwrite=True)
    sft = dict(method="tract", prompts_per_step=s["warmup_batch"], **common)
    cot_dir, warm_dir = os.path.join(out, "warmup_cot"), os.path.join(out, "warmup")
    warm_ckpt = os.path.join(warm_dir, f"checkpoint-{s['score_steps']}")
    branch = dict(steps=s["rl_steps"], prompts_per_step=s["rl_prompts"], init_from=warm_ckpt, **common)
    rl = dict(group_size=s["group_size"], lr=s["rl_lr"], rollout_batch_size=s["rl_prompts"] * s["group_size"],
              **branch)
    warm_total = s["cot_steps"] + s["score_steps"]
    phases = [
        ("warmup_cot", make_config(steps=s["cot_steps"], lr=s["warmup_lr"], beta=s["cot_beta"], output_dir=cot_dir,
                                   **sft), 0),
        ("warmup", make_config(steps=s["score_steps"], lr=s["score_lr"], beta=1.0, output_dir=warm_dir,
                               init_from=os.path.join(cot_dir, f"checkpoint-{s['cot_steps']}"), **sft),
         s["cot_steps"]),
        ("real", make_config(method="real", beta=s["rl_beta"], adv_norm=s["rl_adv_norm"],
                             output_dir=os.path.join(out, "real"), **rl), warm_total),
        ("grpo", make_config(method="grpo", output_dir=os.path.join(out, "grpo"), **rl), warm_total),
    ]
    if raft:  # the same labelled prompts per step and steps as REAL, at the score stage's learning rate
        phases.append(("raft", make_config(method="raft", lr=s["raft_lr"], output_dir=os.path.join(out, "raft"),
                                           **branch), warm_total))
    if control:  # the same labelled prompts per step, steps and learning rate as REAL: the same label budget
        phases.append(("tract", make_config(method="tract", lr=s["rl_lr"], beta=1.0,
                                            output_dir=os.path.join(out, "tract"), **branch), warm_total))
    return phases


def _row(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    keys = ("pearson", "spearman", "kendall", "mse", "n")
    return {k: (record or {}).get(k) for k in keys}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "   n/a"
    return f"{100 * value:6.1f}"


def format_table(table: Dict[str, Dict[str, Any]]) -> str:
    lines = [f"{'held-out (RAIL, greedy CoT)':<32}{'Pearson':>8}{'Spearman':>9}{'Kendall':>8}{'MSE':>8}",
             "-" * 65]
    for key, label in ROWS:
        if key not in table:
            continue
        r = table[key]
        mse = "   n/a" if r.get("mse") is None else f"{r['mse']:6.3f}"
        lines.append(f"{label:<32}{_fmt(r['pearson']):>8}{_fmt(r['spearman']):>9}{_fmt(r['kendall']):>8}{mse:>8}")
    lines.append("(correlations x100 against the mean of three noisy grades; MSE of the expected score)")
    return "\n".join(lines)


def run_phase(config: Dict[str, Any], threads: int, evaluate_first: bool = False):
    """One ``real train`` run from a config dict, in a worker process: ``(records, final eval, seconds, the
    evaluation before the first step or None)``."""
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    hf_logging.disable_progress_bar()  # save_pretrained's shard bars
    t0 = time.perf_counter()
    trainer = Trainer(make_config(**config), log=lambda msg: None)
    first = trainer.evaluate(0) if evaluate_first else None
    result = trainer.run()
    return result.records, result.final_eval, time.perf_counter() - t0, first


WHAT = {"warmup_cot": "warm-up stage 1 (TRACT, learn the CoT)", "warmup": "warm-up stage 2 (TRACT, score)",
        "real": "REAL", "grpo": "GRPO (binary reward)", "raft": "RAFT (regression, no CoT)",
        "tract": "TRACT continued (control)"}


def run_demo(args) -> Dict[str, Any]:
    from tqdm.auto import tqdm

    settings = _settings(args)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    phases = phase_configs(settings, out, args.seed, control=not args.no_control, raft=not args.no_raft)
    for _, cfg, _ in phases:  # an earlier demo's logs must not move the new bars
        stale = os.path.join(cfg.output_dir, METRICS_FILE)
        if os.path.exists(stale):
            os.remove(stale)
    table: Dict[str, Dict[str, Any]] = {}
    histories: Dict[str, List[Dict[str, Any]]] = {}
    offsets = {name: offset for name, _, offset in phases}
    timings: Dict[str, float] = {}
    best: Dict[str, Optional[float]] = {}  # best held-out Pearson along each curve (picked on held-out data)
    untrained: Dict[str, Any] = {}
    t_total = time.perf_counter()
    say = lambda msg: tqdm.write(msg, file=sys.stdout)  # noqa: E731  (above the bars on a terminal)

    def record(name, result):
        records, final_eval, seconds, first = result
        if first is not None:
            untrained.update(first)
            table["untrained"] = _row(first)
            say(f"[demo] untrained model: held-out Pearson {_fmt(first['pearson']).strip()}")
        timings[name] = seconds
        histories[name] = records
        if name != "warmup_cot":
            table[name] = _row(final_eval)
            pearsons = [r["pearson"] for r in records if r.get("type") == "eval" and r.get("pearson") is not None]
            best[name] = max(pearsons) if pearsons else None
        say(f"[demo]   {WHAT[name]}: done in {seconds:.0f}s, held-out Pearson {_fmt(final_eval['pearson']).strip()}")

    warmups = [p for p in phases if p[0].startswith("warmup")]
    # The branches are independent; the longest go first, so that the short ones fill the gaps.
    branches = sorted((p for p in phases if not p[0].startswith("warmup")), key=lambda p: -stage_seconds(p[1]))
    jobs = max(1, min(args.jobs, len(branches)))
    say(f"[demo] seed {args.seed}: {len(phases)} runs, expected about "
        f"{format_minutes(estimate_seconds(warmups, branches, jobs))} (a quiet 2-core machine; longer when it is busy)")
    for name, cfg, _ in phases:
        shape = f"{cfg.steps} steps x {cfg.prompts_per_step} prompts" + (
            f" x {cfg.group_size} sampled CoTs" if METHODS[cfg.method].needs_rollouts else
            " (no CoT)" if cfg.method == "raft" else " (reference CoTs)")
        say(f"[demo] {WHAT[name]}: {shape}")
    with make_pool(jobs) as pool:
        (cot_name, cot_cfg, _), (score_name, score_cfg, _) = warmups
        run_stages(pool, [(cot_name, cot_cfg, WHAT[cot_name])], run_phase, record, args.threads,
                   first_eval=(cot_name,))
        # The CoT is learned in a sudden drop of its cross-entropy, after 250 to 700 steps depending on the seed:
        # stage 1 goes on, 100 steps at a time, until it has happened (judged on the training loss only).
        while not cot_learned(histories[cot_name]) and cot_cfg.steps < settings["max_cot_steps"]:
            more = min(COT_EXTEND_STEPS, settings["max_cot_steps"] - cot_cfg.steps)
            say(f"[demo] the CoT is not learned after {cot_cfg.steps} steps (reference-CoT cross-entropy "
                f"{tail_ce(histories[cot_name]):.3f}, learned is below {COT_LEARNED_CE}): {more} more steps")
            seconds = timings[cot_name]
            cot_cfg = dataclasses.replace(cot_cfg, steps=cot_cfg.steps + more, resume=True, overwrite=False)
            run_stages(pool, [(cot_name, cot_cfg, WHAT[cot_name])], run_phase, record, args.threads)
            histories[cot_name] = read_metrics(os.path.join(cot_cfg.output_dir, METRICS_FILE), say)
            timings[cot_name] += seconds
        if not cot_learned(histories[cot_name]):
            say(f"[demo] warning: the CoT was not learned in {cot_cfg.steps} steps (--max-cot-steps); the runs "
                "below start from a judge that cannot grade, and their comparison means little")
        offsets.update({name: offsets[name] + cot_cfg.steps - settings["cot_steps"] for name in offsets
                        if name != cot_name})
        score_cfg = dataclasses.replace(score_cfg, init_from=os.path.join(cot_cfg.output_dir,
                                                                          f"checkpoint-{cot_cfg.steps}"))
        run_stages(pool, [(score_name, score_cfg, WHAT[score_name])], run_phase, record, args.threads)
        say(f"[demo] the {len(branches)} runs from the warm-up, in {jobs} processes")
        run_stages(pool, [(name, cfg, WHAT[name]) for name, cfg, _ in branches], run_phase, record, args.threads)
    timings["total"] = time.perf_counter() - t_total
    summary = {
        "table": table,
        "best_pearson_along_curve": best,
        "timings_s": timings,
        "seed": args.seed,
        "settings": settings,
        "warmup_cot_steps": cot_cfg.steps,  # --cot-steps, or more when the CoT took longer to learn
        "threads": args.threads,
        "jobs": jobs,
        "metric": "RAIL: expected score after a greedy CoT (RAFT: no CoT), on the held-out synthetic split",
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(json_safe(summary), fh, indent=2)
    if not args.no_plot:
        from real.cpu_demo.plots import plot_curves  # here: matplotlib only when plotting (--no-plot)

        plot_curves(os.path.join(out, "curves.png"), [histories], offsets.get("real", 0), [untrained or None])
    print()
    print(format_table(table))
    print("best held-out Pearson along the curves (optimistic: picked on the held-out set): "
          + ", ".join(f"{k} {_fmt(best[k]).strip()}" for k, _ in ROWS if k in best and k != "warmup"))
    print(f"\ntotal {timings['total']:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items() if k != 'total')})"
          f"; {os.path.join(out, 'results.json')}" + ("" if args.no_plot else f", {os.path.join(out, 'curves.png')}"))
    return summary, histories, untrained or None, offsets.get("real", 0)


def run_seeds(args, argv: List[str]) -> None:
    """The demo once per seed (``--seeds``, else ``--seed``), then the report when ``--report`` is given."""
    import copy

    seeds = args.seeds or [args.seed]
    summaries, seed_runs, untrained, branch = [], [], [], 0
    for seed in seeds:
        run_args = copy.copy(args)
        run_args.seed = seed
        if args.seeds:
            run_args.output_dir = os.path.join(args.output_dir, f"seed-{seed}")
            print(f"[demo] seed {seed} -> {run_args.output_dir}", flush=True)
        summary, histories, first, branch = run_demo(run_args)
        summaries.append(summary)
        seed_runs.append(histories)
        untrained.append(first)
    if args.report:
        path = write_report(args.report, summaries, ROWS, "real demo " + " ".join(argv), seed_runs, branch,
                            untrained, plot=not args.no_plot)
        print(f"report: {path}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_seeds(args, list(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"real demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
