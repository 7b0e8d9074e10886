"""Every backend against the fp64 reference and the fp32 reference, forward and backward.

Odd shapes (N in {1, 37, 130}, H in {48, 96}, V in {97, 1000, 4099}), score ids
at the first and last vocabulary id and at tile edges (127 | 128 with 128-wide
tiles), ignore_index rows, temperatures 0.7 / 1.0 / 1.5, normalize and entropy
on and off, and random upstream gradients with positive, negative and zero rows
on every output.
"""
import itertools

import pytest
import torch

from head_utils import SMALL_TILES, check_against, make_case, rel_err, run_backend, run_exact

SHAPES = list(itertools.product((1, 37, 130), (48, 96), (97, 1000, 4099)))
TEMPERATURES = (1.0, 0.7, 1.5)
FP32_RTOL = 1e-5  # error relative to the tensor's scale


def _options(i):
    """Rotate the options over the shapes so that each value meets every N, H and V."""
    return dict(temperature=TEMPERATURES[i % 3], normalize=bool(i % 2), return_entropy=bool((i // 2) % 2))


CASES = [(shape, _options(i)) for i, shape in enumerate(SHAPES)]
IDS = [f"N{n}-H{h}-V{v}-t{o['temperature']}-norm{int(o['normalize'])}-ent{int(o['return_entropy'])}"
       for (n, h, v), o in CASES]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("shape,options", CASES, ids=IDS)
def test_backend_matches_fp64_and_reference(backend, shape, options):
    n, h, v = shape
    case = make_case(n, h, v, seed=n * 7 + h + v, **options)
    outs, dh, dw = run_backend(case, backend, cfg=SMALL_TILES if backend == "triton" else None)
    assert all(torch.isfinite(t).all() for t in [dh, dw] + [o for o in outs.values() if o is not None])
    check_against(outs, dh, dw, run_exact(case), FP32_RTOL, f"{backend} vs fp64")
    if backend != "reference":
        check_against(outs, dh, dw, run_backend(case, "reference"), FP32_RTOL, f"{backend} vs fp32 reference")


@pytest.mark.parametrize("n,h,v", [(37, 96, 4099), (130, 48, 1000)])
def test_triton_default_launch_config(n, h, v):
    """The config that backend='triton' picks by itself (large tiles, one split)."""
    case = make_case(n, h, v, normalize=True, return_entropy=True, temperature=0.7)
    outs, dh, dw = run_backend(case, "triton")
    check_against(outs, dh, dw, run_exact(case), FP32_RTOL, "triton default config vs fp64")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_on_some_outputs_only(backend):
    """Upstream gradient on logprobs alone, then on expected_score alone (others get None)."""
    case = make_case(37, 48, 1000, normalize=True)
    for only in ("logprobs", "expected_score", "score_logprobs"):
        case.grads = {k: (g if k == only else torch.zeros_like(g)) for k, g in case.grads.items()}
        outs, dh, dw = run_backend(case, backend, cfg=SMALL_TILES if backend == "triton" else None)
        t_outs, t_dh, t_dw = run_exact(case)
        assert rel_err(dh, t_dh) <= FP32_RTOL and rel_err(dw, t_dw) <= FP32_RTOL, only


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_linear_logprobs_matches_judge_head(backend):
    from real_kernels import linear_logprobs

    case = make_case(37, 48, 1000)
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    out = linear_logprobs(h, w, case.targets, temperature=1.5, return_entropy=True, backend=backend)
    ref = run_exact(make_case(37, 48, 1000, temperature=1.5, return_entropy=True))[0]
    assert rel_err(out.logprobs, ref["logprobs"]) <= FP32_RTOL
    assert rel_err(out.entropy, ref["entropy"]) <= FP32_RTOL
    assert (out.logprobs[case.targets == -100] == 0).all()
    (out.logprobs * case.grads["logprobs"] + out.entropy * case.grads["entropy"]).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    no_entropy = linear_logprobs(case.hidden, case.weight, case.targets, backend=backend)
    assert no_entropy.entropy is None


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_custom_ignore_index_and_one_sided_grads(backend):
    """ignore_index other than -100; grads w.r.t. only hidden or only weight; non-contiguous hidden."""
    from real_kernels import judge_head

    case = make_case(37, 48, 97)
    targets = case.targets.clone()
    targets[targets == -100] = -1
    base = torch.randn(48, 37)
    hidden = base.T  # non-contiguous [37, 48]
    for wants in ((True, False), (False, True)):
        h = hidden.detach().requires_grad_(wants[0])
        w = case.weight.clone().requires_grad_(wants[1])
        o = judge_head(h, w, targets, case.score_ids, case.score_values, ignore_index=-1, backend=backend)
        r = judge_head(h, w, targets, case.score_ids, case.score_values, ignore_index=-1, backend="reference")
        assert rel_err(o.logprobs, r.logprobs) <= FP32_RTOL
        assert (o.logprobs[targets == -1] == 0).all()
        leaf = h if wants[0] else w
        g, = torch.autograd.grad((o.logprobs * case.grads["logprobs"]).sum() + o.expected_score.sum(), leaf)
        g_ref, = torch.autograd.grad((r.logprobs * case.grads["logprobs"]).sum() + r.expected_score.sum(), leaf)
        assert rel_err(g, g_ref) <= FP32_RTOL


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_empty_batch(backend):
    from real_kernels import judge_head

    h = torch.zeros(0, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    o = judge_head(h, w, torch.zeros(0, dtype=torch.long), [1, 2], [1.0, 2.0], backend=backend)
    assert o.logprobs.shape == (0,) and o.score_logprobs.shape == (0, 2)
    (o.logprobs.sum() + o.expected_score.sum()).backward()
    assert w.grad is not None and w.grad.abs().sum() == 0
