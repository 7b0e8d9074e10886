"""Loss mode's numerics with bf16 inputs: fp32 logits, bf16 dlogits over them, dW summed in fp32.

Guards against a past bug: the Triton chunk pass used to read every output from the chunk's
logits rounded to bf16; at logits of std 2 (gpu_check's problem) that put
log-probs off by 0.02-0.04 at T = 0.7.  The logits are now written in fp32
(``grad_gemms.logits_fp32``) and the outputs are fp32-accurate; these tests
hold them to 1e-3 against fp64 (gpu_check's bound is 1e-2), under the Triton
interpreter, and check the pieces (the fp32 logits GEMM, the dlogits written
over the logits' own rows, the dW accumulation without fp32-output GEMMs).
"""
import pytest
import torch

from real_kernels import judge_loss
from real_kernels.core import reference
from real_kernels.core.grad_gemms import GradBuffers, fp32_out_gemm_ok, logits_fp32
from real_kernels.ops.chunk_pass import block_v_for, dlogits_launch, dlogits_view

IDS = [3, 100, 500, 1000, 1000 + 1]
VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]


def std2_problem(n=48, h=64, v=1031, seed=0):
    """bf16 inputs whose logits have std 2, as in benchmarks/gpu_check.py."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = (torch.randn(v, h, generator=gen) * 2 / h ** 0.5).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100
    score_targets = torch.rand(n, generator=gen) * 4 + 1
    adv = torch.randn(n, generator=gen)
    return hidden, weight, targets, score_targets, adv


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_bf16_loss_mode_is_fp32_accurate(temperature, normalize):
    hidden, weight, targets, score_targets, adv = std2_problem()
    kw = dict(score_targets=score_targets, normalize=normalize, temperature=temperature, return_entropy=True)

    def loss_fn(out, rows):
        return -(adv[rows] * out.logprobs).sum() + out.sq_error.sum() - 0.1 * out.entropy.sum()

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, out = judge_loss(h, w, targets, loss_fn, score_token_ids=IDS, score_values=VALUES, chunk_size=20,
                           backend="triton", **kw)
    loss.backward()

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference.judge_head(h64, w64, targets, torch.tensor(IDS), torch.tensor(VALUES, dtype=torch.float64),
                               compute_dtype=torch.float64, **{**kw, "score_targets": score_targets.double()})
    names = ("logprobs", "score_logprobs", "expected_score", "sq_error", "entropy")
    for name, want in zip(names, ref):
        err = float((getattr(out, name).detach().double() - want.detach()).abs().max())
        assert err <= 1e-3, f"{name}: max error {err:.2e} against fp64"
    ref_loss = -(adv.double() * ref[0]).sum() + ref[3].sum() - 0.1 * ref[4].sum()
    ref_loss.backward()
    for name, got, want in (("dh", h.grad, h64.grad), ("dW", w.grad, w64.grad)):
        assert got.dtype == torch.bfloat16
        rel = float((got.double() - want).norm() / want.norm())
        assert rel <= 1e-2, f"{name}: relative error {rel:.2e}"  # bf16 gradients round at ~4e-3


def test_logits_are_fp32_products_of_the_bf16_inputs():
    gen = torch.Generator().manual_seed(1)
    h = (torch.randn(9, 40, generator=gen) * 3).bfloat16()
    w = (torch.randn(77, 40, generator=gen) * 3).bfloat16()
    out = torch.empty(9, 77)
    logits_fp32(h, w.T, out)
    exact = h.double() @ w.double().T
    assert float((out.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("entropy", [False, True])
def test_dlogits_written_over_the_logits_rows(dtype, entropy):
    """The kernel reads fp32 logits and writes dz into the first half of the same rows (bf16 / fp16)."""
    gen = torch.Generator().manual_seed(2)
    c, v, inv_temp = 5, 3001, 1 / 0.7
    z = torch.randn(c, v, generator=gen) * 3
    z_before = z.clone()
    lse = torch.logsumexp(z * inv_temp, 1)
    dense = torch.randn(c, generator=gen)
    ent = torch.randn(c, generator=gen) if entropy else None
    dz = dlogits_view(z, dtype)
    assert dz.shape == (c, v) and dz.dtype == dtype and dz.data_ptr() == z.data_ptr()
    dlogits_launch(z, dz, lse, dense, ent, inv_temp, block_v_for(v))()
    logp = z_before * inv_temp - lse[:, None]
    want = logp.exp() * (dense[:, None] - (0 if ent is None else ent[:, None] * logp))
    ulp = max(torch.finfo(dtype).eps, 1e-6) * float(want.abs().max())  # one rounding to dtype at the largest entry
    assert float((dz.float() - want).abs().max()) <= ulp


def test_dw_without_fp32_output_gemms_is_summed_in_fp32():
    """The CPU (and a torch without ``out_dtype`` GEMMs): bf16 shares, each rounded once, summed in fp32."""
    assert not fp32_out_gemm_ok(torch.device("cpu"), torch.bfloat16)  # torch has no CPU kernel for mm.dtype
    gen = torch.Generator().manual_seed(3)
    n, hdim, v = 96, 24, 301
    hidden = torch.randn(n, hdim, generator=gen).bfloat16()
    weight = torch.randn(v, hdim, generator=gen).bfloat16()
    grads = GradBuffers(hidden, weight, torch.bfloat16, need_dh=True, need_dw=True)
    assert not grads.fp32_out
    dz = (torch.randn(n, v, generator=gen) * 1e-2).bfloat16()
    rows = [slice(0, 40), slice(40, 80), slice(80, 96)]
    for i, r in enumerate(rows):
        grads.add_chunk(dz[r], r, first=i == 0)
    dh, dw = grads.finish(torch.float32, torch.float32)
    exact_dw = dz.double().T @ hidden.double()
    share_scale = sum((dz[r].double().abs().T @ hidden[r].double().abs()) for r in rows)
    assert torch.all((dw.double() - exact_dw).abs() <= 2 ** -8 * share_scale + 1e-12)
    exact_dh = dz.double() @ weight.double()
    assert float((dh.double() - exact_dh).abs().max()) <= 2 ** -8 * float(exact_dh.abs().max())
