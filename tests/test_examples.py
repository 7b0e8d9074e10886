"""The drop-in examples: a plain PyTorch GRPO step and TRL's GRPOTrainer, both on the fused head.

The plain example's loss and gradients must equal the same loss computed the
way a plain trainer does it (``model(...).logits``, ``log_softmax``,
``gather``), and one step must run end to end.  The TRL tests run only when
``trl>=1.16`` is installed (``pip install -e ".[examples]"``): TRL's trainer code
with the real_kernels head under its ``fused_lm_head`` contract must give the
log-probs, entropies and gradients of TRL's own head, and a training step must run.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grpo():
    return _load("grpo_step")


@pytest.fixture(scope="module")
def tiny():
    from real.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return tokenizer, build_tiny_model(tokenizer, seed=1)


def _prompts(grpo):
    from real.judge.prompts import render_prompt

    return [render_prompt(q, a, grpo.DEMO_RUBRIC) for q, a, _ in grpo.DEMO_ITEMS]


def _naive_completion_logprobs(model, rollouts):
    """What a plain trainer does: full logits, log_softmax, gather (fine in a test, never in the library)."""
    logits = model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, rollouts.input_ids[:, 1:, None]).squeeze(2)
    return torch.where(rollouts.completion_mask, logp, 0.0)


def test_grpo_policy_loss_and_gradients_match_a_plain_logits_trainer(grpo, tiny):
    tokenizer, model = tiny
    torch.manual_seed(0)
    rollouts = grpo.sample_rollouts(model, tokenizer, _prompts(grpo), group_size=2, max_new_tokens=6,
                                    temperature=1.0, top_p=1.0)
    assert rollouts.completion_mask.any()
    advantages = torch.randn(rollouts.input_ids.shape[0])
    with torch.no_grad():
        fused_old, _ = grpo.completion_logprobs(model, rollouts)
        naive_old = _naive_completion_logprobs(model, rollouts)
    torch.testing.assert_close(fused_old, naive_old, rtol=1e-5, atol=1e-5)
    old = fused_old + 0.3 * torch.randn_like(fused_old) * rollouts.completion_mask  # some ratios get clipped

    grads = []
    for logprob_fn in (lambda: grpo.completion_logprobs(model, rollouts)[0],
                       lambda: _naive_completion_logprobs(model, rollouts)):
        model.zero_grad(set_to_none=True)
        loss, clip_frac = grpo.policy_loss(logprob_fn(), old, advantages, rollouts.completion_mask, 0.2)
        loss.backward()
        grads.append((loss.detach(), clip_frac, [p.grad.clone() for p in model.parameters()]))
    (fused_loss, fused_clip, fused_grads), (naive_loss, naive_clip, naive_grads) = grads
    assert 0 < fused_clip < 1 and fused_clip == naive_clip
    torch.testing.assert_close(fused_loss, naive_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, naive_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_grpo_step_updates_the_model_and_the_script_runs(grpo, tiny, capsys):
    from real.judge.prompts import SCORE_MARKER, resolve_score_token_ids
    from real.model.tiny import build_tiny_model

    tokenizer, _ = tiny
    model = build_tiny_model(tokenizer, seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = grpo.grpo_step(
        model, tokenizer, optimizer, _prompts(grpo), torch.tensor([4.33, 1.67]),
        score_token_ids=resolve_score_token_ids(tokenizer), score_values=[1.0, 2.0, 3.0, 4.0, 5.0],
        marker_id=tokenizer.convert_tokens_to_ids(SCORE_MARKER), group_size=2, max_new_tokens=6,
    )
    assert all(torch.isfinite(torch.tensor(float(v))) for v in stats.values())
    assert stats["reward"] < 0 and stats["completion_tokens"] > 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    assert grpo.main(["--steps", "1", "--group-size", "2", "--max-new-tokens", "4"]) == 0
    assert "step 1: loss" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trl_example():
    pytest.importorskip("trl", minversion="1.16", reason="trl>=1.16 is not installed (pip install -e '.[examples]')")
    return _load("trl_grpo")


def _trl_batch(tokenizer, keep):
    """TRL's layout: left-padded prompts, then right-padded completions of ``keep`` tokens."""
    torch.manual_seed(0)
    prompt_ids = tokenizer(["Rate this answer:", "A longer prompt to rate, with more words:"], padding=True,
                           padding_side="left", return_tensors="pt")
    completion = torch.randint(10, len(tokenizer), (2, keep))
    completion_mask = torch.ones(2, keep, dtype=torch.long)
    completion_mask[1, 3:] = 0
    ids = torch.cat([prompt_ids["input_ids"], completion], dim=1)
    mask = torch.cat([prompt_ids["attention_mask"], completion_mask], dim=1)
    return ids, mask, completion_mask


