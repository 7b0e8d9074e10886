"""real.judge.inference: CoT generation, RAIL and standard decoding, and the issue's end-to-end check on a tiny model."""
import math

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import real.judge.inference as inference
from real.judge.batching import build_teacher_forced_batch
from real.model.head import judge_forward
from real.methods.objectives import real_loss
from real.judge.prompts import SCORE_MARKER, resolve_score_token_ids
from real.model.tiny import build_tiny_model, build_tiny_tokenizer

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]
PROMPTS = [
    "###Task Description:\nGrade the answer.\n###Response to evaluate:\nIt is 4.\n###Feedback: ",
    "###Feedback: ",
    "Is this a good answer to the question about the weather? ###Feedback: ",
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=2)


@pytest.fixture(scope="module")
def score_ids(tok):
    return resolve_score_token_ids(tok)


def _head_guard(model, allow_single_position: bool):
    """Fail if the LM head runs at all (or, during generation, on more than the last position)."""
    def hook(_module, inputs):
        if not allow_single_position or inputs[0].shape[-2] != 1:
            raise AssertionError(f"LM head called on hidden states of shape {tuple(inputs[0].shape)}")

    return model.get_output_embeddings().register_forward_pre_hook(hook)


def test_tiny_model_from_a_config_runs_rail_and_a_real_backward(tok, score_ids):
    """The issue's check: RAIL inference and one REAL loss backward on a random model built here from a config,
    finite gradients on every trainable parameter, the LM head never applied to all positions."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, attn_implementation="sdpa",
    )
    model = Qwen3ForCausalLM(config)
    handle = _head_guard(model, allow_single_position=True)  # generate() reads only the last position
    rail = inference.predict_rail(model, tok, PROMPTS[:2], score_token_ids=score_ids, score_values=VALUES,
                                  n_samples=2, greedy=False, max_new_tokens=6, batch_size=4, progress=False)
    assert len(rail) == 2 and all(0.0 <= r <= 5.0 and math.isfinite(r) for r in rail)

    group = 2
    cots = inference.generate_cots(model, tok, PROMPTS[:2], n=group, max_new_tokens=6, progress=False)
    handle.remove()
    handle = _head_guard(model, allow_single_position=False)  # teacher-forced passes never call it
    prompts = [p for p in PROMPTS[:2] for _ in range(group)]
    batch = build_teacher_forced_batch(tok, prompts, [c for per in cots for c in per], [4.33] * 2 + [1.67] * 2,
                                       score_ids, VALUES)
    model.train()
    fwd = judge_forward(model, batch, score_ids, VALUES, return_entropy=True)
    loss, terms = real_loss(fwd, group, beta=1.0, lam=0.1)
    loss.backward()
    handle.remove()
    assert math.isfinite(terms["loss"]) and terms["entropy"] > 0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_generate_cots_shapes_and_marker(tok, model):
    cots = inference.generate_cots(model, tok, PROMPTS, n=2, max_new_tokens=8, batch_size=4, progress=False)
    assert len(cots) == 3 and all(len(c) == 2 for c in cots)
    for per in cots:
        for text in per:
            assert text.endswith(SCORE_MARKER) and text.count(SCORE_MARKER) == 1
    assert tok.padding_side == "right"  # restored after left-padded generation


def test_greedy_generation_is_independent_of_batching(tok, model):
    alone = [inference.generate_cots(model, tok, [p], greedy=True, max_new_tokens=6, progress=False)[0]
             for p in PROMPTS]
    batched = inference.generate_cots(model, tok, PROMPTS, greedy=True, max_new_tokens=6, batch_size=3,
                                      progress=False)
    assert batched == alone  # left padding and position ids do not change what a prompt generates


def test_stop_criterion():
    tok = build_tiny_tokenizer()
    ids = tok("Feedback: fine [RESULT] 4 and then", add_special_tokens=False, return_tensors="pt").input_ids
    prompt = torch.zeros(1, 3, dtype=torch.long)
    at_marker = inference.StopAtMarker(tok, 3)
    after_score = inference.StopAtMarker(tok, 3, need_score=True)
    marker_end = ids[0].tolist().index(tok.convert_tokens_to_ids(SCORE_MARKER)) + 1
    for cut, marker_done, score_done in [(2, False, False), (marker_end, True, False), (marker_end + 2, True, False),
                                         (marker_end + 3, True, True)]:
        row = torch.cat([prompt, ids[:, :cut]], dim=1)
        assert at_marker(row, None).tolist() == [marker_done], cut
        assert after_score(row, None).tolist() == [score_done], cut
    assert after_score.done("[RESULT] (3)\n") and after_score.done("[RESULT] 4.5 ") and not after_score.done("[RESULT] 4.")


def test_score_cots_is_the_expected_score_after_the_marker(tok, model, score_ids):
    cots = ["Feedback: good and clear [RESULT] 2", "Feedback: bad", ""]
    scores = inference.score_cots(model, tok, PROMPTS, cots, score_token_ids=score_ids, score_values=VALUES,
                                  batch_size=2, progress=False)
    # laid out as training reads it (a target appended): the position predicts the score digit
    batch = build_teacher_forced_batch(tok, PROMPTS, cots, [1.0] * 3, score_ids, VALUES)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    pi = logp[torch.arange(3), batch.score_pos][:, score_ids].exp()
    torch.testing.assert_close(torch.tensor(scores), pi @ torch.tensor(VALUES), atol=1e-5, rtol=1e-5)
    normalised = inference.score_cots(model, tok, PROMPTS, cots, score_token_ids=score_ids, score_values=VALUES,
                                      normalize=True, progress=False)
    torch.testing.assert_close(torch.tensor(normalised), (pi / pi.sum(1, keepdim=True)) @ torch.tensor(VALUES),
                               atol=1e-5, rtol=1e-5)


def test_predict_rail_averages_over_the_sampled_cots(tok, model, score_ids, monkeypatch):
    fixed = [["Feedback: a [RESULT]", "Feedback: b c [RESULT]", "[RESULT]"], ["Feedback: d [RESULT]"] * 3]
    calls = {}

    def fake_generate(_model, _tok, prompts, **kwargs):
        calls.update(kwargs)
        return fixed[: len(prompts)]

    monkeypatch.setattr(inference, "generate_cots", fake_generate)
    preds = inference.predict_rail(model, tok, PROMPTS[:2], score_token_ids=score_ids, score_values=VALUES,
                                   n_samples=3, greedy=False, temperature=0.7, top_p=0.8, progress=False)
    assert calls["n"] == 3 and calls["temperature"] == 0.7 and calls["top_p"] == 0.8 and calls["stop_at_marker"]
    each = inference.score_cots(model, tok, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, fixed[0] + fixed[1],
                                score_token_ids=score_ids, score_values=VALUES, progress=False)
    assert preds == pytest.approx([sum(each[:3]) / 3, sum(each[3:]) / 3], rel=1e-6)
    with pytest.raises(ValueError, match="greedy"):
        inference.predict_rail(model, tok, PROMPTS, score_token_ids=score_ids, score_values=VALUES, n_samples=2)


def test_predict_rail_greedy_matches_across_batch_sizes(tok, model, score_ids):
    kwargs = dict(score_token_ids=score_ids, score_values=VALUES, max_new_tokens=5, progress=False)
    one = inference.predict_rail(model, tok, PROMPTS, batch_size=1, **kwargs)
    three = inference.predict_rail(model, tok, PROMPTS, batch_size=3, **kwargs)
    assert one == pytest.approx(three, abs=1e-5)
    assert inference.predict_rail(model, tok, [], **kwargs) == []


def test_predict_decode_parses_or_gives_none(tok, model, monkeypatch):
    real = inference.predict_decode(model, tok, PROMPTS, max_new_tokens=5, progress=False)
    assert len(real) == 3 and all(p is None or 1 <= p <= 5 for p in real)
    texts = [["Feedback: fine [RESULT] 4"], ["no score here"], ["So the overall score is 9"]]
    monkeypatch.setattr(inference, "generate_cots", lambda *a, **k: texts)
    assert inference.predict_decode(model, tok, PROMPTS, progress=False) == [4.0, None, None]


def test_bad_arguments(tok, model):
    with pytest.raises(ValueError, match="batch_size"):
        inference.generate_cots(model, tok, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="greedy"):
        inference.generate_cots(model, tok, PROMPTS, n=2, greedy=True)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        inference.generate_cots(model, tok, ["a", None])
    with pytest.raises(ValueError, match="top_p"):
        inference.generate_cots(model, tok, PROMPTS, top_p=0.0)
    with pytest.raises(ValueError, match="cots"):
        inference.score_cots(model, tok, PROMPTS, ["x"], score_token_ids=[1], score_values=[1.0])


def test_generated_tokens_count_each_row_to_its_end_without_the_padding():
    """A row ends at its eos (counted once) or where generate pads it; the padding after the end is not generated."""
    new = torch.tensor([[5, 6, 7, 2, 0, 0],    # eos 2 after 3 tokens, then padding 0: 4 generated
                        [5, 6, 7, 8, 9, 4],    # ran to max_new_tokens: 6
                        [5, 0, 0, 0, 0, 0]])   # stopped by a criterion (no eos), then padding: 1
    assert inference.generated_tokens(new, pad_id=0, eos_id=2) == 11
    same = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]])  # a tokenizer that pads with its eos
    assert inference.generated_tokens(same, pad_id=2, eos_id=2) == 3 + 5
    assert inference.generated_tokens(torch.tensor([[5, 0]]), pad_id=0, eos_id=None) == 1


def test_generate_cots_reports_the_tokens_it_generated(model, tok):
    counted = []
    cots = inference.generate_cots(model, tok, PROMPTS[:2], n=2, max_new_tokens=6, progress=False,
                                   stop_at_marker=False, stop_at_score=False, token_count=counted)
    assert len(cots) == 2 and len(counted) >= 1
    assert 0 < sum(counted) <= 2 * 2 * 6  # 4 rows of at most 6 new tokens
