"""Prompts as real judges see them: the tokenizer's chat template (on by default, off with
--no-chat-template) and a configurable score phrase in training, inference and parsing, with the released
phrase ('So the overall score is N') and Prometheus' ('[RESULT] N') built in."""
import pytest
import torch

import real.judge.inference as inference
from real.loop.config import make_config
from real.judge.data import JudgeExample, with_chat_templates
from real.judge.prompts import SCORE_PHRASES, ScoreScale, format_cot, parse_score, score_phrase, with_chat_template
from real.model.tiny import build_tiny_model, build_tiny_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RELEASED = SCORE_PHRASES["released"]


def test_the_chat_template_wraps_the_prompt_when_the_tokenizer_has_one():
    tok = build_tiny_tokenizer()
    assert with_chat_template(tok, "Grade it.") == "Grade it."  # no template: unchanged
    tok.chat_template = TEMPLATE
    assert with_chat_template(tok, "Grade it.") == "<|im_start|>user\nGrade it.<|im_end|>\n<|im_start|>assistant\n"
    examples = [JudgeExample("Grade it.", 3.0, [3.0])]
    assert with_chat_templates(examples, tok)[0].prompt.startswith("<|im_start|>user")
    assert with_chat_templates(examples, tok, enabled=False)[0].prompt == "Grade it."


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("chat_template", [True, False])
def test_training_uses_the_template_unless_turned_off(tmp_path, monkeypatch, chat_template):
    import real.loop.train as train

    tok = build_tiny_tokenizer()
    tok.chat_template = TEMPLATE
    cfg = make_config(model="tiny", data=["synthetic"], synthetic_train_size=8, synthetic_eval_size=2,
                      progress=False, output_dir=str(tmp_path), steps=1, chat_template=chat_template)
    trainer = train.Trainer(cfg, model=build_tiny_model(tok), tokenizer=tok, log=lambda m: None)
    wrapped = all(e.prompt.startswith("<|im_start|>user") for e in trainer.train_examples + trainer.eval_examples)
    assert wrapped == chat_template


def test_score_phrases_by_name_or_as_given():
    assert score_phrase("prometheus") == "[RESULT]" and score_phrase("released") == "So the overall score is"
    assert score_phrase("Verdict:") == "Verdict:"
    with pytest.raises(ValueError, match="score phrase"):
        make_config(score_phrase=" padded ")


def test_the_released_phrase_in_formatting_parsing_and_the_score_tokens():
    # Feedback-Collection's texts already end in the phrase: it is not written twice
    assert format_cot("Clear and right. So the overall score is 4.", 4, RELEASED) == \
        "Feedback: Clear and right. So the overall score is 4"
    assert parse_score("Feedback: fine. So the overall score is 3", marker=RELEASED) == 3.0
    assert parse_score("Feedback: fine. Verdict: 2", marker="Verdict:") == 2.0
    tok = build_tiny_tokenizer()
    scale = ScoreScale.from_tokenizer(tok, marker=RELEASED)
    assert scale.marker == RELEASED and [tok.decode([i]) for i in scale.token_ids] == ["1", "2", "3", "4", "5"]


def test_inference_reads_the_score_after_the_configured_phrase():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=4)
    scale = ScoreScale.from_tokenizer(tok, marker=RELEASED)
    prompts = ["Grade it. ###Feedback: "]
    # a CoT that ends in the released phrase reads the same as the bare body (cut at the phrase, phrase appended)
    with_phrase = inference.score_cots(model, tok, prompts, [f"Feedback: fine. {RELEASED} 2"],
                                       score_token_ids=scale.token_ids, score_values=scale.values,
                                       progress=False, marker=RELEASED)
    bare = inference.rail_scores(model, tok, prompts, ["Feedback: fine."], scale)
    torch.testing.assert_close(torch.tensor(with_phrase), torch.tensor(bare))
    # and differs from reading after Prometheus' marker
    other = inference.rail_scores(model, tok, prompts, ["Feedback: fine."], ScoreScale.from_tokenizer(tok))
    assert abs(other[0] - bare[0]) > 1e-6


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["real", "tract"])
def test_a_training_step_with_the_released_phrase(tmp_path, method):
    import real.loop.train as train

    cfg = make_config(model="tiny", data=["synthetic"], synthetic_train_size=8, synthetic_eval_size=2, progress=False,
                      output_dir=str(tmp_path), steps=1, score_phrase="released", prompts_per_step=2, group_size=2,
                      max_new_tokens=8)
    trainer = train.Trainer(cfg, log=lambda m: None)
    assert trainer.scale.marker == RELEASED
    batches = []
    original = trainer.method.collect
    trainer.method.collect = lambda *a: batches.append(original(*a)) or batches[-1]
    record = trainer.train_step(1)
    assert record["loss"] == record["loss"]
    text = trainer.tokenizer.decode(batches[0].batch.input_ids[0])
    assert RELEASED in text and "[RESULT]" not in text.split("###Feedback:")[-1]
