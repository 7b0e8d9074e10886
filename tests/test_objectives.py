"""real.methods.objectives: rewards, RLOO, the REAL loss (incl. the unbiasedness of its gradient), RAFT, TRACT, GRPO."""
import itertools
import math

import pytest
import torch
from scipy import stats

from real_kernels import judge_head
from real.model.head import JudgeForward
from real.methods.objectives import binary_rewards, group_normalized_advantages, grpo_loss, grpo_token_logprobs, raft_loss, real_advantages, real_loss, regression_reward, rloo_advantages, sampled_score_indices, tract_loss


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


def _fake_forward(b=4, t=6, m=5, lengths=(3, 5, 2, 4)):
    """A JudgeForward of leaf tensors, so gradients w.r.t. each judge output can be read directly."""
    cot_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        cot_mask[i, :n] = True
    cot_logprobs = (-torch.rand(b, t) * cot_mask).requires_grad_()
    score_logprobs = torch.log_softmax(torch.randn(b, m), -1)
    expected = _leaf(b)
    targets = torch.tensor([4.0, 1.0, 3.0, 5.0])[:b]
    sq_error = ((expected - targets) ** 2)
    log_pi_star = _leaf(b, scale=0.1)
    return JudgeForward(
        cot_logprobs=cot_logprobs, cot_mask=cot_mask, score_logprobs=score_logprobs, expected_score=expected,
        sq_error=sq_error, log_pi_star=log_pi_star, targets=targets,
        score_pos=torch.tensor(lengths), cot_entropy=torch.rand(b, t) * cot_mask,
    )


