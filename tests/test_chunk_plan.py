"""The chunk plan of loss mode (``real_kernels.plan_chunks``): sizes, whole row groups, and judge_loss following it.

The plan is a pure function of the shapes and the free memory (passed in), so
the GPU's plan is checked here: N = 16,384, V = 151,936 must give 4 x 4,096
rows (whole 128-row waves), not 3,456-row chunks and a tail.
"""
import pytest
import torch

from head_utils import make_case
from real_kernels import judge_loss, plan_chunks
from real_kernels.core.sizing import default_chunk_size

CUDA = torch.device("cuda")
GIB = 1 << 30


def sizes(plan):
    return [r.stop - r.start for r in plan]


def covers(plan, n):
    return plan[0].start == 0 and plan[-1].stop == n and all(a.stop == b.start for a, b in zip(plan, plan[1:]))


def test_target_shape_gives_equal_whole_wave_chunks():
    plan = plan_chunks(16_384, 151_936, CUDA, torch.bfloat16, free_bytes=100 * GIB)
    assert sizes(plan) == [4096] * 4
    # N not a multiple of 128: equal chunks rounded up to 128 rows, the last one shorter
    plan = plan_chunks(16_400, 151_936, CUDA, torch.bfloat16, free_bytes=100 * GIB)
    assert covers(plan, 16_400) and all(s % 128 == 0 for s in sizes(plan)[:-1])
    assert max(sizes(plan)) - min(sizes(plan)) < 128 * len(plan)
    # the CPU's fp32 buffer: 512 MiB at most, a quarter of N
    assert sizes(plan_chunks(2048, 151_936, "cpu", torch.float32)) == [512] * 4


def test_free_memory_shrinks_the_chunks_and_the_cap_bounds_them():
    """fp32 logits (4 bytes each) on every backend: at most a quarter of the free memory, at most 4 GiB."""
    v, n = 151_936, 16_384
    roomy = default_chunk_size(n, v, CUDA, torch.bfloat16, free_bytes=1000 * GIB)
    tight = default_chunk_size(n, v, CUDA, torch.bfloat16, free_bytes=2 * GIB)
    assert roomy == 4096  # a quarter of N, whatever the free memory
    assert tight % 128 == 0 and tight * v * 4 <= 2 * GIB // 4
    huge_n = default_chunk_size(1 << 20, v, CUDA, torch.bfloat16, free_bytes=1000 * GIB)
    assert huge_n % 128 == 0 and huge_n * v * 4 <= 4 * GIB and (huge_n + 128) * v * 4 > 4 * GIB
    # the buffer is fp32 whatever the inputs' dtype: the plan does not depend on it
    assert default_chunk_size(1 << 20, v, CUDA, torch.float32, free_bytes=1000 * GIB) == huge_n
    # the CPU: at most 512 MiB, no free-memory query
    assert default_chunk_size(1 << 20, v, "cpu") * v * 4 <= 512 * 2 ** 20
    # almost no memory: still at least one row per chunk
    assert default_chunk_size(n, v, CUDA, torch.bfloat16, free_bytes=0) == 1
    assert default_chunk_size(3, 50, "cpu") == 1 and default_chunk_size(0, 50, "cpu") == 1


@pytest.mark.parametrize("n", [1, 7, 127, 128, 129, 1000, 5000, 16_400])
def test_plan_covers_every_row_once_in_order(n):
    for free in (None, 3 * GIB):
        plan = plan_chunks(n, 4099 if n < 5000 else 151_936, CUDA, torch.bfloat16, free_bytes=free)
        assert covers(plan, n) and all(s > 0 for s in sizes(plan))
        assert max(sizes(plan)) <= max(1, n // 4) or n < 4


def test_row_groups_are_never_split():
    groups = [3, 9, 1, 20, 4, 4, 2]
    plan = plan_chunks(sum(groups), 100, "cpu", row_groups=groups, chunk_size=10)
    assert covers(plan, sum(groups))
    bounds = {0}
    for g in groups:
        bounds.add(max(bounds) + g)
    assert all(r.start in bounds and r.stop in bounds for r in plan)
    # greedy packing up to 10 rows; the 20-row group alone; then 4 + 4 + 2
    assert sizes(plan) == [3, 10, 20, 10]
    assert sizes(plan_chunks(6, 100, "cpu", row_groups=torch.tensor([2, 2, 2]), chunk_size=4)) == [4, 2]
    # default size with groups: whole groups packed up to the planned chunk size
    plan = plan_chunks(16_384, 151_936, CUDA, torch.bfloat16, row_groups=[1 + 511] * 32, free_bytes=100 * GIB)
    assert sizes(plan) == [4096] * 4
    plan = plan_chunks(16_384, 151_936, CUDA, torch.bfloat16, row_groups=[300] * 54 + [184], free_bytes=100 * GIB)
    assert covers(plan, 16_384) and all(s <= 4096 for s in sizes(plan)) and all(s % 300 in (0, 184) for s in sizes(plan))


def test_bad_plans_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="row_groups"):
        plan_chunks(10, 100, "cpu", row_groups=[4, 5])
    with pytest.raises(ValueError, match="row_groups"):
        plan_chunks(10, 100, "cpu", row_groups=[4, 0, 6])
    with pytest.raises(ValueError, match="row_groups"):
        plan_chunks(10, 100, "cpu", row_groups=[4.0, 6])
    with pytest.raises(TypeError, match="row_groups"):
        plan_chunks(10, 100, "cpu", row_groups=7)
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(10, 100, "cpu", chunk_size=0)
    with pytest.raises(ValueError, match="vocab"):
        plan_chunks(10, 0, "cpu")
    hidden, weight, targets = torch.randn(6, 8), torch.randn(20, 8), torch.randint(0, 20, (6,))
    with pytest.raises(ValueError, match="row_groups"):
        judge_loss(hidden, weight, targets, lambda o, r: o.logprobs.sum(), row_groups=[2, 2], backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_judge_loss_follows_the_plan(backend):
    """loss_fn sees exactly the planned slices, and the result does not depend on the grouping."""
    case = make_case(23, 24, 301, normalize=True, temperature=0.8, return_entropy=True)
    groups = [1, 6, 1, 9, 1, 5]
    seen = []

    def loss_fn(out, rows):
        seen.append(rows)
        return -(out.logprobs.sum() + out.expected_score.sum() + 0.1 * out.entropy.sum())

    results = []
    for kw in (dict(row_groups=groups, chunk_size=8), dict(chunk_size=5)):
        seen.clear()
        hidden = case.hidden.clone().requires_grad_(True)
        weight = case.weight.clone().requires_grad_(True)
        loss, _ = judge_loss(hidden, weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                             score_values=case.score_values, backend=backend, **kw, **case.kwargs())
        loss.backward()
        assert seen == plan_chunks(23, 301, "cpu", case.hidden.dtype, **kw)
        results.append((loss.detach(), hidden.grad, weight.grad))
    assert sizes(seen) == [5] * 4 + [3]
    (l1, h1, w1), (l2, h2, w2) = results
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(h1, h2, atol=1e-5) and torch.allclose(w1, w2, atol=1e-5)
