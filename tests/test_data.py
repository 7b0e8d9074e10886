"""real.judge.data: both judge-data formats, JSON and JSON lines, and clear errors on bad rows."""
import json
from pathlib import Path

import pytest

from real.judge.data import JudgeExample, group_by_source, load_judge_data, load_prometheus
from real.judge.prompts import format_cot, render_prompt

from tests.data_paths import SHIPPED, needs_shipped

DESCRIPTIONS = ["wrong", "weak", "partial", "good", "perfect"]


def eval_row(**overrides):
    row = {"idx": 7, "response_source": "bot", "category": "math",
           "instruction": "###Task Description:\n...\n\n###Feedback: ",
           "gpt4_score": [4, 5, 3], "gpt4_feedback": ["ok", "great", "meh"]}
    row.update(overrides)
    return row


def train_row(score=4, **overrides):
    row = {
        "orig_instruction": "What is 2+2?",
        "orig_response": "4",
        "orig_reference_answer": "2+2 equals 4.",
        "orig_criteria": "Is the answer correct?",
        **{f"orig_score{s}_description": d for s, d in enumerate(DESCRIPTIONS, 1)},
        "orig_feedback": "The answer is correct but terse.",
        "orig_score": str(score),
        "output": f"Feedback: The answer is correct but terse. [RESULT] {score}",
    }
    row["instruction"] = render_prompt(row["orig_instruction"], row["orig_response"],
                                       {k[5:]: row[k] for k in row if k.startswith("orig_score") and "desc" in k}
                                       | {"criteria": row["orig_criteria"]},
                                       reference_answer=row["orig_reference_answer"])
    row.update(overrides)
    return row


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- the shipped Prometheus eval files --------------------------------------------

@needs_shipped
def test_shipped_files_load():
    examples = load_judge_data(SHIPPED)
    assert len(examples) == 640
    raw = json.loads(SHIPPED[0].read_text())
    first = examples[0]
    assert isinstance(first, JudgeExample)
    assert first.prompt == raw[0]["instruction"] and first.prompt.endswith("###Feedback: ")
    assert first.grades == [float(g) for g in raw[0]["gpt4_score"]]
    assert first.feedback == raw[0]["gpt4_feedback"]
    assert first.meta["source"] == "vicuna_eval" and first.meta["row"] == 0
    assert first.meta["idx"] == raw[0]["idx"] and first.meta["response_source"] == raw[0]["response_source"]
    for example, row in zip(examples, raw):
        assert example.target == pytest.approx(sum(row["gpt4_score"]) / 3)
    groups = group_by_source(examples)
    assert list(groups) == ["vicuna_eval", "mt_bench_eval"]
    assert [len(g) for g in groups.values()] == [320, 320]
    assert [e.meta["row"] for e in groups["mt_bench_eval"]] == list(range(320))


# --- Prometheus eval format, JSON and JSON lines ------------------------------------

def test_eval_format_json_and_jsonl_agree(tmp_path):
    rows = [eval_row(), eval_row(idx=8, gpt4_score=[1, 1, 2], gpt4_feedback=["a", "b", "c"])]
    from_json = load_prometheus(write_json(tmp_path / "bench.json", rows))
    from_jsonl = load_prometheus(write_jsonl(tmp_path / "bench.jsonl", rows))
    for a, b in zip(from_json, from_jsonl):
        assert (a.prompt, a.target, a.grades, a.feedback) == (b.prompt, b.target, b.grades, b.feedback)
    assert from_json[0].target == pytest.approx(4.0)
    assert from_json[1].target == pytest.approx(4 / 3)
    assert from_json[0].meta["format"] == "prometheus_eval"