def test_regression_reward():
    e, y, lp = torch.tensor([3.0, 4.5]), torch.tensor([4.0, 4.5]), torch.tensor([-0.5, -2.0])
    torch.testing.assert_close(regression_reward(e, y), torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(regression_reward(e, y, lp, lam=0.5), torch.tensor([-1.25, -1.0]))
    torch.testing.assert_close(regression_reward(e, y, lp, lam=0.5, mu=2.0),
                               torch.tensor([-1.25, -1.0]) + 2.0 * lp.exp())
    torch.testing.assert_close(regression_reward(e, y, pi_star=torch.tensor([0.5, 0.1]), mu=1.0),
                               torch.tensor([-0.5, 0.1]))
    with pytest.raises(ValueError, match="log_pi_star"):
        regression_reward(e, y, lam=0.1)


def test_rloo_advantages_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    raw = rloo_advantages(r, normalize=False, clip=None)
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(raw.sum(1), torch.zeros(2), atol=1e-6, rtol=0)  # leave-one-out sums to zero
    std = r[0].std(unbiased=False)
    normed = rloo_advantages(r, normalize=True, clip=None, eps=1e-6)
    torch.testing.assert_close(normed[0], expected[0] / (std + 1e-6))
    assert torch.isfinite(normed[1]).all() and (normed[1] == 0).all()  # constant group: 0, not NaN
    torch.testing.assert_close(rloo_advantages(r, normalize=True, clip=1.0), normed.clamp(-1, 1))
    assert rloo_advantages(r, normalize=True).abs().max() <= 1.0


def test_rloo_advantages_carry_no_grad_and_check_input():
    r = torch.randn(2, 3, requires_grad=True)
    assert not rloo_advantages(r).requires_grad
    with pytest.raises(ValueError, match="G >= 2"):
        rloo_advantages(torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        rloo_advantages(torch.randn(4))
    with pytest.raises(ValueError, match="clip"):
        rloo_advantages(torch.randn(2, 2), clip=0.0)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum", "token-mean"])
def test_real_loss_gradients_by_term(agg):
    fwd = _fake_forward()
    beta, lam, mu, g = 0.5, 0.1, 0.2, 2
    loss, terms = real_loss(fwd, g, beta=beta, lam=lam, mu=mu, agg=agg, normalize_advantages=False,
                            advantage_clip=None, ppo_clip=None)
    loss.backward()
    rewards = -fwd.sq_error.detach() + lam * fwd.log_pi_star.detach() + mu * fwd.log_pi_star.detach().exp()
    adv = rloo_advantages(rewards.view(-1, g), normalize=False, clip=None).view(-1)
    n = fwd.cot_mask.sum(1).float()
    b = 4
    weight = {"seq-mean-token-mean": 1 / (b * n), "seq-mean-token-sum": torch.full((b,), 1 / b),
              "token-mean": torch.full((b,), 1 / n.sum())}[agg]
    torch.testing.assert_close(fwd.cot_logprobs.grad, (-adv * weight)[:, None] * fwd.cot_mask)
    targets = fwd.targets
    expected_grad = beta / b * 2 * (fwd.expected_score.detach() - targets)
    torch.testing.assert_close(fwd.expected_score.grad, expected_grad)
    pi = fwd.log_pi_star.detach().exp()
    torch.testing.assert_close(fwd.log_pi_star.grad, -beta / b * (lam + mu * pi))
    assert terms["clip_frac"] == 0.0 and math.isclose(terms["loss"], float(loss.detach()))
    assert 0 < terms["entropy"] < 1 and terms["cot_tokens"] == 3.5


def test_real_loss_default_token_mean_matches_design_formula():
    """L = (1/G) sum_i [-A_i mean_t log pi(c_it) + beta ((yhat_i - y*)^2 - lam log pi_i(k*))], A normalised+clipped."""
    fwd = _fake_forward()
    loss, _ = real_loss(fwd, 4, beta=0.3, lam=0.2)
    rewards = -fwd.sq_error + 0.2 * fwd.log_pi_star
    r = rewards.detach()
    adv = (r - (r.sum() - r) / 3) / (r.std(unbiased=False) + 1e-6)
    adv = adv.clamp(-1, 1)
    token_mean = (fwd.cot_logprobs * fwd.cot_mask).sum(1) / fwd.cot_mask.sum(1)
    manual = (-adv * token_mean + 0.3 * (fwd.sq_error - 0.2 * fwd.log_pi_star)).mean()
    torch.testing.assert_close(loss, manual)


def test_ppo_clipping_and_k3_kl():
    fwd = _fake_forward()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = fwd.cot_logprobs.detach().clone()
    old[0] -= 1.0  # ratio e > 1 + eps with A > 0: clipped, no gradient
    old[1] += 1.0  # ratio 1/e < 1 - eps with A < 0: clipped, no gradient
    loss, terms = real_loss(fwd, 2, beta=0.0, advantages=adv, old_logprobs=old, ppo_clip=0.2, agg="seq-mean-token-sum")
    loss.backward()
    g = fwd.cot_logprobs.grad
    assert (g[0] == 0).all() and (g[1] == 0).all()
    ratio = torch.exp(fwd.cot_logprobs.detach() - old)
    torch.testing.assert_close(g[2], -adv[2] * ratio[2] * fwd.cot_mask[2] / 4)
    assert math.isclose(terms["clip_frac"], (3 + 5) / 14, rel_tol=1e-6)

    fwd = _fake_forward()
    ref = fwd.cot_logprobs.detach() + 0.3 * torch.randn(4, 6)
    loss_kl, terms = real_loss(fwd, 2, beta=0.0, advantages=torch.zeros(4), ref_logprobs=ref, kl_coef=0.5,
                               agg="seq-mean-token-sum")
    delta = (ref - fwd.cot_logprobs.detach()) * fwd.cot_mask
    k3 = ((delta.exp() - delta - 1) * fwd.cot_mask).sum(1).mean()
    assert terms["kl"] > 0 and math.isclose(terms["kl"], float(k3), rel_tol=1e-6)
    loss_kl.backward()
    torch.testing.assert_close(fwd.cot_logprobs.grad, 0.5 / 4 * (1 - delta.exp()) * fwd.cot_mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        real_loss(_fake_forward(), 2, kl_coef=0.1)
    with pytest.raises(ValueError, match="group_size"):
        real_loss(_fake_forward(), 3)
    with pytest.raises(ValueError, match="agg"):
        real_loss(_fake_forward(), 2, agg="mean")


def test_reused_advantages_and_old_logprobs_give_the_on_policy_gradient_at_the_first_epoch():
    fwd = _fake_forward()
    adv = real_advantages(fwd, 2, lam=0.1)
    a, _ = real_loss(fwd, 2, lam=0.1)
    on_policy = torch.autograd.grad(a, [fwd.cot_logprobs, fwd.expected_score, fwd.log_pi_star], retain_graph=True)
    b, terms = real_loss(fwd, 2, lam=0.1, advantages=adv, old_logprobs=fwd.cot_logprobs.detach())
    reused = torch.autograd.grad(b, [fwd.cot_logprobs, fwd.expected_score, fwd.log_pi_star])
    for x, y in zip(on_policy, reused):
        torch.testing.assert_close(x, y)
    assert terms["clip_frac"] == 0.0
    with pytest.raises(ValueError, match="advantages"):
        real_loss(fwd, 2, advantages=adv[:2])


# --- unbiasedness of the REAL estimator on a policy small enough to enumerate -------------------------

V = 4  # tiny vocabulary; the score tokens are 3 of its 4 tokens (full-vocabulary softmax, not renormalised)
SCORE_IDS = [1, 2, 3]
SCORE_VALUES = [1.0, 2.0, 3.0]
Y_STAR, LAM, MU = 2.6, 0.1, 0.2
K_STAR = 2  # index of round(2.6) = 3


def _toy_params():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(*shape, generator=g) * 0.7).requires_grad_() for shape in ((V,), (V, V), (V, V, V))]


def _toy_forward(params, cots):
    """Judge outputs of a 2-token CoT policy whose logits are the parameters, via the fused head.

    Row 0 of a sequence predicts c1 from logits theta0, row 1 predicts c2 from theta1[c1], the score row
    reads theta_s[c1, c2]; with an identity LM-head weight the hidden state *is* the logit vector.
    """
    theta0, theta1, theta_s = params
    n = cots.shape[0]
    hidden = torch.cat([theta0.expand(n, V), theta1[cots[:, 0]], theta_s[cots[:, 0], cots[:, 1]]])
    targets = torch.cat([cots[:, 0], cots[:, 1], torch.full((n,), -100)])
    is_score = torch.arange(3 * n) >= 2 * n
    out = judge_head(hidden, torch.eye(V), targets, SCORE_IDS, SCORE_VALUES,
                     score_targets=torch.full((3 * n,), Y_STAR), score_mask=is_score, backend="torch")
    score_logprobs = out.score_logprobs[2 * n:]
    cot_mask = torch.zeros(n, 3, dtype=torch.bool)
    cot_mask[:, :2] = True
    return JudgeForward(
        cot_logprobs=torch.cat([out.logprobs[:n, None], out.logprobs[n:2 * n, None], torch.zeros(n, 1)], 1),
        cot_mask=cot_mask, score_logprobs=score_logprobs, expected_score=out.expected_score[2 * n:],
        sq_error=out.sq_error[2 * n:], log_pi_star=score_logprobs[:, K_STAR], targets=torch.full((n,), Y_STAR),
        score_pos=torch.full((n,), 2),
    )


def _exact_gradient(params):
    """grad_theta E_c[r(theta; c)] by enumerating all V^2 CoTs, written without the fused head."""
    theta0, theta1, theta_s = params
    objective = 0.0
    for c1, c2 in itertools.product(range(V), range(V)):
        p = torch.softmax(theta0, 0)[c1] * torch.softmax(theta1[c1], 0)[c2]
        logp_s = torch.log_softmax(theta_s[c1, c2], 0)[SCORE_IDS]
        yhat = (logp_s.exp() * torch.tensor(SCORE_VALUES)).sum()
        r = -(yhat - Y_STAR) ** 2 + LAM * logp_s[K_STAR] + MU * logp_s[K_STAR].exp()
        objective = objective + p * r
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, params)])


