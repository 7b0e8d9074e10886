"""Expand a sweep into cases and measure them all, with a progress bar.

Unavailable providers are resolved here, without importing them, and come
back as ``skipped`` results carrying the reason.  On the CPU each provider's
cases run in one worker process of its own (``isolation="subprocess"``, the
default); ``"inprocess"`` measures everything in this process (faster to
start, used by the smoke tests; peak memory is then less isolated).  On CUDA
cases run in this process: the CUDA allocator's peak counter is exact per
call.  Providers are interleaved: all of them at one (operation, N), then the
next operation, then the next N (growing).  With a time budget, cases not
started once it is spent come back as ``skipped`` with the reason, so a sweep
on a leased GPU ends on time and still writes its tables; the order makes
that drop the largest N of every operation, not a whole operation.  A case is
also skipped when it would not finish in the budget: its time is predicted
from the same provider and operation at the previous N, scaled by N (the first
GPU run's gpu-32b preset started N = 65,536 cases a few seconds before its
budget ran out and was killed by the suite's limit before writing anything).
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from .measure import Case, Result, run_case
from .providers import get_provider
from .shapes import Shape
from .worker import ProviderWorker
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
              progress: bool = True, budget_s: Optional[float] = None) -> List[Result]:
    """Measure every case; one Result per case, in the order given.

    ``budget_s``: seconds after which no further case is started (the rest are ``skipped``).

    Measurement order interleaves providers: every provider at one (op, N),
    then the next op, then the next N, so a table row is measured within
    minutes even when the machine's load drifts over a long sweep.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    results: Dict[int, Result] = {}
    pending: List[int] = []
    reasons: Dict[str, object] = {}
    for i, case in enumerate(cases):
        if case.provider not in reasons:
            provider = get_provider(case.provider)
            reason = provider.unavailable_reason(case.device)
            reasons[case.provider] = (reason, _safe_version(provider)) if reason else None
        if reasons[case.provider]:
            reason, version = reasons[case.provider]
            results[i] = Result(case, "skipped", reason, version=version)
        else:
            pending.append(i)
    provider_order = {name: k for k, name in enumerate(dict.fromkeys(c.provider for c in cases))}
    op_order = {name: k for k, name in enumerate(dict.fromkeys(c.op for c in cases))}
    pending.sort(key=lambda i: (cases[i].shape.config_key(), cases[i].shape.n, op_order[cases[i].op],
                                provider_order[cases[i].provider]))

    workers: Dict[str, ProviderWorker] = {}
    last_seconds: Dict[tuple, tuple] = {}  # (provider, op, shape config) -> (N, wall seconds of that case)
    bar = tqdm(total=len(cases), initial=len(results), desc="bench", unit="run", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for i in pending:
            case = cases[i]
            key = (case.provider, case.op, case.shape.config_key())
            elapsed = time.perf_counter() - start
            if budget_s is not None:
                predicted = predicted_seconds(last_seconds.get(key), case.shape.n)
                reason = None
                if elapsed > budget_s:
                    reason = f"time budget of {budget_s:.0f} s spent before this case"
                elif predicted is not None and elapsed + predicted > budget_s:
                    reason = (f"time budget of {budget_s:.0f} s: this case would take about {predicted:.0f} s "
                              f"(from N={last_seconds[key][0]}), {budget_s - elapsed:.0f} s were left")
                if reason:
                    results[i] = Result(case, "skipped", reason)
                    bar.update(1)
                    continue
            bar.set_postfix_str(_describe(case))
            case_start = time.perf_counter()
            if case.device == "cpu" and isolation == "subprocess":
                worker = workers.setdefault(case.provider, ProviderWorker(timeout_s))
                results[i] = worker.run(case)
            else:
                results[i] = run_case(case)
            last_seconds[key] = (case.shape.n, time.perf_counter() - case_start)
            bar.update(1)
    finally:
        for worker in workers.values():
            worker.close()
        bar.close()
    return [results[i] for i in range(len(cases))]


def predicted_seconds(previous, n: int):
    """Seconds a case at ``n`` rows should take, from ``(n_prev, seconds)`` of the same provider and operation
    (linear in N: every phase is), or None without a previous case."""
    if previous is None:
        return None
    n_prev, seconds = previous
    return seconds * n / max(1, n_prev)


def _safe_version(provider) -> str:
    try:
        return provider.version()
    except Exception as exc:  # a half-installed peer still gets reported as skipped
        return f"unknown ({type(exc).__name__})"
