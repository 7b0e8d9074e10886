"""Bad input raises ValueError / TypeError naming the argument (docs/design.md section 4),
never a silent NaN or an out-of-bounds read in a kernel."""
import pytest
import torch

from real_kernels import judge_head, linear_logprobs

N, H, V = 6, 16, 50


def _args(**over):
    args = dict(
        hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)),
        score_token_ids=[3, 4, 5], score_values=[1.0, 2.0, 3.0],
    )
    args.update(over)
    return args


def _call(backend="torch", **over):
    a = _args(**{k: v for k, v in over.items() if k in ("hidden", "weight", "targets", "score_token_ids", "score_values")})
    kw = {k: v for k, v in over.items() if k not in a}
    return judge_head(a["hidden"], a["weight"], a["targets"], a["score_token_ids"], a["score_values"], backend=backend, **kw)


BAD = [
    ("hidden", dict(hidden=torch.randn(N * H)), ValueError),
    ("hidden", dict(hidden=torch.randint(0, 3, (N, H))), TypeError),
    ("hidden", dict(hidden=torch.randn(N, H, dtype=torch.float64), weight=torch.randn(V, H, dtype=torch.float64)), TypeError),
    ("weight", dict(weight=torch.randn(V, H + 1)), ValueError),
    ("weight", dict(weight=torch.randn(V, H).half()), TypeError),
    ("weight", dict(weight=torch.randn(V * H)), ValueError),
    ("targets", dict(targets=torch.randint(0, V, (N + 1,))), ValueError),
    ("targets", dict(targets=torch.rand(N)), TypeError),
    ("targets", dict(targets=torch.full((N,), V)), ValueError),
    ("targets", dict(targets=torch.full((N,), -5)), ValueError),
    ("targets", dict(targets=torch.zeros(N, dtype=torch.long, device="meta")), ValueError),
    ("score_token_ids", dict(score_token_ids=[]), ValueError),
    ("score_token_ids", dict(score_token_ids=[3, 3, 4]), ValueError),
    ("score_token_ids", dict(score_token_ids=[3, 4, V]), ValueError),
    ("score_token_ids", dict(score_token_ids=[-1, 4, 5]), ValueError),
    ("score_token_ids", dict(score_token_ids=torch.tensor([3.0, 4.0, 5.0])), TypeError),
    ("score_values", dict(score_values=[1.0, float("nan"), 3.0]), ValueError),
    ("score_values", dict(score_values=[1.0, float("inf"), 3.0]), ValueError),
    ("score_values", dict(score_values=[1.0, 2.0]), ValueError),
    ("temperature", dict(temperature=0.0), ValueError),
    ("temperature", dict(temperature=-1.0), ValueError),
    ("temperature", dict(temperature=float("nan")), ValueError),
    ("score_targets", dict(score_targets=torch.rand(N + 2)), ValueError),
    ("score_mask", dict(score_targets=torch.rand(N), score_mask=torch.ones(N)), TypeError),
    ("score_mask", dict(score_mask=torch.ones(N, dtype=torch.bool)), ValueError),
    ("weight", dict(weight=torch.randn(V, H, device="meta")), ValueError),
    ("backend", dict(backend="cuda"), ValueError),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("name,over,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(backend, name, over, exc):
    over = dict(over)
    backend = over.pop("backend", backend)
    with pytest.raises(exc, match=name):
        _call(backend=backend, **over)


def test_ignore_index_targets_are_allowed_and_custom_ignore_index_is_checked():
    t = torch.randint(0, V, (N,))
    t[0] = -100
    _call(targets=t)
    t[0] = -7
    with pytest.raises(ValueError, match="targets"):
        _call(targets=t)
    _call(targets=t, ignore_index=-7)


def test_linear_logprobs_validates_too():
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.randn(N, H), torch.randn(V, H), torch.full((N,), V))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(torch.randn(N, H), torch.randn(V, H), torch.zeros(N, dtype=torch.long), temperature=0)


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(backend="triton")


def test_outputs_follow_the_contract():
    """fp32 outputs for bf16 inputs, shapes, entropy None unless asked, sq_error 0 without targets."""
    a = _args(hidden=torch.randn(N, H).bfloat16(), weight=torch.randn(V, H).bfloat16())
    for backend in ("torch", "triton", "reference"):
        out = judge_head(a["hidden"], a["weight"], a["targets"], a["score_token_ids"], a["score_values"], backend=backend)
        assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (N,)
        assert out.score_logprobs.dtype == torch.float32 and out.score_logprobs.shape == (N, 3)
        assert out.expected_score.shape == (N,) and out.sq_error.shape == (N,)
        assert out.entropy is None
        assert (out.sq_error == 0).all()
        assert ((out.expected_score >= 0) & (out.expected_score <= 3)).all()
