"""One-shot GPU check: the Triton kernels against the reference at real shapes, then speed and memory.

Run on a CUDA machine (about 2-4 minutes on one H200; it stops starting new
work after ``--budget`` seconds so that it stays under 8 minutes):

    python -m benchmarks.gpu_check --output-dir "$OUT"

1. Correctness: ``judge_head`` (which contains ``linear_logprobs``) with the
   ``triton`` backend against the fp32 ``reference`` at N = 4096, H = 4096 and
   5120, V = 151,936, bf16 inputs, for two settings (temperature 1 with
   entropy; temperature 0.7, ``normalize``, ``ignore_index`` rows and a score
   mask), score ids at the first and last vocabulary id, random upstream
   gradients on every output.  The reference runs in row chunks (rows are
   independent; ``dW`` is summed over chunks in fp32), so it never needs the
   whole ``[N, V]`` fp32 logits at once.
2. Speed and memory: forward and forward+backward of the log-probs and the
   judge head at N = 4096 for naive PyTorch, the torch and triton backends,
   Liger-Kernel and Cut Cross-Entropy where installed (the same machinery as
   ``python -m benchmarks``).

Writes ``gpu_check.md`` (both tables), ``gpu_check_correctness.json`` and the
timing CSV / JSON / plots under ``--output-dir``.  Exits 0 when every check
passes, 1 when one fails, 2 without CUDA.  ``--device cpu`` with
``--backends torch`` and tiny shapes runs the same code on the CPU (that is
how the test suite exercises it).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .output import write_outputs
from .report import describe_device
from .runner import build_cases, run_cases
from .shapes import ALL_PROVIDERS, DTYPES, QWEN3_VOCAB, Shape, canonical_dtype, parse_choice_list, parse_int_list
from .workloads import LOGIT_STD

FORWARD_ABS_TOL = 1e-2  # log-probs, score log-probs, expected score, entropy: max |fused - reference|
GRAD_REL_TOL = 2e-2  # dh, dW: ||fused - reference|| / ||reference|| (bf16 gradients round at ~4e-3)
TIMING_OPS = ("logprobs-fwd", "logprobs-fwdbwd", "judge-fwdbwd")


@dataclass(frozen=True)
class HeadSetting:
    name: str
    temperature: float
    normalize: bool
    return_entropy: bool
    ignore_fraction: float  # share of rows whose target is ignore_index
    masked_scores: bool  # sq_error only on some rows


SETTINGS = (
    HeadSetting("t=1.0 entropy", 1.0, False, True, 0.0, False),
    HeadSetting("t=0.7 normalize ignore mask", 0.7, True, False, 0.1, True),
)


@dataclass
class CheckRow:
    hidden: int
    setting: str
    backend: str
    quantity: str
    max_abs_err: float
    rel_err: float
    limit: str
    passed: bool


def _score_ids(vocab: int) -> List[int]:
    """First and last vocabulary ids plus three in between (tile edges are covered by V itself)."""
    ids = [0, vocab // 3, vocab // 2, 2 * vocab // 3, vocab - 1]
    return sorted(set(ids)) if vocab >= 5 else list(range(vocab))


def _make_problem(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: str, setting: HeadSetting, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, device=device) * (LOGIT_STD / math.sqrt(hidden))).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    if setting.ignore_fraction > 0:
        targets[torch.rand(n, generator=gen, device=device) < setting.ignore_fraction] = -100
    ids = _score_ids(vocab)
    m = len(ids)
    values = torch.arange(1, m + 1, dtype=torch.float32, device=device)
    score_targets = 1 + (m - 1) * torch.rand(n, generator=gen, device=device)
    mask = (torch.rand(n, generator=gen, device=device) < 0.25) if setting.masked_scores else None
    grads = {
        "logprobs": torch.randn(n, generator=gen, device=device),
        "score_logprobs": torch.randn(n, m, generator=gen, device=device),
        "expected_score": torch.randn(n, generator=gen, device=device),
        "sq_error": torch.randn(n, generator=gen, device=device),
        "entropy": torch.randn(n, generator=gen, device=device) if setting.return_entropy else None,
    }
    return h, w, targets, ids, values, score_targets, mask, grads


def _head(h, w, targets, ids, values, score_targets, mask, setting, backend):
    from real_kernels import judge_head

    return judge_head(h, w, targets, ids, values, score_targets=score_targets, score_mask=mask,
                      normalize=setting.normalize, temperature=setting.temperature,
                      return_entropy=setting.return_entropy, backend=backend)


def _weighted_sum(out, grads) -> torch.Tensor:
    total = 0.0
    for name, g in grads.items():
        value = getattr(out, name)
        if g is not None and value is not None:
            total = total + (g * value).sum()
    return total


def _chunked_reference(h, w, targets, ids, values, score_targets, mask, grads, setting, row_chunk):
    """Reference outputs and gradients, row chunk by row chunk, accumulated in fp32."""
    w32 = w.detach().float().requires_grad_(True)
    outs: Dict[str, List[torch.Tensor]] = {k: [] for k in grads}
    dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for r0 in range(0, h.shape[0], row_chunk):
        rows = slice(r0, min(h.shape[0], r0 + row_chunk))
        hc = h[rows].detach().float().requires_grad_(True)
        out = _head(hc, w32, targets[rows], ids, values, score_targets[rows],
                    None if mask is None else mask[rows], setting, "reference")
        chunk_grads = {k: (None if g is None else g[rows]) for k, g in grads.items()}
        dhc, dwc = torch.autograd.grad(_weighted_sum(out, chunk_grads), (hc, w32))
        dh[rows] = dhc
        dw += dwc
        for k in outs:
            value = getattr(out, k)
            if value is not None:
                outs[k].append(value.detach())
        del out, dhc, dwc
    forward = {k: torch.cat(v) for k, v in outs.items() if v}
    return forward, dh, dw


def _errors(got: torch.Tensor, want: torch.Tensor):
    diff = got.detach().float() - want.float()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = want.float().norm().item()
    rel = diff.norm().item() / denom if denom > 0 else diff.norm().item()
    return max_abs, rel


def check_against_reference(n: int, hidden: int, vocab: int, *, dtype: torch.dtype, device: str,
                            backends: Sequence[str] = ("triton",), row_chunk: int = 1024,
                            settings: Sequence[HeadSetting] = SETTINGS, seed: int = 0) -> List[CheckRow]:
    """Every backend in ``backends`` against the chunked fp32 reference; one row per (setting, output)."""
    rows: List[CheckRow] = []
    for i, setting in enumerate(settings):
        h, w, targets, ids, values, score_targets, mask, grads = _make_problem(
            n, hidden, vocab, dtype, device, setting, seed + i)
        ref_fwd, ref_dh, ref_dw = _chunked_reference(h, w, targets, ids, values, score_targets, mask, grads,
                                                     setting, row_chunk)
        for backend in backends:
            hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = _head(hl, wl, targets, ids, values, score_targets, mask, setting, backend)
            dh, dw = torch.autograd.grad(_weighted_sum(out, grads), (hl, wl))
            for name, want in ref_fwd.items():
                max_abs, rel = _errors(getattr(out, name), want)
                rows.append(CheckRow(hidden, setting.name, backend, name, max_abs, rel,
                                     f"max abs <= {FORWARD_ABS_TOL:g}", max_abs <= FORWARD_ABS_TOL))
            for name, got, want in (("d hidden", dh, ref_dh), ("d weight", dw, ref_dw)):
                max_abs, rel = _errors(got, want)
                rows.append(CheckRow(hidden, setting.name, backend, name, max_abs, rel,
                                     f"rel <= {GRAD_REL_TOL:g}", rel <= GRAD_REL_TOL))
            del out, dh, dw, hl, wl
        del h, w, ref_fwd, ref_dh, ref_dw
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def correctness_markdown(rows: Sequence[CheckRow], n: int, vocab: int, dtype: str) -> str:
    lines = [f"### Fused head against the fp32 reference: N={n:,}, V={vocab:,}, {dtype} inputs", "",
             "| H | setting | backend | output | max abs err | rel err | limit | pass |",
             "|---:|---|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r.hidden:,} | {r.setting} | {r.backend} | {r.quantity} | {r.max_abs_err:.2e} | "
                     f"{r.rel_err:.2e} | {r.limit} | {'yes' if r.passed else '**NO**'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Check the Triton kernels against the reference at real shapes on CUDA, then time and "
                    "measure naive / torch / triton / liger / cce at N=4096. Needs a CUDA GPU.",
    )
    parser.add_argument("--output-dir", default="bench_results", help="where the tables go (default bench_results/)")
    parser.add_argument("--n", type=int, default=4096, help="token rows N (default 4096)")
    parser.add_argument("--hidden", default="4096,5120", help="comma-separated hidden sizes (default 4096,5120)")
    parser.add_argument("--vocab", type=int, default=QWEN3_VOCAB, help=f"vocabulary size (default {QWEN3_VOCAB:,})")
    parser.add_argument("--dtype", default="bfloat16", help="input dtype (default bfloat16)")
    parser.add_argument("--backends", default="triton",
                        help="our backends checked against the reference (default triton; torch also works)")
    parser.add_argument("--providers", default="all", help=f"timed providers, subset of {','.join(ALL_PROVIDERS)}")
    parser.add_argument("--row-chunk", type=int, default=1024, help="reference rows per chunk (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="about this many timed calls per case (default 5)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no new hidden size is started (default 420, to end under 8 min)")
    parser.add_argument("--skip-timing", action="store_true", help="only the correctness check")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default); cpu runs the same code for testing, with --backends torch")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU and torch.cuda.is_available() is False on this machine. "
              "On a CPU-only machine run `python -m benchmarks --preset cpu-quick` instead.", file=sys.stderr)
        return 2
    try:
        dtype = canonical_dtype(args.dtype)
        hiddens = parse_int_list(args.hidden, "--hidden")
        backends = parse_choice_list(args.backends, "--backends", ("triton", "torch"))
        providers = parse_choice_list(args.providers, "--providers", ALL_PROVIDERS)
        if args.row_chunk < 1 or args.n < 1 or args.vocab < 1:
            raise ValueError("--n, --vocab and --row-chunk must be positive")
    except ValueError as exc:
        parser.error(str(exc))
    if args.device == "cpu" and "triton" in backends:
        parser.error("--device cpu checks the torch backend only: pass --backends torch")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = describe_device(args.device)
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *argv])
    start = time.perf_counter()

    check_rows: List[CheckRow] = []
    timed_hiddens: List[int] = []
    results = []
    for hidden in hiddens:
        if time.perf_counter() - start > args.budget:
            print(f"gpu_check: time budget of {args.budget:.0f} s spent; H={hidden} not run", file=sys.stderr)
            break
        t0 = time.perf_counter()
        rows = check_against_reference(args.n, hidden, args.vocab, dtype=DTYPES[dtype],
                                       device=args.device, backends=backends, row_chunk=args.row_chunk)
        check_rows += rows
        print(f"gpu_check: H={hidden} correctness {'passed' if all(r.passed for r in rows) else 'FAILED'} "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.skip_timing:
            continue
        t0 = time.perf_counter()
        cases = build_cases([Shape(args.n, hidden, args.vocab, dtype)], providers, TIMING_OPS,
                            device=args.device, warmup=1, repeats=args.repeats)
        results += run_cases(cases, isolation="inprocess", progress=True)
        timed_hiddens.append(hidden)
        print(f"gpu_check: H={hidden} timing done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    sections = [f"## GPU check on {device_name}", "", f"Command: `{command}`", "",
                correctness_markdown(check_rows, args.n, args.vocab, dtype), ""]
    if results:
        timing = write_outputs(results, output_dir=out_dir, stem="gpu_check_timing",
                               title=f"speed and memory at N={args.n:,}", device_name=device_name, command=command,
                               isolation="inprocess")
        sections.append(timing["markdown"])
    sections.append(f"Total time: {time.perf_counter() - start:.0f} s.")
    text = "\n".join(sections) + "\n"
    (out_dir / "gpu_check.md").write_text(text)
    (out_dir / "gpu_check_correctness.json").write_text(json.dumps([asdict(r) for r in check_rows], indent=1) + "\n")
    print(text)
    failed = [r for r in check_rows if not r.passed]
    # a peer that fails is reported in the table; a failure of our own backends fails the check
    errors = [r for r in results if r.status in ("error", "timeout") and r.case.provider in ("torch", "triton")]
    for r in failed:
        print(f"FAILED: H={r.hidden} {r.setting} {r.backend} {r.quantity}: max abs {r.max_abs_err:.3e}, "
              f"rel {r.rel_err:.3e} ({r.limit})", file=sys.stderr)
    return 1 if failed or errors or not check_rows else 0


if __name__ == "__main__":
    sys.exit(main())
