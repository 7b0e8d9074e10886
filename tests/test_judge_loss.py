"""Loss mode (``judge_loss``) equals ``judge_head`` + autograd, on every backend.

The truth is the fp64 reference head followed by the same loss under autograd.
Losses are REAL-shaped (policy gradient with advantages, PPO ratio clipping
against stored old log-probs, k3 KL against reference log-probs, the squared
error on score rows, an entropy bonus, a score-token log-prob term), with
temperature, ignored rows, normalisation, and chunk sizes that do not divide N.
"""
import pytest
import torch

from head_utils import LargestAllocation, make_case, max_abs_err, rel_err, run_exact
from real_kernels import judge_head, judge_loss
from real_kernels.core import reference
from real_kernels.loss import default_chunk_size
from real_kernels.core.outputs import JudgeHeadOutput

BACKENDS = ["reference", "torch", "triton"]


def real_shaped_loss(n: int, seed: int = 0, entropy_coef: float = 0.01):
    """A per-row loss as the training loop builds it; returns loss_fn(out, rows)."""
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(n, generator=gen)
    old_logp = -torch.rand(n, generator=gen) * 4  # stored at rollout time
    ref_logp = -torch.rand(n, generator=gen) * 4
    weights = torch.rand(n, generator=gen)  # token-mean weights

    def loss_fn(out: JudgeHeadOutput, rows):
        ratio = torch.exp(out.logprobs - old_logp[rows])
        pg = -torch.minimum(ratio * adv[rows], ratio.clamp(0.8, 1.2) * adv[rows])
        log_r = ref_logp[rows] - out.logprobs
        kl = torch.exp(log_r) - log_r - 1
        loss = (weights[rows] * (pg + 0.05 * kl)).sum() + 0.3 * out.sq_error.sum()
        loss = loss - 0.1 * out.score_logprobs[:, 0].sum()
        if out.entropy is not None:
            loss = loss - entropy_coef * (weights[rows] * out.entropy).sum()
        return loss

    return loss_fn


def head_then_loss(case, loss_fn, dtype=None, backend="reference"):
    """judge_head (fp64 reference when dtype is float64) and the loss under autograd: (loss, outputs, dh, dW)."""
    dtype = dtype or case.hidden.dtype
    hidden = case.hidden.detach().to(dtype).requires_grad_(True)
    weight = case.weight.detach().to(dtype).requires_grad_(True)
    if dtype == torch.float64:
        res = reference.judge_head(
            hidden, weight, case.targets, torch.tensor(case.score_ids),
            torch.tensor(case.score_values, dtype=dtype), compute_dtype=dtype,
            score_targets=case.score_targets.to(dtype), score_mask=case.score_mask, normalize=case.normalize,
            temperature=case.temperature, return_entropy=case.return_entropy,
        )
        out = JudgeHeadOutput(*res)
    else:
        out = judge_head(hidden, weight, case.targets, case.score_ids, case.score_values, backend=backend,
                         **case.kwargs())
    loss = loss_fn(out, slice(0, hidden.shape[0]))
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), out, dh, dw


def run_loss(case, loss_fn, backend, chunk_size):
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    loss, out = judge_loss(hidden, weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                           score_values=case.score_values, chunk_size=chunk_size, backend=backend, **case.kwargs())
    loss.backward()
    return loss.detach(), out, hidden.grad, weight.grad


