"""The training step's loss mode (``real.head.micro_batch_loss`` -> ``hf.judge_loss_outputs`` -> ``judge_loss``)
gives every method's loss value and gradients as ``judge_forward`` + autograd does, with chunks that cut
through sequences (so most chunks see constants for the rows they do not hold)."""
import pytest
import torch

from real.batching import build_teacher_forced_batch
from real.head import judge_forward, micro_batch_loss
from real.objectives import grpo_loss, raft_loss, real_loss, tract_loss
from real.prompts import resolve_score_token_ids
from real.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["Grade: good answer.", "Grade: bad.", "Grade: so-so, missing a step.", "Grade: fine."]
COTS = ["Feedback: fine [RESULT] 5", "Feedback: poor answer, wrong", "Feedback: partly right", "Feedback: ok"]
TARGETS = [4.33, 1.67, 3.0, 3.67]


def _setup(seed=1):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=seed)
    ids = resolve_score_token_ids(tok)
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    batch = build_teacher_forced_batch(tok, PROMPTS, COTS, TARGETS, ids, values)
    return model, batch, ids, values


def _losses(batch):
    gen = torch.Generator().manual_seed(0)
    shape = batch.cot_mask.shape
    old = -torch.rand(shape, generator=gen) * 3
    ref = -torch.rand(shape, generator=gen) * 3
    adv = torch.randn(len(batch), generator=gen)
    return {
        "real-ppo-kl": lambda f: real_loss(f, 2, beta=0.5, lam=0.1, mu=0.2, advantages=adv, old_logprobs=old,
                                           ppo_clip=0.2, ref_logprobs=ref, kl_coef=0.05),
        "real-on-policy": lambda f: real_loss(f, 2, beta=1.0, agg="seq-mean-token-sum", ppo_clip=None),
        "grpo": lambda f: grpo_loss(f, torch.tensor([1.0, 0.0, 0.0, 1.0]), 2,
                                    sampled_score_index=torch.tensor([4, 0, -1, 2]), old_logprobs=old),
        "tract": lambda f: tract_loss(f, lam=0.7, tokens_per_row=5.0),
        "raft": raft_loss,
    }


@pytest.mark.parametrize("name", ["real-ppo-kl", "real-on-policy", "grpo", "tract", "raft"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_loss_mode_equals_the_head_and_autograd(name, chunk_size):
    model, batch, ids, values = _setup()
    loss_fn = _losses(batch)[name]
    params = [p for p in model.parameters() if p.requires_grad]

    fwd = judge_forward(model, batch, ids, values, return_entropy=True)
    ref_loss, ref_terms = loss_fn(fwd)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)

    loss, terms = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5, abs=1e-6)
    for key in ("loss", "sq_error", "expected_score"):
        if key in ref_terms:
            assert terms[key] == pytest.approx(ref_terms[key], rel=1e-5, abs=1e-6), key
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_loss_mode_backward_twice_the_loss_doubles_the_gradient():
    model, batch, ids, values = _setup()
    loss_fn = _losses(batch)["tract"]
    loss, _ = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=5)
    (2.0 * loss).backward()
    doubled = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    loss, _ = micro_batch_loss(model, batch, ids, values, loss_fn, chunk_size=5)
    loss.backward()
    once = [p.grad for p in model.parameters() if p.grad is not None]
    for d, o in zip(doubled, once):
        torch.testing.assert_close(d, 2 * o, rtol=1e-6, atol=1e-9)
