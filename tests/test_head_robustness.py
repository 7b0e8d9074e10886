"""No silent wrong answers from the head, on every backend.

1. Strided, offset and int32 arguments give the same outputs and gradients as
   their contiguous copies; a weight that is a view of a larger tensor (tied
   embeddings, a column slice) is read in place, not copied, by the kernels.
2. One NaN rule: a non-finite input row gives non-finite outputs for that row
   only; other rows' outputs and ``dh`` rows are those of the clean input; a
   value that ``score_mask`` excludes touches nothing (not even ``dW``).
3. ``create_graph=True`` through a fused backward is one clear error
   (the reference backend supports it).
4. Outputs are fp32 under ``torch.autocast``; non-integral score ids are refused.
"""
import contextlib
import functools

import numpy as np
import pytest
import torch

from head_utils import OUTPUTS, SMALL_TILES, LargestAllocation, make_case, rel_err
from real_kernels import judge_head

BACKENDS = ["torch", "triton", "reference"]
N, H, V = 13, 32, 300
IDS, VALUES = [0, 127, 128, 299], [1.0, 2.0, 3.0, 4.0]


def _base(return_entropy=True):
    case = make_case(N, H, V, score_ids=IDS, normalize=True, return_entropy=return_entropy, seed=3)
    return dict(hidden=case.hidden, weight=case.weight, targets=case.targets, score_token_ids=list(IDS),
                score_values=list(VALUES), score_targets=case.score_targets, score_mask=case.score_mask,
                normalize=True, return_entropy=return_entropy), case.grads


def _run(backend, args, grads, *, leaves=("hidden", "weight"), forward_context=contextlib.nullcontext):
    """Outputs, and the gradients of sum(output * upstream) w.r.t. the named leaf tensors."""
    args = dict(args)
    for k in leaves:
        args[k] = args[k].detach().requires_grad_(True)
    with forward_context():
        out = judge_head(backend=backend, **args)
    outs = {k: getattr(out, k) for k in OUTPUTS}
    # where() rather than a product: a NaN output must not turn the other rows' upstream terms into NaN
    loss = sum(torch.where(grads[k] != 0, outs[k] * grads[k], 0.0).sum() for k in OUTPUTS if outs[k] is not None)
    grad = torch.autograd.grad(loss, [args[k] for k in leaves])
    return outs, dict(zip(leaves, grad))


def _strided(x, step=3, offset=1):
    """The same values as x, stored every step-th element of a larger buffer at an offset."""
    buf = torch.zeros((x.shape[0] * step + offset,) + tuple(x.shape[1:]), dtype=x.dtype)
    view = buf[offset::step]
    view.copy_(x)
    assert not view.is_contiguous() and view.storage_offset() > 0
    return view