CASES = [
    dict(n=37, h=48, v=1001, normalize=False, temperature=1.0, return_entropy=False, chunk=10),
    dict(n=37, h=48, v=1001, normalize=True, temperature=0.7, return_entropy=True, chunk=7),
    dict(n=61, h=40, v=4099, normalize=False, temperature=1.3, return_entropy=True, chunk=None),
    dict(n=1, h=32, v=97, normalize=True, temperature=2.0, return_entropy=True, chunk=4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=lambda c: f"n{c['n']}-v{c['v']}-chunk{c['chunk']}")
def test_loss_mode_matches_head_and_autograd_fp32(backend, c):
    case = make_case(c["n"], c["h"], c["v"], normalize=c["normalize"], temperature=c["temperature"],
                     return_entropy=c["return_entropy"])
    loss_fn = real_shaped_loss(c["n"])
    t_loss, t_out, t_dh, t_dw = head_then_loss(case, loss_fn, torch.float64)
    loss, out, dh, dw = run_loss(case, loss_fn, backend, c["chunk"])
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(float(loss) - float(t_loss)) <= 1e-5 * max(1.0, abs(float(t_loss)))
    for name in ("logprobs", "score_logprobs", "expected_score", "sq_error", "entropy"):
        ours, truth = getattr(out, name), getattr(t_out, name)
        if truth is None:
            assert ours is None
            continue
        assert ours.dtype == torch.float32 and ours.shape == truth.shape and not ours.requires_grad
        # relative to the output's scale, and never tighter than 1e-5 absolute (a tiny sq_error cancels)
        assert max_abs_err(ours, truth) <= 1e-5 * max(1.0, float(truth.detach().abs().max())), name
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert rel_err(dh, t_dh) <= 1e-5 and rel_err(dw, t_dw) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_mode_equals_the_same_backends_head(backend):
    """Against judge_head on the same backend in fp32 (not only against fp64)."""
    case = make_case(45, 48, 1000, normalize=True, temperature=0.8, return_entropy=True)
    loss_fn = real_shaped_loss(45, seed=3)
    h_loss, h_out, h_dh, h_dw = head_then_loss(case, loss_fn, backend=backend)
    loss, out, dh, dw = run_loss(case, loss_fn, backend, chunk_size=16)
    assert abs(float(loss) - float(h_loss)) <= 1e-5 * max(1.0, abs(float(h_loss)))
    assert rel_err(out.expected_score, h_out.expected_score) <= 1e-5
    assert rel_err(dh, h_dh) <= 2e-5 and rel_err(dw, h_dw) <= 2e-5


def linear_loss(case):
    """sum_k <output_k, upstream_k>: the loss whose gradient head_utils' naive and fp64 runs compute."""
    def loss_fn(out, rows):
        return sum((getattr(out, k) * g[rows]).sum() for k, g in case.grads.items() if getattr(out, k) is not None)
    return loss_fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_low_precision_no_worse_than_naive(dtype, backend):
    case = make_case(37, 96, 1000, dtype=dtype, normalize=True, return_entropy=True, temperature=0.7)
    t_outs, t_dh, t_dw = run_exact(case)
    n_outs, n_dh, n_dw = run_exact(case, low_precision_naive=True)
    _, out, dh, dw = run_loss(case, linear_loss(case), backend, chunk_size=10)
    assert dh.dtype == dtype and dw.dtype == dtype
    margin = 1e-3  # relative to the scale of the fp64 truth, as in test_head_low_precision
    pairs = [(k, getattr(out, k), n_outs[k], t_outs[k]) for k in t_outs]
    for name, ours, low, exact in pairs + [("dh", dh, n_dh, t_dh), ("dW", dw, n_dw, t_dw)]:
        bound = max_abs_err(low, exact) + margin * float(exact.detach().abs().max())
        err = max_abs_err(ours, exact)
        assert err <= bound, f"{name}: loss-mode error {err:.2e} > naive {dtype} error + margin {bound:.2e}"


def test_incoming_gradient_scales_the_stored_ones():
    case = make_case(20, 32, 300)
    loss_fn = real_shaped_loss(20)
    _, _, dh, dw = run_loss(case, loss_fn, "torch", chunk_size=8)
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    loss, _ = judge_loss(hidden, weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                         score_values=case.score_values, chunk_size=8, backend="torch", **case.kwargs())
    (0.25 * loss + 1.0).backward()
    assert torch.allclose(hidden.grad, 0.25 * dh, rtol=1e-6, atol=0) and torch.allclose(weight.grad, 0.25 * dw, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_are_bit_identical_across_runs(backend):
    case = make_case(40, 32, 700, return_entropy=True)
    loss_fn = real_shaped_loss(40)
    first = run_loss(case, loss_fn, backend, chunk_size=16)
    second = run_loss(case, loss_fn, backend, chunk_size=16)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_one_sided_gradients_and_no_grad():
    case = make_case(20, 32, 300)
    loss_fn = real_shaped_loss(20)
    _, _, t_dh, t_dw = run_loss(case, loss_fn, "torch", chunk_size=None)
    weight = case.weight.clone().requires_grad_(True)
    loss, _ = judge_loss(case.hidden, weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                         score_values=case.score_values, backend="torch", **case.kwargs())
    loss.backward()
    assert torch.equal(weight.grad, t_dw)
    with torch.no_grad():
        loss_ng, out_ng = judge_loss(case.hidden, case.weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                                     score_values=case.score_values, backend="torch", **case.kwargs())
    assert not loss_ng.requires_grad and torch.isclose(loss_ng, loss.detach())


def test_without_score_tokens_and_empty_batch():
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (9,))
    loss, out = judge_loss(hidden, weight, targets, lambda o, r: -o.logprobs.sum(), backend="torch", chunk_size=4)
    assert out.score_logprobs.shape == (9, 0) and torch.equal(out.expected_score, torch.zeros(9))
    loss.backward()
    ref = -torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).sum()
    g = torch.autograd.grad(ref, hidden)[0]
    assert torch.allclose(hidden.grad, g, atol=1e-5)
    empty_h = torch.zeros(0, 16, requires_grad=True)
    loss, out = judge_loss(empty_h, weight, targets[:0], lambda o, r: o.logprobs.sum(), backend="torch")
    loss.backward()
    assert float(loss.detach()) == 0.0 and out.logprobs.shape == (0,)


