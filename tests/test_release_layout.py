"""The released prompt/CoT layout and the released decoding rule.

Feedback-Collection's feedback texts end in "So the overall score is 4." and its outputs in "[RESULT] 4".  A warm-up
or REAL target that keeps that sentence before the marker has the judge commit to a digit in its CoT, which RAIL
at the marker then copies.  So: no target holds a score before the marker, whatever the phrase; under the
released phrase the prompt asks for "So the overall score is N" (the sentence the released data scripts append)
and the CoT ends there.  And `real eval` has the released validation's settings and decoded-score rule.
"""
import json
import random

import pytest

import real.judge.inference as inference
from real.judge.data import load_prometheus, with_score_phrase
from real.methods.tract import reference_cot
from real.judge.prompts import (RELEASED_INSTRUCTION, SCORE_MARKER, SCORE_PHRASES, format_cot, format_rubric, parse_score,
                          prompt_for_score_phrase, render_prompt)

RELEASED = SCORE_PHRASES["released"]
# data/collection.py and data/collection_sft.py of github.com/YasminZhang/REAL, `instruction_following`, verbatim
RELEASE_SENTENCE = ("Let's output the final score as \"So the overall score is (score)\" without a period at the end. "
                    "The score, which is a number between 1 and 5, should appear at the end of the answer in place "
                    "of the period.")
FEEDBACKS = [
    "The response is accurate and covers the reference answer's points, with a minor slip. So the overall score is 4.",
    "It misses the question entirely. So the overall score is 1.",
    "Clear, complete and correct; nothing to add. so the overall score is 5",
    "Partly right: the steps are fine but the final number is wrong.",
]


def feedback_collection_rows():
    """Rows laid out as prometheus-eval/Feedback-Collection's: orig_feedback ends in the score sentence and
    output = "Feedback: <orig_feedback> [RESULT] <score>"."""
    rubric = format_rubric("Is the answer correct?", ["wrong", "weak", "partial", "good", "perfect"])
    rows = []
    for i, feedback in enumerate(FEEDBACKS):
        score = (4, 1, 5, 2)[i]
        rows.append({"instruction": render_prompt(f"What is {i} + {i}?", str(2 * i), rubric, str(2 * i)),
                     "orig_feedback": feedback, "orig_score": str(score),
                     "output": f"Feedback: {feedback} [RESULT] {score}"})
    return rows


def before_marker(cot: str, marker: str) -> str:
    assert cot.count(marker) == 1, cot
    return cot.split(marker)[0]


@pytest.mark.parametrize("phrase", ["prometheus", "released", "Verdict:"])
def test_no_warm_up_target_holds_a_score_before_the_marker(tmp_path, phrase):
    marker = SCORE_PHRASES.get(phrase, phrase)
    path = tmp_path / "feedback_collection.json"
    path.write_text(json.dumps(feedback_collection_rows()))
    for example in load_prometheus(path):
        cot = reference_cot(example, random.Random(0), marker)
        assert parse_score(before_marker(cot, marker)) is None, cot  # the only score is the one after the marker
        assert parse_score(cot, marker=marker) == example.target and cot.endswith(f"{marker} {example.target:g}")
    # the output field (with its "[RESULT] N") as the feedback gives the same CoT
    for row in feedback_collection_rows():
        assert format_cot(row["output"], row["orig_score"], marker) == format_cot(row["orig_feedback"],
                                                                                 row["orig_score"], marker)


def test_the_released_warm_up_target_is_the_released_sft_answer():
    # data/collection_sft.py: output.split("So the overall score is")[0] + f"So the overall score is {score}"
    for row in feedback_collection_rows():
        released_answer = row["output"].split(RELEASED)[0] + f"{RELEASED} {row['orig_score']}"
        if RELEASED in row["orig_feedback"]:  # (the one lower-case "so the overall score" row is cut here too)
            assert format_cot(row["orig_feedback"], row["orig_score"], RELEASED) == released_answer


def test_the_released_phrase_appends_the_released_sentence_to_prometheus_prompts():
    assert RELEASED_INSTRUCTION == RELEASE_SENTENCE
    prompt = feedback_collection_rows()[0]["instruction"]
    laid_out = prompt_for_score_phrase(prompt, "released")
    assert laid_out == prompt + " " + RELEASE_SENTENCE  # as the release builds its question
    assert prompt_for_score_phrase(laid_out, "released") == laid_out  # not twice
    assert prompt_for_score_phrase(prompt, "prometheus") == prompt
    assert prompt_for_score_phrase("Is 2 + 2 = 4? ###Feedback: ", "released") == "Is 2 + 2 = 4? ###Feedback: "
    with pytest.raises(ValueError, match="prompt"):
        prompt_for_score_phrase(None, "released")


