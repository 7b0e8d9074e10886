"""``judge_head(memory="high")``: the forward through loss mode's chunks (cuBLAS logits, chunk_lse, the combine).

Against the fp64 reference, forward and backward, at odd shapes with
non-power-of-two vocabularies, chunks that do not divide N, every option; the
same in bf16 against the fp32-on-bf16-inputs truth; which forward ``"auto"``
picks; and the ``memory`` argument's validation.
"""
import pytest
import torch

from head_utils import OUTPUTS, _backward, check_against, make_case, run_exact
from real_kernels import judge_head, linear_logprobs
from real_kernels.ops import fused_head
from real_kernels.core.sizing import chunk_buffer_fits
from real_kernels.ops.head_config import BlockConfig
from real_kernels.core.validation import validate_head_args

FP32_RTOL = 1e-5
CHUNKS_OF_16 = BlockConfig(block_n=32, block_v=128, block_d=32, chunk_rows=16)

CASES = [
    dict(n=37, h=48, v=1001, normalize=True, temperature=0.7, return_entropy=True),
    dict(n=21, h=40, v=4099, normalize=False, temperature=1.3, return_entropy=False),
    dict(n=1, h=32, v=97, normalize=True, temperature=1.0, return_entropy=True, seed=3),
]


def run_chunked(case, cfg=CHUNKS_OF_16, memory="high"):
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    args = validate_head_args(hidden, weight, case.targets, case.score_ids, case.score_values, **case.kwargs())
    outs = dict(zip(OUTPUTS, fused_head.judge_head(args, cfg, memory=memory)))
    dh, dw = _backward(outs, case, hidden, weight)
    return outs, dh, dw


@pytest.mark.parametrize("options", CASES, ids=lambda o: f"N{o['n']}-V{o['v']}")
def test_chunked_forward_matches_fp64(options):
    o = dict(options)
    case = make_case(o.pop("n"), o.pop("h"), o.pop("v"), **o)
    outs, dh, dw = run_chunked(case)
    check_against(outs, dh, dw, run_exact(case), FP32_RTOL, "memory='high' vs fp64")


def test_chunked_forward_in_bf16_is_fp32_accurate():
    """bf16 inputs: the chunk's logits are fp32, so the outputs are as good as fp32 math on the bf16 inputs."""
    case = make_case(45, 64, 1031, dtype=torch.bfloat16, normalize=True, return_entropy=True, temperature=0.7,
                     scale=2.0)
    outs, dh, dw = run_chunked(case)
    truth_outs, t_dh, t_dw = run_exact(case)
    for k in OUTPUTS:
        err = float((outs[k].detach().double() - truth_outs[k].detach().double()).abs().max())
        assert err <= 1e-4, f"{k}: {err:.2e}"
    for name, got, want in (("dh", dh, t_dh), ("dW", dw, t_dw)):
        assert got.dtype == torch.bfloat16
        assert float((got.double() - want).norm() / want.norm()) <= 1e-2, name


def test_chunked_and_fused_forwards_agree_through_the_public_api():
    case = make_case(29, 24, 515, normalize=False, return_entropy=True, temperature=0.9)
    got = {}
    for memory in ("low", "high"):
        out = judge_head(case.hidden, case.weight, case.targets, case.score_ids, case.score_values,
                         backend="triton", memory=memory, **case.kwargs())
        got[memory] = out
    for k in OUTPUTS:
        assert torch.allclose(getattr(got["low"], k), getattr(got["high"], k), rtol=1e-5, atol=1e-6), k
    lp = linear_logprobs(case.hidden, case.weight, case.targets, temperature=case.temperature, backend="triton",
                         memory="high")
    assert torch.allclose(lp.logprobs, got["low"].logprobs, rtol=1e-5, atol=1e-6)


def test_auto_takes_chunks_only_on_cuda_when_the_buffer_fits():
    hidden = torch.zeros(4, 8)
    assert not fused_head.uses_chunks("auto", hidden, 100)  # the CPU interpreter runs the fused kernel
    assert fused_head.uses_chunks("high", hidden, 100) and not fused_head.uses_chunks("low", hidden, 100)
    v = 151_936
    assert chunk_buffer_fits(16_384, v, "cuda", free_bytes=4 * 128 * v * 4)
    assert not chunk_buffer_fits(16_384, v, "cuda", free_bytes=4 * 128 * v * 4 - 1)
    assert chunk_buffer_fits(3, v, "cuda", free_bytes=4 * 3 * v * 4)  # N < 128: N rows must fit


def test_memory_is_validated_by_name():
    case = make_case(4, 8, 30)
    for bad in ("fast", None, 1):
        with pytest.raises(ValueError, match="memory"):
            judge_head(case.hidden, case.weight, case.targets, case.score_ids, case.score_values, memory=bad)
    with pytest.raises(ValueError, match="memory"):
        linear_logprobs(case.hidden, case.weight, case.targets, memory="LOW")