def test_bad_arguments_are_named():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="loss_fn"):
        judge_loss(hidden, weight, targets, "sum")
    with pytest.raises(ValueError, match="chunk_size"):
        judge_loss(hidden, weight, targets, lambda o, r: o.logprobs.sum(), chunk_size=0)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        judge_loss(hidden, weight, targets, lambda o, r: o.logprobs, backend="torch")
    with pytest.raises(ValueError, match="score_token_ids"):
        judge_loss(hidden, weight, targets, lambda o, r: o.logprobs.sum(), score_values=[1.0])


def test_default_chunk_is_at_most_a_quarter_and_memory_stays_there():
    assert default_chunk_size(2048, 151_936, torch.device("cpu")) == 512
    assert default_chunk_size(16_384, 151_936, torch.device("cuda")) * 151_936 <= 16_384 * 151_936 // 4
    n, h, v = 64, 16, 20_000
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    with LargestAllocation() as watch:
        loss, _ = judge_loss(hidden, weight, targets, lambda o, r: o.logprobs.sum() + o.entropy.sum(),
                             score_token_ids=[1, 2], score_values=[1.0, 2.0], return_entropy=True, backend="torch")
        loss.backward()
    assert watch.largest <= max(n * v // 4, v * h), f"{watch.op} allocated {watch.largest} elements"


def test_autocast_does_not_lower_the_outputs():
    case = make_case(16, 32, 200, return_entropy=True)
    loss_fn = real_shaped_loss(16)
    plain = run_loss(case, loss_fn, "torch", chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = case.hidden.clone().requires_grad_(True)
        loss, out = judge_loss(hidden, case.weight, case.targets, loss_fn, score_token_ids=case.score_ids,
                               score_values=case.score_values, chunk_size=8, backend="torch", **case.kwargs())
    loss.backward()
    assert out.expected_score.dtype == torch.float32 and out.entropy.dtype == torch.float32
    assert torch.allclose(loss, plain[0], rtol=1e-6) and torch.allclose(hidden.grad, plain[2], rtol=1e-5, atol=1e-7)


def test_double_backward_is_refused_clearly():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss, _ = judge_loss(hidden, weight, torch.randint(0, 20, (6,)), lambda o, r: o.logprobs.sum(), backend="torch")
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_cpu_pass_reuses_its_logits_buffer_between_calls():
    from real_kernels.loss_torch import release_workspaces

    n, h, v = 64, 8, 5000  # the [32, V] buffer is the largest tensor of a call (dW is [V, 8])
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    loss_fn = lambda o, r: o.logprobs.sum()  # noqa: E731
    release_workspaces()
    with LargestAllocation(allocations_only=True) as watch:
        first = judge_loss(hidden, weight, targets, loss_fn, backend="torch", chunk_size=32)[0]
    assert watch.largest == 32 * v
    g1 = torch.autograd.grad(first, (hidden, weight))
    with LargestAllocation(allocations_only=True) as watch:
        second = judge_loss(hidden, weight, targets, loss_fn, backend="torch", chunk_size=32)[0]
        g2 = torch.autograd.grad(second, (hidden, weight))
    assert watch.largest < 32 * v  # no new [chunk, V] buffer: the first call's is reused
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    release_workspaces()


def test_no_grad_forms_no_gradients():
    """Under torch.no_grad() judge_loss must not spend an fp32 dW and a dh on inputs that require grad."""
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(37, 8, requires_grad=True)
    t = torch.randint(0, 37, (10,))
    seen = {}
    from real_kernels import loss as loss_mod

    original = loss_mod._Run.execute

    def spy(self, need_dh, need_dw, phase=None):
        seen["need"] = (need_dh, need_dw)
        return original(self, need_dh, need_dw, phase)

    loss_mod._Run.execute = spy
    try:
        with torch.no_grad():
            value, _ = judge_loss(h, w, t, lambda o, rows: -o.logprobs.sum(), backend="torch")
        assert seen["need"] == (False, False) and not value.requires_grad
        value, _ = judge_loss(h, w, t, lambda o, rows: -o.logprobs.sum(), backend="torch")
        assert seen["need"] == (True, True) and value.requires_grad
    finally:
        loss_mod._Run.execute = original