@pytest.mark.usefixtures("one_thread")
def test_training_prompts_and_targets_in_the_released_layout(tmp_path):
    """A TRACT step and a REAL step on Feedback-Collection rows under the released phrase: the prompt ends in the
    released sentence, the CoT holds no score before the phrase, and the true score follows it."""
    import real.loop.train as train
    from real.loop.config import make_config

    path = tmp_path / "feedback_collection.json"
    path.write_text(json.dumps(feedback_collection_rows()))
    texts = {}
    for method in ("tract", "real"):
        cfg = make_config(model="tiny", data=[str(path)], eval_data=[str(path)], progress=False, steps=1,
                          output_dir=str(tmp_path / method), score_phrase="released", method=method,
                          prompts_per_step=2, group_size=2, max_new_tokens=6, eval_size=1)
        trainer = train.Trainer(cfg, log=lambda m: None)
        assert all(e.prompt.endswith(RELEASE_SENTENCE) for e in trainer.train_examples + trainer.eval_examples)
        batches = []
        original = trainer.method.collect
        trainer.method.collect = lambda *a: batches.append(original(*a)) or batches[-1]
        trainer.train_step(1)
        tok = trainer.tokenizer
        texts[method] = [tok.decode(ids, skip_special_tokens=True) for ids in batches[0].batch.input_ids]
    for method, decoded in texts.items():
        for text in decoded:
            prompt, cot = text.split(RELEASE_SENTENCE)
            assert "###Feedback:" in prompt and SCORE_MARKER not in cot
            body, score = cot.rsplit(RELEASED, 1)
            assert parse_score(body) is None, (method, cot)
            assert score.strip() in {"1", "2", "4", "5"}, (method, cot)  # the true score token, after the phrase


def test_with_score_phrase_keeps_other_examples_as_they_are(tmp_path):
    path = tmp_path / "feedback_collection.json"
    path.write_text(json.dumps(feedback_collection_rows()))
    examples = load_prometheus(path)
    assert with_score_phrase(examples, "prometheus") == examples
    released = with_score_phrase(examples, "released")
    assert [e.prompt for e in released] == [e.prompt + " " + RELEASE_SENTENCE for e in examples]
    assert [e.target for e in released] == [e.target for e in examples]


# --- the released decoding rule and real eval's defaults ------------------

@pytest.mark.parametrize("text, expected", [
    ("Feedback: fine. So the overall score is 4", 4.0),
    ("Feedback: fine. So the overall score is 4.", 0.0),  # does not end in a digit: 0, as the release scores it
    ("Feedback: fine. [RESULT] 3\n", 0.0),
    ("", 0.0),
    ("no score at all", 0.0),
    ("… 7", 7.0),  # the release reads the digit as it is, in range or not
    ("score ²", 0.0),  # only ASCII digits are digits here
])
def test_the_released_decoding_rule(text, expected):
    assert inference.decoded_score(text, "released") == expected


def test_the_parse_rule_is_parse_score_and_bad_rules_are_named():
    text = "Feedback: fine. So the overall score is 4."
    assert inference.decoded_score(text, "parse", marker=RELEASED) == parse_score(text, marker=RELEASED) == 4.0
    assert inference.decoded_score("Feedback: fine.", "parse") is None
    with pytest.raises(ValueError, match="rule must be one of parse, released"):
        inference.decoded_score(text, "last-digit")


def test_released_decoding_generates_to_the_end(monkeypatch):
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return [["Feedback: good. So the overall score is 5"], ["Feedback: good. So the overall score is 5 ok"]]

    monkeypatch.setattr(inference, "generate_cots", fake_generate)
    out = inference.predict_decode(None, None, ["a", "b"], greedy=False, rule="released", marker=RELEASED,
                                   progress=False)
    assert out == [5.0, 0.0]
    assert seen["stop_at_score"] is False and seen["stop_at_marker"] is False and seen["greedy"] is False
    inference.predict_decode(None, None, ["a", "b"], progress=False)
    assert seen["stop_at_score"] is True  # the parse rule stops once the score is written


def test_real_eval_defaults_are_the_released_validations():
    from real.judge.evaluate import build_parser

    args = build_parser().parse_args(["--data", "x.json", "--model", "tiny"])
    assert (args.max_new_tokens, args.n_samples, args.temperature, args.top_p) == (1024, 1, 1.0, 0.9)
    assert "decode-released" in args.methods and "rail-sampled" in args.methods


def test_real_eval_lays_prompts_out_for_the_score_phrase(tmp_path, monkeypatch):
    import real.judge.evaluate as evaluate

    path = tmp_path / "bench.json"
    rows = [{"instruction": r["instruction"], "gpt4_score": [int(r["orig_score"])]} for r in feedback_collection_rows()]
    path.write_text(json.dumps(rows))
    seen = []

    def fake_rail(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return [1.0 + i for i in range(len(prompts))]

    monkeypatch.setattr(inference, "predict_rail", fake_rail)
    assert evaluate.main(["--data", str(path), "--model", "tiny", "--methods", "rail-greedy", "--device", "cpu",
                          "--score-phrase", "released", "--no-chat-template"]) == 0
    assert len(seen) == len(rows) and all(p.endswith(RELEASE_SENTENCE) for p in seen)
