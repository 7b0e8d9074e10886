"""`real data download` (offline, against file:// URLs) and the published layouts of Feedback Bench and FLASK
(issue 11, item 7)."""
import json
import urllib.error

import pytest

from real import cli, download
from real.data import load_prometheus
from real.evaluate import main as eval_main
from real.prompts import render_prompt

RUBRIC = {"criteria": "Is the answer correct?", **{f"score{s}_description": f"level {s}" for s in range(1, 6)}}


def _prompt(i):
    return render_prompt(f"question {i}", f"answer {i}", RUBRIC, reference_answer="the right answer")


def feedback_bench_hub_rows(n=6):
    """Feedback Bench as the Hub publishes it (prometheus-eval/Feedback-Bench): the Feedback-Collection layout."""
    rows = []
    for i in range(n):
        score = 1 + i % 5
        rows.append({"instruction": _prompt(i), "output": f"Feedback: fine. [RESULT] {score}",
                     "orig_instruction": f"question {i}", "orig_response": f"answer {i}",
                     "orig_reference_answer": "the right answer", "orig_criteria": RUBRIC["criteria"],
                     **{f"orig_score{s}_description": f"level {s}" for s in range(1, 6)},
                     "orig_feedback": "fine.", "orig_score": str(score), "input": ""})
    return rows


def feedback_bench_github_rows(n=6):
    """Feedback Bench as prometheus-eval's eval/benchmark/data/feedback_collection_ood_test.json: one grade."""
    return [{"instruction": _prompt(i), "gpt4_feedback": f"Feedback: ok [RESULT] {1 + i % 5}",
             "gpt4_score": 1 + i % 5} for i in range(n)]


def flask_rows(n=6):
    return [{"instruction": _prompt(i), "gpt4_score": [1 + i % 5, 2, 3], "human_score": [3, 3, 4],
             "gpt4_feedback": ["a", "b", "c"]} for i in range(n)]


def test_feedback_bench_has_one_grade_per_row_in_both_published_layouts(tmp_path, capsys):
    for name, rows in (("feedback_bench", feedback_bench_hub_rows()),
                       ("feedback_collection_ood_test", feedback_bench_github_rows())):
        path = tmp_path / f"{name}.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) if name == "feedback_bench" else json.dumps(rows))
        examples = load_prometheus(path)
        assert [e.grades for e in examples] == [[float(1 + i % 5)] for i in range(6)]
        assert [e.target for e in examples] == [float(1 + i % 5) for i in range(6)]
        preds = tmp_path / f"{name}.preds.jsonl"
        preds.write_text("".join(json.dumps({"idx": i, "prediction": 1 + i % 5 + 0.1 * (i % 2)}) + "\n"
                                 for i in range(6)))
        assert eval_main(["--data", str(path), "--predictions", str(preds)]) == 0
        assert f"{name} (n=6)" in capsys.readouterr().out
    flask = tmp_path / "flask_eval.json"
    flask.write_text(json.dumps(flask_rows()))
    examples = load_prometheus(flask)
    assert examples[0].grades == [1.0, 2.0, 3.0] and examples[0].meta["human_score"] == [3, 3, 4]


def _mirror(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    (src / "feedback_bench.json").write_text("".join(json.dumps(r) + "\n" for r in feedback_bench_hub_rows()))
    (src / "flask_eval.json").write_text(json.dumps(flask_rows()))
    (src / "vicuna_eval.json").write_text(json.dumps(flask_rows(4)))
    (src / "mt_bench_eval.json").write_text(json.dumps(flask_rows(5)))
    return src


def test_download_from_a_file_url(tmp_path, capsys):
    src, out = _mirror(tmp_path), tmp_path / "data"
    assert cli.main(["data", "download", "benchmarks", str(out), "--mirror", src.as_uri()]) == 0
    printed = capsys.readouterr().out
    assert "flask_eval.json: 6 rows" in printed and "mt_bench_eval.json: 5 rows" in printed
    assert sorted(p.name for p in out.iterdir()) == ["feedback_bench.json", "flask_eval.json", "mt_bench_eval.json",
                                                     "vicuna_eval.json"]
    # kept unless --force
    (src / "flask_eval.json").write_text(json.dumps(flask_rows(3)))
    assert cli.main(["data", "download", "flask", str(out), "--mirror", src.as_uri()]) == 0
    assert "exists (kept" in capsys.readouterr().out and len(load_prometheus(out / "flask_eval.json")) == 6
    assert cli.main(["data", "download", "flask", str(out), "--mirror", src.as_uri(), "--force"]) == 0
    assert len(load_prometheus(out / "flask_eval.json")) == 3


def test_without_a_network_it_says_so(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    assert cli.main(["data", "download", "feedback-collection", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "no network" in err and "huggingface.co/datasets/prometheus-eval/Feedback-Collection" in err
    assert "--mirror" in err and not list((tmp_path / "d").iterdir())  # no partial file left behind
    # a missing file at the mirror is reported the same way, naming the URL
    assert cli.main(["data", "download", "vicuna", str(tmp_path / "e"), "--mirror", (tmp_path / "x").as_uri()]) == 2
    assert "vicuna_eval.json" in capsys.readouterr().err


def test_unknown_names_and_the_list(capsys):
    assert cli.main(["data", "download", "alpaca", "somewhere"]) == 2
    assert "unknown dataset 'alpaca'" in capsys.readouterr().err
    assert cli.main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("feedback-collection", "feedback-bench", "flask", "vicuna", "mt-bench", "paper"):
        assert name in listed