def _column_slice(x):
    """x as the right half of a [rows, 2 * cols] buffer (row stride 2 * cols, storage offset cols)."""
    buf = torch.randn(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    buf[:, x.shape[1]:] = x
    return buf[:, x.shape[1]:]


def _tied_rows(x):
    """x as rows 7..7+V of a larger embedding table: contiguous rows, storage offset 7 * H."""
    buf = torch.randn(x.shape[0] + 20, x.shape[1], dtype=x.dtype)
    buf[7:7 + x.shape[0]] = x
    return buf[7:7 + x.shape[0]]


def _transposed(x):
    """x with column-major storage (stride (1, rows))."""
    return x.t().contiguous().t()


VARIANTS = {
    "targets-stride3-offset": ("targets", _strided),
    "targets-int32": ("targets", lambda t: t.int()),
    "targets-int32-strided": ("targets", lambda t: _strided(t.int())),
    "score_targets-stride3": ("score_targets", _strided),
    "score_targets-fp64-strided": ("score_targets", lambda t: _strided(t.double())),
    "score_mask-stride3": ("score_mask", _strided),
    "score_token_ids-strided-tensor": ("score_token_ids", lambda ids: _strided(torch.tensor(ids))),
    "score_token_ids-int32-tensor": ("score_token_ids", lambda ids: torch.tensor(ids, dtype=torch.int32)),
    "score_values-strided-tensor": ("score_values", lambda v: _strided(torch.tensor(v))),
    "hidden-column-slice": ("hidden", _column_slice),
    "hidden-stride3-rows": ("hidden", _strided),
    "hidden-transposed": ("hidden", _transposed),
    "weight-tied-rows": ("weight", _tied_rows),
    "weight-column-slice": ("weight", _column_slice),
    "weight-transposed": ("weight", _transposed),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_strided_arguments_match_contiguous(backend, variant):
    args, grads = _base()
    name, make = VARIANTS[variant]
    odd = dict(args, **{name: make(args[name])})
    want, want_g = _run(backend, args, grads)
    got, got_g = _run(backend, odd, grads)
    for k in OUTPUTS:
        assert got[k].dtype == torch.float32
        assert rel_err(got[k], want[k]) <= 1e-6, f"{variant}: {k} differs from the contiguous call"
    for k in ("hidden", "weight"):
        assert rel_err(got_g[k], want_g[k]) <= 1e-6, f"{variant}: d{k} differs from the contiguous call"


@pytest.mark.parametrize("make", [_tied_rows, _column_slice], ids=["tied-rows", "column-slice"])
def test_triton_reads_a_weight_view_in_place(make):
    """The kernels take the weight's row stride: a view with unit column stride is never copied (V * H)."""
    args, _ = _base(return_entropy=False)
    weight = make(args["weight"]).requires_grad_(True)
    with LargestAllocation(allocations_only=True) as watch:
        judge_head(**dict(args, weight=weight, backend="triton"))
    assert watch.largest < V * H, f"{watch.op} allocated {watch.largest} elements: a copy of the weight"


# ---- 2. NaN rule --------------------------------------------------------------------------------

# the Triton interpreter's numpy matmul warns about the NaN rows these tests feed it on purpose
nan_inputs = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")

NAN_HIDDEN, INF_HIDDEN, NAN_TARGET_IN, NAN_TARGET_OUT = 2, 5, 7, 4


def _poisoned(args, rows):
    """args with a NaN / inf hidden row and NaN score targets on an included and an excluded row."""
    hidden, st, mask = args["hidden"].clone(), args["score_targets"].clone(), args["score_mask"].clone()
    targets = args["targets"].clone()
    targets[[NAN_HIDDEN, INF_HIDDEN]] = 11  # not ignored: their log-probs must be non-finite
    mask[[NAN_TARGET_IN, NAN_TARGET_OUT]] = torch.tensor([True, False])
    mask[[NAN_HIDDEN, INF_HIDDEN]] = True
    clean = dict(args, targets=targets, score_mask=mask)
    if NAN_HIDDEN in rows:
        hidden[NAN_HIDDEN, 3] = float("nan")
    if INF_HIDDEN in rows:
        hidden[INF_HIDDEN, 0] = float("inf")
    for r in (NAN_TARGET_IN, NAN_TARGET_OUT):
        if r in rows:
            st[r] = float("nan")
    return clean, dict(clean, hidden=hidden, score_targets=st)


def _same_rows(got, want, rows, keys=OUTPUTS):
    """got[k] equals want[k] on the given rows, for every key."""
    for k in keys:
        assert rel_err(got[k][rows], want[k][rows]) <= 1e-6, k


@nan_inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_stay_in_their_row(backend):
    args, grads = _base()
    clean, bad = _poisoned(args, {NAN_HIDDEN, INF_HIDDEN, NAN_TARGET_IN, NAN_TARGET_OUT})
    want, want_g = _run(backend, clean, grads)
    got, got_g = _run(backend, bad, grads)
    for r in (NAN_HIDDEN, INF_HIDDEN):
        for k in OUTPUTS:
            assert not torch.isfinite(got[k][r]).any(), f"row {r} has a non-finite hidden state but {k} = {got[k][r]}"
    assert torch.isnan(got["sq_error"][NAN_TARGET_IN])
    assert torch.isfinite(got["expected_score"][NAN_TARGET_IN])  # does not depend on the target
    assert got["sq_error"][NAN_TARGET_OUT] == 0
    others = torch.ones(N, dtype=torch.bool)
    others[[NAN_HIDDEN, INF_HIDDEN, NAN_TARGET_IN]] = False
    _same_rows(got, want, others)
    # dh rows are per row; dW sums every row, so the non-finite rows make it non-finite (as the loss is)
    _same_rows(got_g, want_g, others, ["hidden"])
    assert not torch.isfinite(got_g["hidden"][[NAN_HIDDEN, INF_HIDDEN, NAN_TARGET_IN]]).all(dim=1).any()


@nan_inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [NAN_TARGET_OUT, NAN_TARGET_IN, NAN_HIDDEN], ids=["target-masked-out", "target-in", "hidden"])
def test_one_non_finite_row_leaves_the_rest_exact(backend, row):
    """One bad row alone: a NaN target that score_mask excludes changes nothing, not even dW."""
    args, grads = _base()
    clean, bad = _poisoned(args, {row})
    want, want_g = _run(backend, clean, grads)
    got, got_g = _run(backend, bad, grads)
    others = torch.arange(N) != row
    if row == NAN_TARGET_OUT:
        others[:] = True
    _same_rows(got, want, others)
    _same_rows(got_g, want_g, others, ["hidden"])
    if row == NAN_TARGET_OUT:
        assert rel_err(got_g["weight"], want_g["weight"]) <= 1e-6
    else:
        assert not torch.isfinite(got_g["weight"]).all()


@nan_inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_row_in_linear_logprobs(backend):
    from real_kernels import linear_logprobs

    args, _ = _base()
    hidden = args["hidden"].clone()
    hidden[1] = float("nan")
    targets = args["targets"].clone()
    targets[1] = 4
    out = linear_logprobs(hidden, args["weight"], targets, return_entropy=True, temperature=0.5, backend=backend)
    ref = linear_logprobs(args["hidden"], args["weight"], targets, return_entropy=True, temperature=0.5,
                          backend=backend)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1])
    keep = torch.arange(N) != 1
    assert rel_err(out.logprobs[keep], ref.logprobs[keep]) <= 1e-6
    assert rel_err(out.entropy[keep], ref.entropy[keep]) <= 1e-6


