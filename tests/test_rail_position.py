"""One RAIL read-out at the right position, with a tokenizer built here that keeps the
space apart from a digit as Qwen's does (its pre-tokenizer splits every digit off on its own: " 4" is two
tokens, "Ġ" and "4").  `real eval --model` (score_cots), the training loop's evaluation (rail_predictions)
and the training losses (judge_forward on a batch with targets) must read the same position: the one whose
next token is the score digit.  Before the fix, score_cots read the position after the marker, i.e. the
prediction of the space token.
"""
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import real.judge.inference as inference
from real.judge.batching import build_teacher_forced_batch
from real.model.head import judge_forward
from real.judge.prompts import ScoreScale
from real.model.tiny import build_tiny_model

# Qwen2/Qwen3's pre-tokenizer pattern (tokenizer.json of Qwen/Qwen3-8B): digits split one by one, so a
# space before a digit is a token of its own.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Feedback: The response is clear and correct. [RESULT] 4", "Feedback: It misses details. [RESULT] 2",
          "###Feedback: Grade the answer. Score 1 2 3 4 5 [RESULT] 5 [RESULT] 3 [RESULT] 1"] * 20
PROMPTS = ["###Task Description:\nGrade the answer.\n###Feedback: ", "Grade it. ###Feedback: "]
COTS = ["Feedback: The response is clear. [RESULT] 4", "Feedback: It misses details."]


@pytest.fixture(scope="module")
def qwen_like():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tokenizer, build_tiny_model(tokenizer, seed=3)


def test_the_tokenizer_keeps_the_space_apart_from_the_digit(qwen_like):
    tokenizer, _ = qwen_like
    pieces = [tokenizer.decode([i]) for i in tokenizer("[RESULT] 4", add_special_tokens=False)["input_ids"]]
    assert pieces[-2:] == [" ", "4"], pieces


def test_real_eval_training_and_evaluation_read_the_same_position(qwen_like):
    tokenizer, model = qwen_like
    scale = ScoreScale.from_tokenizer(tokenizer)
    targets = [4.0, 2.0]
    batch = build_teacher_forced_batch(tokenizer, PROMPTS, COTS, targets, scale.token_ids, scale.values)
    rows = torch.arange(2)
    # the position the losses read predicts the digit: the token after it is the score token
    assert batch.input_ids[rows, batch.score_pos + 1].tolist() == batch.score_token.tolist()
    assert [tokenizer.decode([int(t)]) for t in batch.input_ids[rows, batch.score_pos]] == [" ", " "]
    with torch.no_grad():
        training = judge_forward(model, batch, scale.token_ids, scale.values).expected_score
    real_eval = inference.score_cots(model, tokenizer, PROMPTS, COTS, score_token_ids=scale.token_ids,
                                     score_values=scale.values, progress=False)
    torch.testing.assert_close(torch.tensor(real_eval), training, atol=1e-5, rtol=1e-5)
    # and by hand: the full-vocabulary softmax at that position
    with torch.no_grad():
        logp = torch.log_softmax(model(batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    pi = logp[rows, batch.score_pos][:, list(scale.token_ids)].exp()
    torch.testing.assert_close(torch.tensor(real_eval), pi @ torch.tensor(scale.values, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_the_training_loops_evaluation_is_the_same_read_out(qwen_like, monkeypatch):
    tokenizer, model = qwen_like
    scale = ScoreScale.from_tokenizer(tokenizer)
    monkeypatch.setattr(inference, "generate_cots", lambda *a, **k: [[c] for c in COTS])
    loop_eval = inference.rail_predictions(model, tokenizer, PROMPTS, scale, max_new_tokens=4, batch_size=1)
    real_eval = inference.score_cots(model, tokenizer, PROMPTS, COTS, score_token_ids=scale.token_ids,
                                     score_values=scale.values, progress=False)
    torch.testing.assert_close(torch.tensor(loop_eval), torch.tensor(real_eval), atol=1e-5, rtol=1e-5)
