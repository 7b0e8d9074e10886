"""pytest-benchmark layer over the ``cpu-quick`` shapes, for people who track benchmarks with it.

    pytest benchmarks --benchmark-only                      # table grouped by operation and N
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep a history in .benchmarks/

Not part of the default test run (``pytest`` collects ``tests/`` only).  Each
benchmark is one (provider, operation, N); providers that are not installed or
cannot run on this device are skipped with the reason.  Runs on CUDA when it is
available (same shapes, in the preset's dtype).  Peak memory above the inputs
of one call goes to ``extra_info["peak_mib"]`` (measured in this process).
"""
import pytest
import torch

from benchmarks.measure import cpu_timed_peak, cuda_timed_peak
from benchmarks.providers import get_provider
from benchmarks.shapes import PRESETS
from benchmarks.workloads import make_inputs, make_step

PRESET = PRESETS["cpu-quick"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", PRESET.shapes(), ids=lambda s: f"N{s.n}")
@pytest.mark.parametrize("op", PRESET.ops)
@pytest.mark.parametrize("provider_name", PRESET.providers)
def test_head(benchmark, provider_name, op, shape):
    provider = get_provider(provider_name)
    reason = provider.unavailable_reason(DEVICE)
    if reason:
        pytest.skip(f"{provider_name}: {reason}")
    step = make_step(provider, op, make_inputs(shape, DEVICE))
    if DEVICE == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize()

    step()  # warm-up (compilation, autotuning) before the memory measurement
    _, peak_mib = cuda_timed_peak(step) if DEVICE == "cuda" else cpu_timed_peak(step)
    benchmark.group = f"{op} N={shape.n} H={shape.hidden} V={shape.vocab} {shape.dtype}"
    benchmark.extra_info.update(provider=provider_name, op=op, n=shape.n, hidden=shape.hidden,
                                vocab=shape.vocab, dtype=shape.dtype, device=DEVICE, peak_mib=peak_mib)
    benchmark.pedantic(step, rounds=PRESET.repeats, warmup_rounds=PRESET.warmup, iterations=1)