def _sample_cots(params, n, generator):
    theta0, theta1, _ = params
    with torch.no_grad():
        c1 = torch.multinomial(torch.softmax(theta0, 0).expand(n, V), 1, generator=generator).squeeze(1)
        c2 = torch.multinomial(torch.softmax(theta1[c1], 1), 1, generator=generator).squeeze(1)
    return torch.stack([c1, c2], 1)


def _estimates(params, chunks=200, groups=25, g=4, **loss_kwargs):
    """Independent chunk means of the REAL gradient estimate of grad E[r] (= -grad of the loss)."""
    generator = torch.Generator().manual_seed(123)
    out = {name: [] for name in loss_kwargs}
    for _ in range(chunks):
        fwd = _toy_forward(params, _sample_cots(params, groups * g, generator))
        for name, kwargs in loss_kwargs.items():
            rewards = (-fwd.sq_error + LAM * fwd.log_pi_star + MU * fwd.log_pi_star.exp()).detach()
            if kwargs == "no-baseline":  # plain REINFORCE: advantage = reward itself
                kwargs = dict(advantages=rewards)
            elif kwargs == "self-baseline":  # baseline = group mean *including* the sample's own reward: biased
                grouped = rewards.view(-1, g)
                kwargs = dict(advantages=(grouped - grouped.mean(1, keepdim=True)).view(-1))
            kwargs = dict(kwargs)
            loss, _ = real_loss(fwd, g, beta=kwargs.pop("beta", 1.0), lam=LAM, mu=MU, agg="seq-mean-token-sum",
                                normalize_advantages=False, advantage_clip=None, ppo_clip=None, **kwargs)
            grads = torch.autograd.grad(loss, params, retain_graph=True)
            out[name].append(-torch.cat([x.reshape(-1) for x in grads]))
    return {name: torch.stack(v).double() for name, v in out.items()}


