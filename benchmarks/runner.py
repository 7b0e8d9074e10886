"""Expand a sweep into cases and measure them all, with a progress bar.

Unavailable providers are resolved here, without importing them, and come
back as ``skipped`` results carrying the reason.  On the CPU each provider's
cases run in one fresh worker process (``isolation="subprocess"``, the
default) ordered by operation and then by growing N; ``"inprocess"`` measures
everything in this process (faster to start, used by the smoke tests; peak
memory is then less isolated).  On CUDA cases run in this process: the CUDA
allocator's peak counter is exact per call.
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List, Sequence

from tqdm.auto import tqdm

from .measure import Case, Result, run_case
from .providers import get_provider
from .shapes import Shape
from .worker import run_in_subprocess
from .workloads import get_op

ISOLATIONS = ("subprocess", "inprocess")


def build_cases(shapes: Sequence[Shape], providers: Sequence[str], ops: Sequence[str], *, device: str,
                warmup: int, repeats: int, seed: int = 0) -> List[Case]:
    """Every (provider, op, shape), grouped by provider, then op, then growing N."""
    for op in ops:
        get_op(op)  # ValueError on an unknown name, before anything runs
    for name in providers:
        get_provider(name)
    if warmup < 0 or repeats < 1:
        raise ValueError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    ordered_shapes = sorted(shapes, key=lambda s: (s.config_key(), s.n))
    return [
        Case(provider, op, shape, device, warmup, repeats, seed)
        for provider in providers for op in ops for shape in ordered_shapes
    ]


def _describe(case: Case) -> str:
    return f"{case.provider} {case.op} N={case.shape.n}"


def run_cases(cases: Sequence[Case], *, isolation: str = "subprocess", timeout_s: float = 3600.0,
              progress: bool = True) -> List[Result]:
    """Measure every case; one Result per case, in the order given."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    by_provider: Dict[str, List[Case]] = {}
    for case in cases:
        by_provider.setdefault(case.provider, []).append(case)
    results: Dict[int, Result] = {}
    index = {id(case): i for i, case in enumerate(cases)}
    bar = tqdm(total=len(cases), desc="bench", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for name, group in by_provider.items():
            provider = get_provider(name)
            device = group[0].device
            reason = provider.unavailable_reason(device)
            if reason:
                version = _safe_version(provider)
                for case in group:
                    results[index[id(case)]] = Result(case, "skipped", reason, version=version)
                bar.update(len(group))
                continue
            bar.set_postfix_str(_describe(group[0]))
            for i, (case, result) in enumerate(zip(group, _measure(group, isolation, timeout_s))):
                results[index[id(case)]] = result
                bar.update(1)
                if i + 1 < len(group):
                    bar.set_postfix_str(_describe(group[i + 1]))
    finally:
        bar.close()
    return [results[i] for i in range(len(cases))]


def _measure(group: List[Case], isolation: str, timeout_s: float) -> Iterable[Result]:
    if group[0].device == "cpu" and isolation == "subprocess":
        return run_in_subprocess(group, timeout_s=timeout_s)
    return (run_case(case) for case in group)


def _safe_version(provider) -> str:
    try:
        return provider.version()
    except Exception as exc:  # a half-installed peer still gets reported as skipped
        return f"unknown ({type(exc).__name__})"
