"""``python -m benchmarks``: the fused head against naive PyTorch and the peers.

Runs every (provider, operation, N) of a preset or of custom shapes, prints a
markdown table with ratios against ``naive``, and writes CSV, JSON, markdown
and PNG plots to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .output import write_outputs
from .report import describe_device
from .runner import ISOLATIONS, build_cases, run_cases
from .shapes import ALL_OPS, ALL_PROVIDERS, PRESETS, default_preset_name, parse_choice_list, parse_int_list
from .workloads import OPS

DEFAULT_OUTPUT_DIR = "bench_results"


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(
        f"  {p.name:<10} N in {list(p.n_values)}, H={p.hidden}, V={p.vocab:,}, {p.dtype}: {p.description}"
        for p in PRESETS.values()
    )
    ops = "\n".join(f"  {op.name:<16} {op.description}" for op in OPS.values())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Microbenchmarks of the fused LM head (log-probs and judge head) against naive PyTorch, "
                    "Liger-Kernel and Cut Cross-Entropy: time, peak memory and (on CUDA) TFLOP/s.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets}\n\noperations:\n{ops}\n\n"
               "Providers that are not installed or cannot run on this device are reported as skipped, with "
               "the reason.\nPeers: pip install torch==2.13.0 liger-kernel cut-cross-entropy "
               "(keep the torch pin on CPU machines).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named sweep (default: cpu-quick on a CPU-only machine, gpu-8b with CUDA)")
    parser.add_argument("--n", help="comma-separated token counts N, e.g. 512,1024 (overrides the preset's)")
    parser.add_argument("--hidden", type=int, help="hidden size H (overrides the preset's)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V (overrides the preset's)")
    parser.add_argument("--dtype", help="input dtype: float32/fp32, bfloat16/bf16, float16/fp16 (overrides the preset's)")
    parser.add_argument("--providers", default="all",
                        help=f"comma-separated subset of {','.join(ALL_PROVIDERS)} (default: all)")
    parser.add_argument("--ops", default="all", help=f"comma-separated subset of {','.join(ALL_OPS)} (default: all)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs per case on the CPU; about that many calls on CUDA (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed runs before measuring (default: the preset's, 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default auto: the preset's device, CUDA when available)")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"folder for <name>.csv/.json/.md and the PNG plots (default: {DEFAULT_OUTPUT_DIR}/)")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="subprocess",
                        help="CPU only: a fresh process per provider (default, clean peak-memory numbers) or "
                             "everything in this process (quicker to start)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait for one case before reporting it as timed out (CPU, default 3600)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no new case is started; the rest are reported as skipped "
                             "(default: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _resolve_device(requested: str, preset_device: str) -> str:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if requested != "auto":
        return requested
    if preset_device == "cuda" and not cuda:
        raise ValueError("this preset is sized for a GPU and no CUDA device is available; "
                         "use --preset cpu-quick or cpu, or --device cpu to force it (very slow)")
    return "cuda" if cuda else "cpu"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = PRESETS[args.preset or default_preset_name(torch.cuda.is_available())]
        preset = preset.with_overrides(
            n_values=parse_int_list(args.n, "--n") if args.n else None,
            hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
        )
        device = _resolve_device(args.device, preset.device)
        providers = parse_choice_list(args.providers, "--providers", ALL_PROVIDERS)
        ops = parse_choice_list(args.ops, "--ops", ALL_OPS)
        cases = build_cases(
            preset.shapes(), providers, ops, device=device,
            warmup=preset.warmup if args.warmup is None else args.warmup,
            repeats=preset.repeats if args.repeats is None else args.repeats, seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    results = run_cases(cases, isolation=args.isolation, timeout_s=args.timeout, progress=not args.no_progress,
                        budget_s=args.budget)
    device_name = describe_device(device)
    out = write_outputs(
        results, output_dir=Path(args.output_dir), stem=preset.name,
        title=f"real-kernels benchmarks: {preset.name} ({preset.description})", device_name=device_name,
        command=shlex.join(["python", "-m", "benchmarks", *argv]), plots=not args.no_plots, isolation=args.isolation,
    )
    print(out["markdown"])
    written = [out["csv"], out["json"], out["md"], *out["plots"]]
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    errors = [r for r in results if r.status in ("error", "timeout")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
