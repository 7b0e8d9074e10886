"""The policy gradient is taken on the distribution the rollouts were sampled from: every
head pass of a rollout method's training step (policy, old-policy and reference log-probs, the score read-out)
runs at --temperature; the SFT methods train at temperature 1.  Before, every pass ran at temperature 1."""
import pytest
import torch

import real.loop.train as train
from real.judge.batching import build_teacher_forced_batch
from real.loop.config import make_config
from real.model.head import judge_forward
from real.judge.prompts import ScoreScale
from real.model.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded_temperatures(monkeypatch, tmp_path, **overrides):
    seen = []

    def recording(fn):
        def wrapper(*args, **kwargs):
            seen.append(kwargs.get("temperature", 1.0))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train, "judge_forward", recording(train.judge_forward))
    monkeypatch.setattr(train, "micro_batch_loss", recording(train.micro_batch_loss))
    cfg = make_config(model="tiny", data=["synthetic"], synthetic_train_size=16, synthetic_eval_size=4,
                      prompts_per_step=2, group_size=2, max_new_tokens=8, progress=False, output_dir=str(tmp_path),
                      steps=1, **overrides)
    train.Trainer(cfg, log=lambda m: None).train_step(1)
    return seen


def test_every_head_pass_of_a_real_step_runs_at_the_rollout_temperature(monkeypatch, tmp_path):
    # epochs_per_batch 2: old log-probs (pre-pass); kl_coef: reference log-probs; then the losses
    seen = _recorded_temperatures(monkeypatch, tmp_path, method="real", temperature=0.7, epochs_per_batch=2,
                                  kl_coef=0.1)
    assert len(seen) >= 4 and set(seen) == {0.7}


@pytest.mark.parametrize("method", ["tract", "raft"])
def test_sft_methods_train_at_temperature_one(monkeypatch, tmp_path, method):
    assert set(_recorded_temperatures(monkeypatch, tmp_path, method=method, temperature=0.7)) == {1.0}


def test_the_head_at_a_temperature_is_the_softmax_of_the_scaled_logits():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=1)
    scale = ScoreScale.from_tokenizer(tok)
    batch = build_teacher_forced_batch(tok, ["Grade it. ###Feedback: "], ["Feedback: fine [RESULT] 4"], [4.0],
                                       scale.token_ids, scale.values)
    with torch.no_grad():
        fwd = judge_forward(model, batch, scale.token_ids, scale.values, temperature=0.7)
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits[0] / 0.7
    logp = torch.log_softmax(logits, -1)
    rows = batch.cot_mask[0].nonzero().flatten()
    torch.testing.assert_close(fwd.cot_logprobs[0, rows], logp[rows, batch.input_ids[0, rows + 1]], atol=1e-5,
                               rtol=1e-5)
    pi = logp[batch.score_pos[0], list(scale.token_ids)].exp()
    torch.testing.assert_close(fwd.expected_score[0], pi @ torch.tensor(scale.values, dtype=torch.float32),
                               atol=1e-5, rtol=1e-5)