def _chi_square(samples, exact):
    """sum_k z_k^2 with z_k = (mean_k - exact_k) / standard error_k, and max |z_k|."""
    mean = samples.mean(0)
    se = samples.std(0, unbiased=True) / math.sqrt(samples.shape[0])
    z = (mean - exact.double()) / se  # a coordinate the estimator never moves (se = 0) but should: z = inf
    return float((z ** 2).sum()), float(z.abs().max())


def test_real_estimator_is_unbiased_and_rloo_reduces_variance():
    params = _toy_params()
    exact = _exact_gradient(params)
    est = _estimates(params, rloo={}, plain="no-baseline", no_refinement={"beta": 0.0},
                     self_baseline="self-baseline")
    dof = exact.numel()
    bound = stats.chi2.ppf(1 - 1e-4, dof)  # a correct estimator fails this 1 time in 10^4 (seed is fixed)
    assert (est["rloo"].std(0) > 0).all() and (est["plain"].std(0) > 0).all()
    chi2_rloo, zmax_rloo = _chi_square(est["rloo"], exact)
    chi2_plain, _ = _chi_square(est["plain"], exact)
    assert chi2_rloo < bound and zmax_rloo < 5.0, (chi2_rloo, bound, zmax_rloo)
    assert chi2_plain < bound, (chi2_plain, bound)  # REINFORCE without baseline: unbiased too
    # the test has power: dropping REAL's prediction-refinement term E[grad r] is detected as biased, and so is
    # a baseline that includes the sample's own reward (it shrinks the CoT term by (G-1)/G; measured chi2 ~1700)
    chi2_biased, _ = _chi_square(est["no_refinement"], exact)
    assert chi2_biased > 10 * bound, (chi2_biased, bound)
    chi2_self, _ = _chi_square(est["self_baseline"], exact)
    assert chi2_self > 5 * bound, (chi2_self, bound)
    # the leave-one-out baseline lowers the variance of the CoT-policy coordinates (theta0, theta1; the
    # score head's gradient comes from the prediction term alone) without moving the mean (measured: 0.57x)
    cot = slice(0, V + V * V)
    assert est["rloo"][:, cot].var(0).sum() < 0.8 * est["plain"][:, cot].var(0).sum()


