"""Peers' edge cases (Liger-Kernel, Cut Cross-Entropy, verl, TRL suites) as our own tests.

Every backend against the fp64 reference, forward and backward; the Triton
kernels both with the launch config they pick themselves (64-row, 256-wide
tiles, one vocabulary split) and with small tiles (32 x 128, three splits).
Not repeated here: what tests/test_head_correctness.py already covers
(N in {1, 37, 130} x V in {97, 1000, 4099} at temperatures 0.7 / 1.0 / 1.5).

- a single row, alone or ignored; every row ignored;
- N not a multiple of any block (65 = 64 + 1 = 2 * 32 + 1);
- prime V (257, 509, 1021) and V not a multiple of 256 (255, 257, 300);
- temperature 0.5 and 2 for log-probs and entropy, in ``judge_head`` and in
  ``linear_logprobs`` (the kernels' no-score variant);
- |logits| ~ 1e4 at temperatures 0.5 and 2, all outputs and gradients.
"""
import pytest
import torch

from head_utils import OUTPUTS, SMALL_TILES, check_against, extreme_case, make_case, rel_err, run_backend, run_exact
from real_kernels import linear_logprobs

BACKENDS = {"torch": None, "triton": None, "triton-small-tiles": SMALL_TILES, "reference": None}
FP32_RTOL = 1e-5

CASES = {
    "single-row-V257-t2": dict(n=1, h=24, v=257, temperature=2.0, return_entropy=True),
    "single-ignored-row-V255-t0.5": dict(n=1, h=24, v=255, temperature=0.5, return_entropy=True, ignore_every=1,
                                          normalize=True),
    "all-rows-ignored-V300": dict(n=6, h=24, v=300, return_entropy=True, ignore_every=1),
    "N65-V509-t0.5": dict(n=65, h=40, v=509, temperature=0.5, return_entropy=True, normalize=True),
    "N65-V1021-t2": dict(n=65, h=24, v=1021, temperature=2.0, return_entropy=True),
    "N3-V300-t2-no-entropy": dict(n=3, h=16, v=300, temperature=2.0),
}


def _run(case, backend):
    return run_backend(case, backend.split("-")[0], cfg=BACKENDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(CASES))
def test_edge_case_matches_fp64(backend, name):
    options = dict(CASES[name])
    case = make_case(options.pop("n"), options.pop("h"), options.pop("v"), seed=len(name), **options)
    outs, dh, dw = _run(case, backend)
    check_against(outs, dh, dw, run_exact(case), FP32_RTOL, f"{backend} {name} vs fp64")
    ignored = case.targets == case.ignore_index
    assert (outs["logprobs"][ignored] == 0).all()
    if name.startswith("all-rows-ignored"):
        assert ignored.all() and dh.abs().sum() > 0  # the score outputs and entropy still carry gradient


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_linear_logprobs_temperature_matches_fp64(backend, temperature):
    """log-probs and entropy without score tokens, forward and backward."""
    case = make_case(37, 32, 509, temperature=temperature, return_entropy=True, seed=5)
    truth, t_dh, t_dw = run_exact(case)
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    if BACKENDS[backend] is None:
        out = linear_logprobs(hidden, weight, case.targets, temperature=temperature, return_entropy=True,
                              backend=backend)
        logprobs, entropy = out.logprobs, out.entropy
    else:
        from real_kernels.ops import fused_head
        from real_kernels.core.validation import validate_head_args

        args = validate_head_args(hidden, weight, case.targets, temperature=temperature, return_entropy=True,
                                  need_scores=False)
        logprobs, _, _, _, entropy = fused_head.judge_head(args, BACKENDS[backend])
    assert rel_err(logprobs, truth["logprobs"]) <= FP32_RTOL
    assert rel_err(entropy, truth["entropy"]) <= FP32_RTOL
    loss = (logprobs.double() * case.grads["logprobs"]).sum() + (entropy.double() * case.grads["entropy"]).sum()
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    # the truth's gradient includes the score outputs' terms: take it again without them
    case.grads = {k: (g if k in ("logprobs", "entropy") else torch.zeros_like(g)) for k, g in case.grads.items()}
    _, t_dh, t_dw = run_exact(case)
    assert rel_err(dh, t_dh) <= FP32_RTOL and rel_err(dw, t_dw) <= FP32_RTOL


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_all_rows_ignored_gives_zero_and_no_gradient(backend):
    case = make_case(7, 16, 255, ignore_every=1, seed=2)
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    out = linear_logprobs(hidden, weight, case.targets, backend=backend.split("-")[0])
    assert out.logprobs.dtype == torch.float32 and (out.logprobs == 0).all()
    (out.logprobs * torch.randn(7)).sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def _errors(result, truth):
    (outs, dh, dw), (t_outs, t_dh, t_dw) = result, truth
    return dict({k: rel_err(outs[k], t_outs[k]) for k in OUTPUTS}, dh=rel_err(dh, t_dh), dW=rel_err(dw, t_dw))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_extreme_logits_match_fp64(backend, temperature):
    """|logits| ~ 1e4: every output and both gradients against fp64, not only finiteness.

    At this scale fp32 logits carry an absolute error of ~1e-3, so the entropy of near-tied rows is
    only good to ~1e-3 even in the plain fp32 reference: each error may be at most twice the fp32
    reference's own (and 1e-5 where that is smaller).
    """
    case = extreme_case(n=21, h=32, v=300, normalize=True, temperature=temperature)
    truth = run_exact(case)
    naive = _errors(run_backend(case, "reference"), truth)
    got = _errors(_run(case, backend), truth)
    for k, err in got.items():
        assert err <= max(FP32_RTOL, 2 * naive[k]), f"{k}: relative error {err:.2e}, fp32 reference {naive[k]:.2e}"