def test_stray_fields_are_kept_in_meta(tmp_path):
    rows = [eval_row(extra={"nested": [1, 2]}, weird_field=None), train_row(note="hello")]
    examples = load_prometheus(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert examples[0].meta["extra"] == {"nested": [1, 2]} and examples[0].meta["weird_field"] is None
    assert examples[1].meta["note"] == "hello"
    assert "gpt4_score" not in examples[0].meta and "orig_score" not in examples[1].meta


def test_missing_feedback_is_allowed(tmp_path):
    row = eval_row()
    del row["gpt4_feedback"]
    (example,) = load_prometheus(write_json(tmp_path / "b.json", [row]))
    assert example.feedback == [] and example.grades == [4.0, 5.0, 3.0]


# --- Feedback-Collection format -----------------------------------------------------

def test_feedback_collection_rows(tmp_path):
    examples = load_prometheus(write_jsonl(tmp_path / "train.jsonl", [train_row(4), train_row(2)]))
    first = examples[0]
    assert first.target == 4.0 and first.grades == [4.0]
    assert first.feedback == ["The answer is correct but terse."]
    assert format_cot(first.feedback[0], first.grades[0]) == train_row(4)["output"]
    assert first.meta["format"] == "feedback_collection" and first.meta["source"] == "train"
    assert examples[1].target == 2.0


def test_feedback_collection_prompt_rendered_from_parts(tmp_path):
    with_instruction = train_row(3)
    without = dict(with_instruction)
    del without["instruction"]
    a, b = load_prometheus(write_json(tmp_path / "t.json", [with_instruction, without]))
    assert a.prompt == b.prompt
    assert "###The instruction to evaluate:\nWhat is 2+2?\n" in b.prompt
    assert "Score 5: perfect" in b.prompt and b.prompt.endswith("###Feedback: ")

    no_reference = dict(without, orig_reference_answer=None)
    (c,) = load_prometheus(write_json(tmp_path / "t2.json", [no_reference]))
    assert "###Reference Answer" not in c.prompt


def test_feedback_collection_score_from_output_only(tmp_path):
    row = train_row(5)
    del row["orig_score"], row["orig_feedback"]
    (example,) = load_prometheus(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert example.target == 5.0
    assert example.feedback == ["The answer is correct but terse."]  # prefix and score cut off


def test_pretty_printed_single_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(eval_row(), indent=2))
    (example,) = load_prometheus(path)
    assert example.target == pytest.approx(4.0)


# --- malformed rows -----------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (eval_row(gpt4_score=[]), "gpt4_score"),
    (eval_row(gpt4_score="4"), "gpt4_score"),
    (eval_row(gpt4_score=[4, "x", 3]), r"gpt4_score\[1\]"),
    (eval_row(gpt4_score=[4, 9, 3]), r"gpt4_score\[1\] = 9 is outside"),
    (eval_row(gpt4_score=[True, 4, 3]), "boolean"),
    (eval_row(gpt4_feedback=["only one"]), "1 texts for 3 grades"),
    (eval_row(gpt4_feedback="text"), "gpt4_feedback"),
    (eval_row(instruction=5), "'instruction' must be a string, got int"),
    (eval_row(instruction="  "), "'instruction' is empty"),
    ({"idx": 1, "text": "no score anywhere"}, "unknown row format"),
    (["a", "list"], "expected a JSON object"),
    (train_row(orig_score="high"), "orig_score"),
    (train_row(orig_score="4", output="Feedback: x [RESULT] 2"), "disagrees"),
    ({k: v for k, v in train_row().items() if k not in ("instruction", "orig_response")}, "orig_response"),
    ({"output": "Feedback: no score here", "instruction": "p"}, "no score"),
])
def test_malformed_row_names_file_and_row(tmp_path, bad, match):
    path = write_json(tmp_path / "bench.json", [eval_row(), eval_row(), bad])
    with pytest.raises(ValueError, match=match) as info:
        load_prometheus(path)
    assert str(path) in str(info.value) and "row 2" in str(info.value)


def test_invalid_json_line_names_row_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [eval_row(), "", "{not json", eval_row()])
    path.write_text(path.read_text().replace("\n\n", "\n\n\n"))  # a blank line shifts line numbers, not rows
    with pytest.raises(ValueError, match=r"t\.jsonl: row 1 \(line 4\): invalid JSON"):
        load_prometheus(path)


def test_skip_malformed_warns_with_count(tmp_path):
    rows = [eval_row(), eval_row(gpt4_score=[7]), "{broken", eval_row(), {"nothing": 1}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.warns(UserWarning, match=r"skipped 3 malformed row\(s\) of 5; first: row 1"):
        examples = load_prometheus(path, skip_malformed=True)
    assert [e.meta["row"] for e in examples] == [0, 3]  # row numbers stay those of the file


def test_all_rows_malformed_is_an_error_even_when_skipping(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"x": 1}, {"y": 2}])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 2 rows are malformed"):
        load_prometheus(path, skip_malformed=True)


@pytest.mark.parametrize("content,match", [
    ("", "file is empty"),
    ("  \n\n ", "file is empty"),
    ("[]", "contains no rows"),
    ("[{\"gpt4_score\": [4]},", "invalid JSON at line 1"),
])
def test_empty_or_broken_files(tmp_path, content, match):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_prometheus(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_prometheus(tmp_path / "nope.json")


def test_load_judge_data_sources_and_arguments(tmp_path):
    a = write_json(tmp_path / "alpha.json", [eval_row()])
    b = write_jsonl(tmp_path / "beta.jsonl", [train_row(1), train_row(2)])
    examples = load_judge_data([a, b])
    assert [e.meta["source"] for e in examples] == ["alpha", "beta", "beta"]
    assert len(load_judge_data(str(a))) == 1
    with pytest.raises(ValueError, match="at least one"):
        load_judge_data([])