# --- baselines -------------------------------------------------------------------------------------------

def test_raft_and_tract_losses():
    fwd = _fake_forward()
    loss, terms = raft_loss(fwd)
    torch.testing.assert_close(loss, fwd.sq_error.mean())
    loss.backward()
    assert fwd.cot_logprobs.grad is None and fwd.expected_score.grad is not None

    fwd = _fake_forward()
    loss, terms = tract_loss(fwd, lam=0.5)
    ce = -(fwd.cot_logprobs * fwd.cot_mask).sum() / fwd.cot_mask.sum()
    torch.testing.assert_close(loss, ce + 0.5 * fwd.sq_error.mean())
    assert math.isclose(terms["ce"], float(ce.detach()), rel_tol=1e-6)


def test_binary_rewards_and_group_advantages():
    torch.testing.assert_close(binary_rewards([4.0, 3.0, None, 5.0, 2.0], [4.33, 4.33, 4.0, 4.5, 2.49]),
                               torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_normalized_advantages(r)
    torch.testing.assert_close(adv[0], (r[0] - 0.5) / (r[0].std() + 1e-6))
    assert (adv[1] == 0).all()
    assert sampled_score_indices([3.0, None, 2.5, 5.0], [1, 2, 3, 4, 5]).tolist() == [2, -1, -1, 4]


def test_grpo_loss_includes_the_sampled_score_token():
    fwd = _fake_forward()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    idx = torch.tensor([2, -1, 0, 4])
    logprobs, mask = grpo_token_logprobs(fwd, idx)
    assert mask.sum() == fwd.cot_mask.sum() + 3
    assert logprobs[0, 3] == fwd.score_logprobs[0, 2] and not mask[1, 5]
    loss, terms = grpo_loss(fwd, rewards, 2, sampled_score_index=idx, ppo_clip=0.2, agg="seq-mean-token-sum")
    loss.backward()
    adv = group_normalized_advantages(rewards.view(2, 2)).view(-1)
    torch.testing.assert_close(fwd.cot_logprobs.grad, (-adv / 4)[:, None] * fwd.cot_mask)
    assert fwd.expected_score.grad is None  # the regression head is not trained by standard RL
    assert terms["reward_mean"] == 0.5


# --- on a tiny transformers judge -------------------------------------------------------------------------

def test_judge_forward_on_a_tiny_model_matches_its_logits():
    from real.judge.batching import build_teacher_forced_batch
    from real.model.head import judge_forward
    from real.judge.prompts import resolve_score_token_ids
    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=1)
    ids = resolve_score_token_ids(tok)
    values = [1, 2, 3, 4, 5]
    batch = build_teacher_forced_batch(tok, ["Grade: good answer.", "Grade: bad."],
                                       ["Feedback: fine [RESULT] 5", "Feedback: poor answer, wrong"],
                                       [4.33, 1.67], ids, values)
    fwd = judge_forward(model, batch, ids, values, return_entropy=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    rows = torch.arange(2)
    next_lp = logp[:, :-1].gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    ref_sum = (next_lp * batch.cot_mask[:, :-1]).sum(1)
    torch.testing.assert_close(fwd.cot_logprob_sum, ref_sum, atol=1e-4, rtol=1e-5)
    assert fwd.cot_token_count.tolist() == batch.cot_lengths.tolist()
    torch.testing.assert_close(fwd.log_pi_star, logp[rows, batch.score_pos, batch.score_token], atol=1e-5, rtol=1e-5)
    pi = logp[rows, batch.score_pos][:, ids].exp()
    expected = pi @ torch.tensor(values, dtype=torch.float32)
    torch.testing.assert_close(fwd.expected_score, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwd.sq_error, (expected - batch.targets) ** 2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        judge_forward(model, build_teacher_forced_batch(tok, ["a"], ["b"], None, ids, values), ids, values)
