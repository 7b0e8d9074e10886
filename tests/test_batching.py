"""real.judge.batching: layout, masks and truncation of teacher-forced judge batches."""
import math

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from real.judge.batching import build_teacher_forced_batch, cut_at_marker, score_indices
from real.judge.prompts import SCORE_MARKER, resolve_score_token_ids
from real.model.tiny import build_tiny_tokenizer

VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def score_ids(tok):
    return resolve_score_token_ids(tok)


def _merged_space_tokenizer():
    """A GPT-2 / Qwen-style byte-level BPE where " 4" is one token (different from "4")."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = [f"the score is {d} and {d} again, feedback {d}" for d in "12345"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    raw.add_tokens([AddedToken(SCORE_MARKER, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


def _row(batch, b):
    n = int(batch.attention_mask[b].sum())
    return batch.input_ids[b, :n].tolist()


def test_layout_masks_and_score_position(tok, score_ids):
    prompts = ["Grade this answer.\n###Feedback: ", "Short prompt here, a bit longer than the first one."]
    cots = ["Feedback: clear and correct. [RESULT] 2 and more text", "Feedback: weak answer"]
    batch = build_teacher_forced_batch(tok, prompts, cots, [4.33, 1.6], score_ids, VALUES)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.cot_mask.shape
    assert batch.score_token.tolist() == [score_ids[3], score_ids[1]]
    assert batch.score_index.tolist() == [3, 1]
    torch.testing.assert_close(batch.targets, torch.tensor([4.33, 1.6]))
    expected_text = ["Feedback: clear and correct. [RESULT] 4", "Feedback: weak answer [RESULT] 2"]
    for b in range(2):
        ids = _row(batch, b)
        p = int(batch.prompt_lengths[b])
        assert tok.decode(ids[:p]) == prompts[b]
        assert tok.decode(ids[p:]) == expected_text[b]  # cut at its own marker, true score appended
        s = int(batch.score_pos[b])
        assert s == len(ids) - 2 and ids[s + 1] == int(batch.score_token[b])
        mask_positions = batch.cot_mask[b].nonzero().squeeze(1).tolist()
        # exactly the positions predicting CoT tokens: not the prompt, not the score token, not padding
        assert mask_positions == list(range(p - 1, s))
        assert tok.decode([ids[t + 1] for t in mask_positions]).rstrip() == expected_text[b][:-1].rstrip()
        assert not batch.cot_mask[b, len(ids) - 1:].any()
        assert (batch.input_ids[b, len(ids):] == tok.pad_token_id).all()
    assert batch.cot_lengths.tolist() == [int(batch.score_pos[b]) - int(batch.prompt_lengths[b]) + 1 for b in range(2)]


def test_marker_only_cot_and_missing_marker(tok, score_ids):
    batch = build_teacher_forced_batch(tok, ["p:", "p:"], ["[RESULT] 3", ""], [3.0, 5.0], score_ids, VALUES)
    for b, text in enumerate(["[RESULT] 3", "[RESULT] 5"]):
        ids = _row(batch, b)
        assert tok.decode(ids[int(batch.prompt_lengths[b]):]) == text


def test_score_indices_round_half_up_and_clamp():
    assert score_indices([4.33, 4.67, 2.5, 3.49, 0.2, 7.0, 1.0], VALUES) == [3, 4, 2, 2, 0, 4, 0]
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        score_indices([1.0, math.nan], VALUES)


def test_cut_at_marker():
    assert cut_at_marker("Feedback: ok [RESULT] 4 [RESULT] 5") == "Feedback: ok"
    assert cut_at_marker("no marker  ") == "no marker"
    with pytest.raises(ValueError, match="string"):
        cut_at_marker(None)


def test_truncation_warns_and_keeps_the_right_parts(tok, score_ids):
    prompt = "word " * 50 + "###Feedback: "
    cot = "Feedback: " + "long " * 40 + "[RESULT] 1"
    with pytest.warns(UserWarning) as record:
        batch = build_teacher_forced_batch(tok, [prompt], [cot], [2.0], score_ids, VALUES,
                                           max_prompt_tokens=8, max_cot_tokens=12)
    messages = " ".join(str(w.message) for w in record)
    assert "max_prompt_tokens=8" in messages and "max_cot_tokens=12" in messages
    ids = _row(batch, 0)
    assert int(batch.prompt_lengths[0]) == 8
    assert tok.decode(ids[:8]).endswith("###Feedback: ")  # the prompt keeps its end
    assert int(batch.cot_lengths[0]) == 12
    cot_text = tok.decode(ids[8:])
    assert cot_text.startswith("Feedback: long") and cot_text.endswith("[RESULT] 2")
    assert ids[int(batch.score_pos[0]) + 1] == score_ids[1]


def test_no_cot_puts_the_score_right_after_the_prompt(tok, score_ids):
    batch = build_teacher_forced_batch(tok, ["a b c", "a"], None, [5.0, 1.0], score_ids, VALUES)
    assert not batch.cot_mask.any()
    assert batch.score_pos.tolist() == [int(p) - 1 for p in batch.prompt_lengths]
    assert batch.input_ids[0, int(batch.score_pos[0]) + 1] == score_ids[4]


def test_without_targets_ends_at_the_score_position(tok, score_ids):
    batch = build_teacher_forced_batch(tok, ["p:"], ["Feedback: ok [RESULT] 9"], None, score_ids, VALUES)
    ids = _row(batch, 0)
    assert tok.decode(ids[int(batch.prompt_lengths[0]):]) == "Feedback: ok [RESULT]"
    assert int(batch.score_pos[0]) == len(ids) - 1
    assert batch.score_token.tolist() == [-100] and math.isnan(float(batch.targets[0]))


def test_merged_leading_space_tokenizer():
    tok = _merged_space_tokenizer()
    ids5 = resolve_score_token_ids(tok)
    assert tok.convert_ids_to_tokens(ids5[3]) == "Ġ4"  # the space is part of the score token
    batch = build_teacher_forced_batch(tok, ["the score is"], ["feedback 2 [RESULT] 2"], [4.0], ids5, VALUES)
    ids = _row(batch, 0)
    assert ids[-1] == ids5[3] and ids[int(batch.score_pos[0]) + 1] == ids5[3]
    assert tok.decode(ids[int(batch.prompt_lengths[0]):]) == "feedback 2 [RESULT] 4"


def test_bad_inputs(tok, score_ids):
    with pytest.raises(ValueError, match="cots"):
        build_teacher_forced_batch(tok, ["a", "b"], ["c"], [1, 2], score_ids, VALUES)
    with pytest.raises(ValueError, match="targets"):
        build_teacher_forced_batch(tok, ["a"], ["c"], [1, 2], score_ids, VALUES)
    with pytest.raises(ValueError, match="prompts is empty"):
        build_teacher_forced_batch(tok, [], [], [], score_ids, VALUES)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        build_teacher_forced_batch(tok, [3], ["c"], [1], score_ids, VALUES)
    with pytest.raises(ValueError, match="score_values"):
        build_teacher_forced_batch(tok, ["a"], ["c"], [1], score_ids, VALUES[:3])
