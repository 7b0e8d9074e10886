"""real.model.tiny: the on-the-spot tokenizer and random Qwen3, and the model loader."""
import logging

import pytest
import torch

from real.judge.prompts import SCORE_MARKER, format_cot, parse_score, render_prompt, resolve_score_token_ids
from real.model.loading import choose_attn_implementation, load_model_and_tokenizer
from real.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _prompt():
    rubric = {"criteria": "Is the answer correct?", **{f"score{s}_description": f"Level {s} answer." for s in range(1, 6)}}
    return render_prompt("What is 2 + 2?", "It is 4.", rubric, reference_answer="2 + 2 = 4.")


def test_tokenizer_is_small_deterministic_and_exact(tokenizer):
    assert len(tokenizer) < 2000
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    again = build_tiny_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    text = _prompt() + format_cot("Correct, but terse. Ünïcödé & emoji \U0001F600 too.", 4)
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level: nothing becomes unknown
    assert len(ids) < len(text) / 2  # the template and common words are merged, so prompts stay short


def test_digits_and_marker_are_single_tokens(tokenizer):
    marker_ids = tokenizer(SCORE_MARKER, add_special_tokens=False).input_ids
    assert len(marker_ids) == 1
    score_ids = resolve_score_token_ids(tokenizer)
    assert score_ids == [tokenizer.convert_tokens_to_ids(str(v)) for v in range(1, 6)]
    ids = tokenizer("So the overall score is 4 [RESULT] 4", add_special_tokens=False).input_ids
    assert ids[-1] == score_ids[3] and ids.count(score_ids[3]) == 2 and marker_ids[0] in ids
    assert parse_score(tokenizer.decode(ids)) == 4.0


def test_tiny_model_shapes_seed_and_overrides(tokenizer):
    model = build_tiny_model(tokenizer)
    assert model.config.vocab_size == len(tokenizer) and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    same = build_tiny_model(tokenizer, seed=0)
    other = build_tiny_model(tokenizer, seed=1, num_hidden_layers=1, tie_word_embeddings=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    assert other.config.num_hidden_layers == 1
    assert other.get_output_embeddings().weight is not other.get_input_embeddings().weight
    ids = tokenizer([_prompt()], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tokenizer, vocab_size=10)


def test_save_and_load_round_trip(tmp_path, tokenizer, caplog):
    model = build_tiny_model(tokenizer, seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="real.model.loading"):
        loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path))
    assert "sdpa" in caplog.text
    assert loaded.config._attn_implementation == "sdpa"
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id and loaded_tok.eos_token_id == tokenizer.eos_token_id
    text = _prompt() + format_cot("Fine.", 3)
    assert loaded_tok(text).input_ids == tokenizer(text).input_ids
    assert resolve_score_token_ids(loaded_tok) == resolve_score_token_ids(tokenizer)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert next(loaded.parameters()).dtype == torch.float32 and not loaded.training
    half, _ = load_model_and_tokenizer(str(tmp_path), dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model_and_tokenizer(str(missing))
    with pytest.raises(ValueError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer("tiny", dtype="float8")


def test_tiny_by_name_and_attention_choice():
    model, tok = load_model_and_tokenizer("tiny")
    assert model.config.vocab_size == len(tok) and not model.training
    assert choose_attn_implementation("cpu") == "sdpa"
    assert choose_attn_implementation("cpu", "eager") == "eager"
    expected_cuda = "flash_attention_2" if _flash_attn_importable() else "sdpa"
    assert choose_attn_implementation("cuda") == expected_cuda
    eager, _ = load_model_and_tokenizer("tiny", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def _flash_attn_importable():
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True
