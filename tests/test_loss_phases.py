"""``benchmarks.loss_phases``: every phase of loss mode's loop is timed, the shares add up, and timing changes nothing."""
import math

import pytest
import torch

from benchmarks.loss_phases import PhaseClock, _problem, format_breakdown, phase_breakdown
from real_kernels.loss import PHASES, _Run
from real_kernels.core.sizing import plan_chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_phase_is_timed_and_the_shares_sum_to_one(dtype):
    rows = phase_breakdown(200, 32, 1001, dtype=dtype, device="cpu", repeats=2)
    assert [r["phase"] for r in rows] == list(PHASES)
    assert all(r["ms"] > 0 and 0 < r["share"] < 1 for r in rows)
    assert math.isclose(sum(r["share"] for r in rows), 1.0, rel_tol=1e-9)
    assert "dW GEMM" in format_breakdown(rows)


def test_the_timer_sees_each_phase_once_per_chunk_and_changes_no_result():
    device = torch.device("cpu")
    args, loss_fn = _problem(100, 16, 301, torch.float32, device)
    plan = plan_chunks(100, 301, device, torch.float32, chunk_size=30)
    entered = []

    def phase(name):
        entered.append(name)
        return PhaseClock(device)(name)

    plain = _Run(args, loss_fn, plan, "torch").execute(True, True)
    timed = _Run(args, loss_fn, plan, "torch").execute(True, True, phase=phase)
    assert all(torch.equal(a, b) for a, b in zip(plain, timed))
    for name in PHASES:
        expected = len(plan) + 1 if name == "accumulation" else len(plan)
        assert entered.count(name) == expected, name


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="vocab"):
        phase_breakdown(8, 8, 0, device="cpu")
    with pytest.raises(ValueError, match="repeats"):
        phase_breakdown(8, 8, 10, device="cpu", repeats=0)
