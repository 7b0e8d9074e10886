"""bf16 / fp16 inputs: the fused result is no further from fp64 than a naive
computation in the same low precision (logits, log_softmax and gradients in
bf16 / fp16, as a plain PyTorch trainer would run), plus a small margin.
This is Cut Cross-Entropy's style of tolerance: a fair bar for low precision."""
import pytest
import torch

from head_utils import OUTPUTS, SMALL_TILES, make_case, max_abs_err, run_backend, run_exact

MARGIN = 1e-3  # relative to the scale of the fp64 truth


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n,h,v,normalize", [(37, 96, 1000, True), (130, 48, 4099, False)])
def test_low_precision_no_worse_than_naive(dtype, backend, n, h, v, normalize):
    case = make_case(n, h, v, dtype=dtype, normalize=normalize, return_entropy=True, temperature=0.7)
    truth = run_exact(case)
    naive = run_exact(case, low_precision_naive=True)
    outs, dh, dw = run_backend(case, backend, cfg=SMALL_TILES if backend == "triton" else None)
    assert dh.dtype == dtype and dw.dtype == dtype
    pairs = [(k, outs[k], naive[0][k], truth[0][k]) for k in OUTPUTS]
    pairs += [("dh", dh, naive[1], truth[1]), ("dW", dw, naive[2], truth[2])]
    for name, ours, low, exact in pairs:
        assert ours.dtype == (dtype if name in ("dh", "dW") else torch.float32), name
        bound = max_abs_err(low, exact) + MARGIN * float(exact.detach().abs().max())
        err = max_abs_err(ours, exact)
        assert err <= bound, f"{name}: fused error {err:.2e} > naive {dtype} error + margin {bound:.2e}"
