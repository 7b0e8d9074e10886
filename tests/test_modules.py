"""JudgeHead / JudgeLoss modules: the functions' results (fp64 truth), config checked at construction."""
import pytest
import torch

from real_kernels import JudgeHead, JudgeLoss, judge_head
from real_kernels.core import reference
from head_utils import OUTPUTS, check_against, make_case, rel_err, run_exact

SCORE_VALUES = [1.0, 2.0, 3.5, 4.0, 5.0]


def _module_head(case, backend):
    head = JudgeHead(case.score_ids, case.score_values, normalize=case.normalize, temperature=case.temperature,
                     return_entropy=case.return_entropy, backend=backend)
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    out = head(hidden, weight, case.targets, case.score_targets, case.score_mask)
    outs = dict(zip(OUTPUTS, (out.logprobs, out.score_logprobs, out.expected_score, out.sq_error, out.entropy)))
    loss = sum((outs[k].double() * case.grads[k].double()).sum() for k in OUTPUTS if outs[k] is not None)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    return outs, dh, dw


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("normalize", [False, True])
def test_judge_head_module_matches_fp64(backend, normalize):
    case = make_case(37, 48, 1009, normalize=normalize, temperature=0.7, return_entropy=True, seed=3)  # prime V
    outs, dh, dw = _module_head(case, backend)
    check_against(outs, dh, dw, run_exact(case), 2e-5, f"JudgeHead {backend}")
    same = judge_head(case.hidden, case.weight, case.targets, case.score_ids, case.score_values, backend=backend,
                      **case.kwargs())
    assert torch.equal(outs["expected_score"].detach(), same.expected_score)


def _fp64_logprobs(hidden, weight, targets, temperature=1.0):
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    keep = targets != -100
    return torch.where(keep, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0), keep


@pytest.mark.parametrize("backend,chunk_size", [("torch", None), ("torch", 7), ("triton", 16)])
def test_judge_loss_module_default_is_token_mean_cross_entropy(backend, chunk_size):
    case = make_case(45, 40, 97, seed=4)  # V = 97 prime, every 5th target ignored
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    loss, out = JudgeLoss(temperature=0.9, chunk_size=chunk_size, backend=backend)(hidden, weight, case.targets)
    loss.backward()

    h64 = case.hidden.double().requires_grad_(True)
    w64 = case.weight.double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(h64 @ w64.T / 0.9, case.targets, ignore_index=-100)
    want.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item())
    assert rel_err(hidden.grad, h64.grad) < 1e-5 and rel_err(weight.grad, w64.grad) < 1e-5
    ref_logp, keep = _fp64_logprobs(case.hidden, case.weight, case.targets, 0.9)
    assert rel_err(out.logprobs, ref_logp) < 1e-5 and (out.logprobs[~keep] == 0).all()
    assert out.score_logprobs.shape == (45, 0)  # no score tokens configured


def test_judge_loss_module_custom_loss_with_scores_matches_fp64_head_and_autograd():
    case = make_case(37, 48, 1000, normalize=True, return_entropy=True, seed=5)
    adv = torch.randn(37, generator=torch.Generator().manual_seed(6))

    def real_like(out, rows):  # policy gradient + squared error + entropy bonus: per-row terms
        return -(adv[rows] * out.logprobs).sum() + 0.3 * out.sq_error.sum() - 0.01 * out.entropy.sum()

    module = JudgeLoss(real_like, score_token_ids=torch.tensor(case.score_ids), score_values=case.score_values,
                       normalize=True, return_entropy=True, chunk_size=10, backend="torch")
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    loss, out = module(hidden, weight, case.targets, case.score_targets, case.score_mask)
    loss.backward()

    h64 = case.hidden.double().requires_grad_(True)
    w64 = case.weight.double().requires_grad_(True)
    ref = reference.judge_head(h64, w64, case.targets, torch.tensor(case.score_ids),
                               torch.tensor(case.score_values, dtype=torch.float64), compute_dtype=torch.float64,
                               score_targets=case.score_targets.double(), score_mask=case.score_mask, normalize=True,
                               return_entropy=True)
    want = -(adv.double() * ref[0]).sum() + 0.3 * ref[3].sum() - 0.01 * ref[4].sum()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert rel_err(hidden.grad, h64.grad) < 1e-5 and rel_err(weight.grad, w64.grad) < 1e-5
    assert rel_err(out.expected_score, ref[2]) < 1e-5

    # a per-call loss_fn takes precedence over the module's
    loss2, _ = module(case.hidden, case.weight, case.targets, case.score_targets, case.score_mask,
                      loss_fn=lambda out, rows: out.sq_error.sum())
    assert abs(loss2.item() - ref[3].sum().item()) <= 1e-5 * ref[3].sum().item()


