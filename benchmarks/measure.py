"""Time and peak memory of one benchmark case, in the current process.

Time: median and 20th / 80th percentiles after warm-up.  On CUDA,
``triton.testing.do_bench`` (which flushes the L2 cache between calls), or,
for calls of ``SLOW_CALL_MS`` or more, ``repeats`` calls each timed with CUDA
events (do_bench would spend about seven more calls estimating and warming
up, and at that length the L2 cache's contents are noise); on the CPU,
``repeats`` runs each timed with ``time.perf_counter``.

Peak memory, above what the inputs already hold:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` at that point.
- CPU (Linux): after warm-up, free memory goes back to the OS
  (``malloc_trim``), the resident-set high-water mark is reset by writing "5"
  to ``/proc/self/clear_refs``, and the peak is ``VmHWM`` after one run minus
  ``VmRSS`` before it.  The caller runs each provider in a fresh process
  (``worker.py``) so one provider's caches and allocator state do not blur
  another's numbers.

A case that runs out of memory comes back with status ``"oom"``, any other
failure with ``"error"`` and the exception text: never a crash of the suite.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .providers import get_provider
from .shapes import Shape
from .workloads import get_op, make_inputs, make_step

MIB = 1024.0 * 1024.0

SLOW_CALL_MS = 100.0  # CUDA: from this call length on, time calls one by one with events instead of do_bench
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "outofmemory")


@dataclass(frozen=True)
class Case:
    """One measurement: a provider doing an operation on a shape."""

    provider: str
    op: str
    shape: Shape
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 5
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Case":
        return cls(**{**data, "shape": Shape(**data["shape"])})


@dataclass
class Result:
    case: Case
    status: str  # "ok", "skipped", "oom", "error", "timeout"
    note: str = ""
    time_ms: Optional[Tuple[float, float, float]] = None  # (p50, p20, p80)
    memory_mb: Optional[float] = None
    version: str = ""
    samples_ms: List[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def tflops(self) -> Optional[Tuple[float, float, float]]:
        """Achieved TFLOP/s at (p50, p20, p80) of throughput; CUDA only (2NHV forward, 6NHV forward+backward)."""
        if not self.ok or self.case.device != "cuda" or self.time_ms is None:
            return None
        flops = get_op(self.case.op).flops(self.case.shape)
        p50, p20, p80 = self.time_ms
        # a slow run (80th percentile time) is the 20th percentile of throughput
        return tuple(flops / (t * 1e-3) / 1e12 for t in (p50, p80, p20))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["case"] = self.case.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        data = dict(data)
        data["case"] = Case.from_dict(data["case"])
        if data.get("time_ms") is not None:
            data["time_ms"] = tuple(data["time_ms"])
        return cls(**data)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return any(marker in str(exc).lower() for marker in _OOM_MARKERS)


def quantiles(samples: List[float]) -> Tuple[float, float, float]:
    """(median, 20th, 80th percentile), linear interpolation between order statistics."""
    if len(samples) == 1:
        return (samples[0],) * 3
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return statistics.median(samples), cuts[1], cuts[7]


# ---- CPU ---------------------------------------------------------------------------------------------------------

def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def cpu_peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def cpu_timed_peak(step: Callable[[], None]) -> Tuple[float, Optional[float]]:
    """Run ``step`` once: (milliseconds, peak RSS MiB above the RSS before it, or None off Linux)."""
    _release_free_memory()
    base_kib = None
    if cpu_peak_rss_supported():  # resets VmHWM to the current RSS
        base_kib = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    step()
    elapsed = (time.perf_counter() - t0) * 1e3
    if base_kib is None:
        return elapsed, None
    peak_kib = _proc_status_kib("VmHWM")
    return elapsed, max(0, peak_kib - base_kib) / 1024.0


def measure_cpu(step: Callable[[], None], warmup: int, repeats: int,
                release: Callable[[], None] = lambda: None) -> Tuple[List[float], Optional[float]]:
    """Warm-up runs, then ``repeats`` timed runs; the first timed run also measures peak memory, after
    ``release`` dropped what the provider keeps between calls (so a reused buffer counts in the peak)."""
    for _ in range(warmup):
        step()
    release()
    first_ms, peak_mb = cpu_timed_peak(step)
    samples = [first_ms]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collector pauses inside the timed runs
    try:
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, peak_mb


# ---- CUDA --------------------------------------------------------------------------------------------------------

def cuda_timed_peak(step: Callable[[], None]) -> Tuple[float, float]:
    """Run ``step`` once: (milliseconds, peak MiB allocated above what was allocated before it)."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) * 1e3
    return elapsed, (torch.cuda.max_memory_allocated() - base) / MIB


def measure_cuda(step: Callable[[], None], warmup: int, repeats: int) -> Tuple[Tuple[float, float, float], float]:
    """Warm-up (compiles / autotunes), peak memory of one call, then ``do_bench`` quantiles.

    ``do_bench`` repeats the call for ``rep`` milliseconds; ``rep`` is set so that
    about ``repeats`` calls fit (at least 100 ms), from the time of the memory call.
    A call of ``SLOW_CALL_MS`` or more is instead timed ``repeats`` times with CUDA events.
    """
    from triton.testing import do_bench

    for _ in range(max(1, warmup)):
        step()
    one_ms, peak_mb = cuda_timed_peak(step)
    if one_ms >= SLOW_CALL_MS:
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return quantiles(samples), peak_mb
    rep_ms = max(100.0, repeats * one_ms)
    p50, p20, p80 = do_bench(step, warmup=max(25.0, one_ms), rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return (p50, p20, p80), peak_mb


# ---- one case ----------------------------------------------------------------------------------------------------

def run_case(case: Case) -> Result:
    """Measure one case in this process; failures become a Result, never an exception."""
    provider = get_provider(case.provider)
    version = ""
    try:
        version = provider.version()
    except Exception as exc:  # a broken install is reported, not raised
        version = f"unknown ({type(exc).__name__})"
    reason = provider.unavailable_reason(case.device)
    if reason:
        return Result(case, "skipped", reason, version=version)
    inputs = step = None
    try:
        inputs = make_inputs(case.shape, case.device, case.seed)
        step = make_step(provider, case.op, inputs)
        if case.device == "cuda":
            time_ms, peak = measure_cuda(step, case.warmup, case.repeats)
            return Result(case, "ok", time_ms=time_ms, memory_mb=peak, version=version)
        samples, peak = measure_cpu(step, case.warmup, case.repeats, provider.release_caches)
        note = "" if peak is not None else "peak RSS needs Linux /proc"
        return Result(case, "ok", note, quantiles(samples), peak, version, samples)
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        return Result(case, status, message[:300], version=version)
    finally:
        del inputs, step  # the next case's memory measurement collects and trims first
        if case.device == "cuda":  # after an OOM, free what the traceback held before the next case
            gc.collect()
            torch.cuda.empty_cache()