def _trl_logps(trainer, ids, mask, keep, completion_mask):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    logps, entropy, aux = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=1,
                                                                     compute_entropy=True)
    assert logps.shape == (2, keep) and entropy.shape == (2, keep) and aux is None
    (logps * completion_mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return logps.detach(), entropy.detach(), grads


def test_trl_fused_lm_head_contract_served_by_real_kernels_matches_trl_own_head(trl_example, tmp_path, monkeypatch):
    trainer = trl_example.build_trainer(output_dir=str(tmp_path), max_steps=1)
    ids, mask, completion_mask = _trl_batch(trainer.processing_class, keep=5)
    calls = []
    real_token_logprobs = trl_example.token_logprobs
    monkeypatch.setattr(trl_example, "token_logprobs", lambda *a, **k: calls.append(1) or real_token_logprobs(*a, **k))

    ours = _trl_logps(trainer, ids, mask, 5, completion_mask)  # TRL's own trainer code, our head under it
    assert len(calls) == 2  # batch_size=1: one call per sequence
    trl_example.remove_real_kernels_lm_head(trainer.model)  # back to TRL's fused head (add_fused_lm_head)
    theirs = _trl_logps(trainer, ids, mask, 5, completion_mask)
    assert len(calls) == 2

    (ours_lp, ours_ent, ours_grads), (trl_lp, trl_ent, trl_grads) = ours, theirs
    valid = completion_mask.bool()
    torch.testing.assert_close(ours_lp[valid], trl_lp[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_ent[valid], trl_ent[valid], rtol=1e-5, atol=1e-5)
    assert (ours_lp[~valid] == 0).all() and (ours_ent[~valid] == 0).all()
    assert len(ours_grads) == len(trl_grads) > 0
    for got, want in zip(ours_grads, trl_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_trl_head_output_and_errors(trl_example, tiny):
    from trl.trainer import add_fused_lm_head

    from real.model.tiny import build_tiny_model

    tokenizer, _ = tiny
    model = build_tiny_model(tokenizer, seed=3)  # its own: the heads are installed on the instance
    ids = torch.randint(10, len(tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(7) < 3, -100)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    want = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    trl_example.add_real_kernels_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    trl_example.add_real_kernels_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))  # replaces
    got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.label_mask, want.label_mask)
    plain = model(input_ids=ids, attention_mask=mask)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (2, 7, len(tokenizer))

    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=mask, labels=labels.roll(1, dims=1), fused_lm_head=True)
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, pixel_values=torch.zeros(1))
    with pytest.raises(ValueError, match="is_top1"):
        trl_example.add_real_kernels_lm_head(model, outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="backend"):
        trl_example.add_real_kernels_lm_head(model, backend="cuda")
    trl_example.remove_real_kernels_lm_head(model)
    again = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)  # TRL's head is back
    assert torch.equal(again.log_probs, want.log_probs)


def test_trl_example_trains_a_step(trl_example, capsys):
    assert trl_example.main(["--max-steps", "1", "--num-generations", "2", "--max-completion-length", "4"]) == 0
    assert "trained 1 step(s)" in capsys.readouterr().out