# ---- 3. double backward -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_one_clear_error(backend):
    args, _ = _base()
    hidden = args["hidden"].detach().requires_grad_(True)
    out = judge_head(backend=backend, **dict(args, hidden=hidden))
    with pytest.raises(RuntimeError, match=r"first-order.*backend='reference'"):
        torch.autograd.grad(out.logprobs.sum() + out.expected_score.sum(), hidden, create_graph=True)
    # first order still works on the same graph
    out = judge_head(backend=backend, **dict(args, hidden=hidden))
    (g,) = torch.autograd.grad(out.logprobs.sum(), hidden)
    assert g.grad_fn is None and torch.isfinite(g).all()


def test_reference_supports_double_backward():
    args, _ = _base()
    hidden = args["hidden"].detach().requires_grad_(True)
    out = judge_head(backend="reference", **dict(args, hidden=hidden))
    (g,) = torch.autograd.grad(out.logprobs.sum() + out.expected_score.sum(), hidden, create_graph=True)
    assert g.grad_fn is not None
    (gg,) = torch.autograd.grad((g * g).sum(), hidden)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


# ---- 4. autocast and score ids ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_fp32_under_autocast(backend):
    args, grads = _base()
    want, want_g = _run(backend, args, grads)
    # forward under autocast, backward outside it (as torch.autocast's documentation asks)
    got, got_g = _run(backend, args, grads,
                      forward_context=functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16))
    for k in OUTPUTS:
        assert got[k].dtype == torch.float32, f"{k} is {got[k].dtype} under autocast"
        assert rel_err(got[k], want[k]) <= 1e-6, k
    for k in ("hidden", "weight"):
        assert got_g[k].dtype == torch.float32 and rel_err(got_g[k], want_g[k]) <= 1e-6, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ids", [[10.7, 11.2], [10.0, 11.0], [True, False], ["10", "11"], [np.float64(10.0), 11]],
                         ids=["fractional", "integral-floats", "bools", "strings", "numpy-float"])
def test_non_integer_score_ids_are_refused(backend, ids):
    args, _ = _base()
    with pytest.raises(TypeError, match="score_token_ids"):
        judge_head(backend=backend, **dict(args, score_token_ids=ids, score_values=[1.0, 2.0]))


@pytest.mark.parametrize("ids", [[np.int64(10), np.int32(11)], torch.tensor([10, 11], dtype=torch.int16),
                                 [torch.tensor(10), torch.tensor(11)]], ids=["numpy-ints", "int16-tensor", "0d-tensors"])
def test_integer_score_ids_of_any_kind_are_accepted(ids):
    args, _ = _base()
    out = judge_head(backend="torch", **dict(args, score_token_ids=ids, score_values=[1.0, 2.0]))
    ref = judge_head(backend="torch", **dict(args, score_token_ids=[10, 11], score_values=[1.0, 2.0]))
    assert torch.equal(out.score_logprobs, ref.score_logprobs)


def test_small_tiles_see_strided_targets_too():
    """The launch config with several vocabulary splits: strided targets and score targets still exact."""
    from real_kernels.ops import fused_head
    from real_kernels.core.validation import validate_head_args

    args, _ = _base()
    args = dict(args, targets=_strided(args["targets"]), score_targets=_strided(args["score_targets"]))
    got = fused_head.judge_head(validate_head_args(**args), SMALL_TILES)
    want = judge_head(backend="reference", **args)
    for k, a in zip(OUTPUTS, got):
        assert rel_err(a, getattr(want, k)) <= 1e-5, k
