"""`real eval` end to end: the GPT-4 leave-one-out baseline on the shipped files, predictions files, a model."""
import importlib.util
import json

import numpy as np
import pytest
from scipy import stats

from real import cli
from real.judge.evaluate import main

from tests.data_paths import MT_BENCH, VICUNA, needs_shipped

pytestmark = needs_shipped


def grades(path):
    return np.array([row["gpt4_score"] for row in json.loads(path.read_text())], dtype=float)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def noisy_predictions(path, seed):
    targets = grades(path).mean(axis=1)
    return targets + np.random.default_rng(seed).normal(scale=0.8, size=len(targets)), targets


def test_gpt4_loo_baseline_on_shipped_files(tmp_path, capsys):
    out = tmp_path / "loo.json"
    assert main(["--data", str(VICUNA), str(MT_BENCH), "--baseline", "gpt4-loo", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gpt4-loo" in printed and "vicuna_eval (n=320)" in printed and "Average" in printed

    report = json.loads(out.read_text())
    assert report["mode"] == "baseline:gpt4-loo"
    results = report["results"]["gpt4-loo"]
    assert list(results) == ["vicuna_eval", "mt_bench_eval", "Average"]
    for name, path in (("vicuna_eval", VICUNA), ("mt_bench_eval", MT_BENCH)):
        g = grades(path)
        # independent statement of the baseline: hold out grade j, predict it by the mean of the others
        folds = [(np.delete(g, j, axis=1).mean(axis=1), g[:, j]) for j in range(3)]
        expected = {
            "pearson": np.mean([stats.pearsonr(p, t)[0] for p, t in folds]),
            "spearman": np.mean([stats.spearmanr(p, t)[0] for p, t in folds]),
            "kendall": np.mean([stats.kendalltau(p, t)[0] for p, t in folds]),
        }
        for metric, value in expected.items():
            assert results[name][metric] == pytest.approx(value, abs=1e-12)
            assert 0.5 < results[name][metric] < 1.0  # GPT-4 agrees with itself well, not perfectly
        assert results[name]["n"] == 320
        row = next(line for line in printed.splitlines() if line.startswith("gpt4-loo"))
        assert f"{100 * results[name]['pearson']:.1f}" in row
    for metric in ("pearson", "spearman", "kendall"):
        assert results["Average"][metric] == pytest.approx(
            (results["vicuna_eval"][metric] + results["mt_bench_eval"][metric]) / 2)


def test_predictions_file_with_sources(tmp_path, capsys):
    rows, expected = [], {}
    for seed, path in enumerate((VICUNA, MT_BENCH)):
        predictions, targets = noisy_predictions(path, seed)
        rows += [{"source": path.stem, "idx": i, "prediction": float(p)} for i, p in enumerate(predictions)]
        expected[path.stem] = stats.pearsonr(predictions, targets)[0]
    preds = write_jsonl(tmp_path / "preds.jsonl", rows)
    out = tmp_path / "table.json"
    assert main(["--data", str(VICUNA), str(MT_BENCH), "--predictions", preds, "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]["predictions"]
    for name, pearson in expected.items():
        assert results[name]["pearson"] == pytest.approx(pearson, abs=1e-12)
        assert results[name]["n"] == 320
    assert "predictions" in capsys.readouterr().out


def test_one_predictions_file_per_data_file_and_methods(tmp_path):
    files = []
    for seed, path in enumerate((VICUNA, MT_BENCH)):
        predictions, _ = noisy_predictions(path, seed)
        rows = [{"idx": i, "prediction": float(p), "method": "noisy"} for i, p in enumerate(predictions)]
        rows += [{"idx": i, "prediction": float(-p), "method": "flipped"} for i, p in enumerate(predictions)]
        files.append(write_jsonl(tmp_path / f"{path.stem}.preds.jsonl", rows))
    out = tmp_path / "t.json"
    assert main(["--data", str(VICUNA), str(MT_BENCH), "--predictions", *files, "--output", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"noisy", "flipped"}
    assert results["flipped"]["Average"]["pearson"] == pytest.approx(-results["noisy"]["Average"]["pearson"])


def test_null_predictions_are_dropped_and_limit_applies(tmp_path):
    predictions, targets = noisy_predictions(VICUNA, 3)
    rows = [{"idx": i, "prediction": None if i % 10 == 0 else float(p)} for i, p in enumerate(predictions)]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.json"
    with pytest.warns(UserWarning, match="dropped 5 of 50"):
        assert main(["--data", str(VICUNA), "--predictions", preds, "--limit", "50", "--output", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["predictions"]["vicuna_eval"]
    assert result["n"] == 45 and result["dropped"] == 5
    keep = [i for i in range(50) if i % 10]
    assert result["pearson"] == pytest.approx(stats.pearsonr(predictions[keep], targets[keep])[0], abs=1e-12)
    assert "Average" not in json.loads(out.read_text())["results"]["predictions"]


@pytest.mark.parametrize("rows,extra,match", [
    ([{"idx": 0, "prediction": 3}], [], "miss 319 of 320 rows of vicuna_eval"),
    ([{"idx": 0, "prediction": 3}, {"idx": 0, "prediction": 4}], [], "duplicate prediction"),
    ([{"idx": 0, "prediction": 3}], [str(MT_BENCH)], "missing 'source'"),
    ([{"idx": 0, "prediction": 3, "source": "flask"}], [], "unknown source 'flask'"),
    ([{"idx": -1, "prediction": 3}], [], "'idx' must be a row position"),
    ([{"idx": 0, "prediction": "4"}], [], "'prediction' must be a number or null"),
    ([{"prediction": 3}], [], "missing field 'idx'"),
])
def test_bad_predictions_give_a_clear_error(tmp_path, capsys, rows, extra, match):
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    assert main(["--data", str(VICUNA), *extra, "--predictions", preds]) == 2
    assert match in capsys.readouterr().err


def test_paired_predictions_file_must_not_name_another_source(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", [{"idx": 0, "prediction": 3, "source": "mt_bench_eval"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"idx": 0, "prediction": 3}])
    assert main(["--data", str(VICUNA), str(MT_BENCH), "--predictions", first, second]) == 2
    assert "paired with 'vicuna_eval'" in capsys.readouterr().err
    assert main(["--data", str(VICUNA), "--predictions", first, second]) == 2
    assert "one per data file" in capsys.readouterr().err


def test_bad_data_and_arguments(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing.json"), "--baseline", "gpt4-loo"]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["--data", str(VICUNA), str(VICUNA), "--baseline", "gpt4-loo"]) == 2
    assert "distinct stems" in capsys.readouterr().err
    assert main(["--data", str(VICUNA), "--baseline", "gpt4-loo", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"instruction": "p", "output": "Feedback: x [RESULT] 3"}) + "\n")
    assert main(["--data", str(single), "--baseline", "gpt4-loo"]) == 2
    assert "needs the same number (>= 2) of grades" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--data", str(VICUNA)])  # no source of predictions
    assert info.value.code == 2


def test_help_and_cli_routing(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--data", "--predictions", "--baseline", "--model", "--output", "--limit",
                 "--n-samples", "--max-new-tokens", "--batch-size", "--device"):
        assert flag in help_text
    assert cli.main(["eval", "--data", str(VICUNA), "--baseline", "gpt4-loo", "--limit", "40"]) == 0
    assert "vicuna_eval (n=40)" in capsys.readouterr().out


HAVE_INFERENCE = importlib.util.find_spec("real.judge.inference") is not None


def short_benchmark(path, n_rows=3):
    """A benchmark file of short prompts (same template), so a CPU model run stays quick."""
    from real.judge.prompts import format_rubric, render_prompt
    rubric = format_rubric("Is the answer correct?", ["wrong", "mostly wrong", "half right", "mostly right", "right"])
    rows = [{"idx": i, "instruction": render_prompt(f"What is {i} + 1?", str(i + i % 2), rubric, str(i + 1)),
             "gpt4_score": [1 + i % 5, 2 + i % 4, 1 + i % 3], "gpt4_feedback": ["a", "b", "c"]}
            for i in range(n_rows)]
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.skipif(not HAVE_INFERENCE, reason="real.judge.inference (RAIL / decoding) is not in this tree yet")
def test_model_tiny_runs_rail_and_decoding(tmp_path):
    data = [short_benchmark(tmp_path / "short_a.json"), short_benchmark(tmp_path / "short_b.json")]
    out, saved = tmp_path / "t.json", tmp_path / "preds.jsonl"
    argv = ["--data", *data, "--model", "tiny", "--max-new-tokens", "3", "--batch-size", "3", "--device", "cpu",
            "--normalize", "--output", str(out), "--save-predictions", str(saved)]
    # a random model does not write "[RESULT] N" within 3 tokens: decoding has no usable rows
    with pytest.warns(UserWarning, match="decode on short_"):
        assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["rail-greedy"]["short_a"]["n"] == 3 and results["decode"]["short_a"]["dropped"] == 3
    # the paper's protocol: RAIL on sampled CoTs and greedy, decoding with both unparsable rules
    # and the released validation's decoded score: never unparsable, 0 unless a digit ends it
    assert set(results) == {"rail-sampled", "rail-greedy", "decode", "decode [unparsable=0]", "decode-released"}
    assert results["decode [unparsable=0]"]["short_a"]["unparsable"] == 3
    assert results["decode-released"]["short_a"]["unparsable"] == 0
    assert set(results["rail-sampled"]) == {"short_a", "short_b", "Average"}
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3  # methods x benchmarks x rows
    assert all(r["prediction"] in {float(d) for d in range(10)} for r in rows if r["method"] == "decode-released")
    rail = [r["prediction"] for r in rows if r["method"].startswith("rail")]
    # --normalize: the expected score is a convex combination of 1..5
    assert all(1.0 - 1e-5 <= p <= 5.0 + 1e-5 for p in rail)
    assert all(r["prediction"] is None or 1 <= r["prediction"] <= 5 for r in rows if r["method"] == "decode")
    # the saved file scores again through --predictions, with the same numbers
    again = tmp_path / "again.json"
    with pytest.warns(UserWarning, match="decode on short_"):
        assert main(["--data", *data, "--predictions", str(saved), "--output", str(again)]) == 0
    assert json.loads(again.read_text())["results"] == results


def test_unparsable_predictions_are_reported_both_ways_and_counted(tmp_path, capsys):
    """The released evaluation scores an unparsable output 0; both rules are reported, with
    the count of unparsable rows always shown."""
    predictions, targets = noisy_predictions(VICUNA, 3)
    rows = [{"idx": i, "prediction": None if i % 10 == 0 else float(p)} for i, p in enumerate(predictions[:50])]
    preds = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "t.json"
    with pytest.warns(UserWarning, match="dropped 5 of 50"):
        assert main(["--data", str(VICUNA), "--predictions", preds, "--limit", "50", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predictions [unparsable=0]" in printed and "unparsable predictions: predictions 5 of 50" in printed
    results = json.loads(out.read_text())["results"]
    zeroed = np.where(np.arange(50) % 10 == 0, 0.0, predictions[:50])
    assert results["predictions [unparsable=0]"]["vicuna_eval"]["pearson"] == pytest.approx(
        stats.pearsonr(zeroed, targets[:50])[0], abs=1e-12)
    assert results["predictions [unparsable=0]"]["vicuna_eval"]["unparsable"] == 5
    # the released rule alone
    assert main(["--data", str(VICUNA), "--predictions", preds, "--limit", "50", "--unparsable", "zero",
                 "--output", str(out)]) == 0
    assert set(json.loads(out.read_text())["results"]) == {"predictions"}
    assert json.loads(out.read_text())["results"]["predictions"]["vicuna_eval"]["n"] == 50
    # no unparsable rows: one line, and the count still shown
    write_jsonl(tmp_path / "q.jsonl", [{"idx": i, "prediction": float(p)} for i, p in enumerate(predictions[:50])])
    assert main(["--data", str(VICUNA), "--predictions", str(tmp_path / "q.jsonl"), "--limit", "50"]) == 0
    printed = capsys.readouterr().out
    assert "[unparsable=0]" not in printed and "unparsable predictions: predictions 0 of 50" in printed


@pytest.mark.skipif(not HAVE_INFERENCE, reason="real.judge.inference (RAIL / decoding) is not in this tree yet")
def test_model_eval_follows_the_paper_protocol(tmp_path, capsys, monkeypatch):
    """--data DIR stands for the four benchmarks, RAIL averages n sampled CoTs (temperature
    1.0, top-p 0.9), greedy RAIL too, the paper's table, and a caution line for a random model."""
    import real.judge.inference as inference

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("feedback_bench", "flask_eval", "vicuna_eval", "mt_bench_eval"):
        short_benchmark(folder / f"{name}.json")
    calls = []
    original = inference.predict_rail

    def recording(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("n_samples", "greedy", "temperature", "top_p")})
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_rail", recording)
    out = tmp_path / "t.json"
    assert main(["--data", str(folder), "--model", "tiny", "--methods", "rail-sampled", "rail-greedy",
                 "--n-samples", "2", "--max-new-tokens", "2", "--batch-size", "4", "--device", "cpu",
                 "--output", str(out)]) == 0
    assert calls == [dict(n_samples=2, greedy=False, temperature=1.0, top_p=0.9),
                     dict(n_samples=None, greedy=True, temperature=None, top_p=None)]
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    order = [header.index(name) for name in ("feedback_bench", "flask_eval", "vicuna_eval", "mt_bench_eval",
                                             "Average")]
    assert order == sorted(order)  # the paper's column order, then the average
    assert "Pearson Spearman  Kendall" in printed and "caution: --model tiny is a random, untrained model" in printed
    assert set(json.loads(out.read_text())["results"]) == {"rail-sampled", "rail-greedy"}