def test_judge_loss_module_all_targets_ignored_gives_zero_loss_and_zero_grads():
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(33, 16, requires_grad=True)
    loss, _ = JudgeLoss(backend="torch")(hidden, weight, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


def test_modules_hold_config_not_state():
    head = JudgeHead([3, 5], [1, 2], temperature=2, normalize=True)
    loss = JudgeLoss(score_token_ids=[3, 5], score_values=(1, 2))
    for module in (head, loss):
        assert list(module.parameters()) == [] and list(module.buffers()) == [] and module.state_dict() == {}
    assert head.score_token_ids == (3, 5) and head.score_values == (1.0, 2.0) and head.temperature == 2.0
    assert "score_token_ids=[3, 5]" in repr(head) and "token-mean cross-entropy" in repr(loss)


@pytest.mark.parametrize("make,error,argument", [
    (lambda: JudgeHead([1, 2], [1.0]), ValueError, "score_values"),
    (lambda: JudgeHead([], []), ValueError, "score_token_ids"),
    (lambda: JudgeHead([1, 1], [1.0, 2.0]), ValueError, "score_token_ids"),
    (lambda: JudgeHead([1, -2], [1.0, 2.0]), ValueError, "score_token_ids"),
    (lambda: JudgeHead([1.0, 2.0], [1.0, 2.0]), TypeError, "score_token_ids"),
    (lambda: JudgeHead(torch.tensor([1.0, 2.0]), [1.0, 2.0]), TypeError, "score_token_ids"),
    (lambda: JudgeHead([True, 2], [1.0, 2.0]), TypeError, "score_token_ids"),
    (lambda: JudgeHead("12", [1.0, 2.0]), TypeError, "score_token_ids"),
    (lambda: JudgeHead([1, 2], [1.0, float("nan")]), ValueError, "score_values"),
    (lambda: JudgeHead([1, 2], ["a", "b"]), TypeError, "score_values"),
    (lambda: JudgeHead([1, 2], [1, 2], temperature=0), ValueError, "temperature"),
    (lambda: JudgeHead([1, 2], [1, 2], temperature="1"), TypeError, "temperature"),
    (lambda: JudgeHead([1, 2], [1, 2], ignore_index=-1.0), TypeError, "ignore_index"),
    (lambda: JudgeHead([1, 2], [1, 2], normalize=1), TypeError, "normalize"),
    (lambda: JudgeHead([1, 2], [1, 2], return_entropy="yes"), TypeError, "return_entropy"),
    (lambda: JudgeHead([1, 2], [1, 2], backend="cuda"), ValueError, "backend"),
    (lambda: JudgeLoss("not callable"), TypeError, "loss_fn"),
    (lambda: JudgeLoss(score_token_ids=[1, 2]), ValueError, "score_values"),
    (lambda: JudgeLoss(score_values=[1, 2]), ValueError, "score_token_ids"),
    (lambda: JudgeLoss(chunk_size=0), ValueError, "chunk_size"),
    (lambda: JudgeLoss(temperature=float("inf")), ValueError, "temperature"),
])
def test_bad_config_is_refused_at_construction_naming_the_argument(make, error, argument):
    with pytest.raises(error, match=argument):
        make()


def test_bad_call_is_refused_naming_the_argument():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="score_token_ids"):  # id beyond this weight's vocabulary
        JudgeHead([3, 10], [1, 2])(hidden, weight, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        JudgeLoss()(hidden, weight, torch.full((4,), 10))
    with pytest.raises(TypeError, match="targets"):
        JudgeLoss()(hidden, weight, [0, 1, 2, 3])
    with pytest.raises(TypeError, match="loss_fn"):
        JudgeLoss()(hidden, weight, torch.zeros(4, dtype=torch.long), loss_fn=3)
    with pytest.raises(ValueError, match="weight"):
        JudgeHead([1, 2], [1, 2])(hidden, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))


def test_judge_loss_module_under_no_grad_forms_no_gradients(monkeypatch):
    from real_kernels import loss as loss_mod

    needs = []
    execute = loss_mod._Run.execute
    monkeypatch.setattr(loss_mod._Run, "execute",
                        lambda self, need_dh, need_dw, phase=None: needs.append((need_dh, need_dw))
                        or execute(self, need_dh, need_dw, phase))
    case = make_case(20, 16, 97, seed=7)
    hidden, weight = case.hidden.requires_grad_(True), case.weight.requires_grad_(True)
    want, _ = JudgeLoss(backend="torch")(hidden, weight, case.targets)
    with torch.no_grad():
        got, _ = JudgeLoss(backend="torch")(hidden, weight, case.targets)
    assert got.item() == want.item() and not got.requires_grad
    assert needs == [(True, True), (False, False)]  # no dh, no fp32 dW in evaluation
