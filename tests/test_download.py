"""`real data download` (offline, against local mirrors laid out as the Hub and GitHub lay the files out)
and the published layouts of Feedback Bench and FLASK."""
import functools
import http.server
import json
import shutil
import threading
import urllib.error

import pytest

from real import cli
from real.judge import download
from real.judge.data import load_prometheus
from real.judge.evaluate import main as eval_main
from real.judge.prompts import render_prompt

from data_paths import PROMETHEUS_DATA as SHIPPED_DIR

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


# --- what the repositories hold ---------------------------------------------------------

HUB_BENCH = "huggingface.co/datasets/prometheus-eval/Feedback-Bench/resolve"
GITHUB_DATA = "raw.githubusercontent.com/prometheus-eval/prometheus-eval/main/eval/benchmark/data"


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hub_mirror(root, *, bench_at="main"):
    """A folder laid out as ``wget -x`` would lay out the sources: Feedback Bench as the Hub holds it (parquet
    only: on main, or only in the Hub's parquet conversion), FLASK, Vicuna and MT Bench as GitHub holds them
    (Vicuna and MT Bench are the real files when the shipped copies are there)."""
    rows = feedback_bench_hub_rows(7)
    if bench_at == "main":
        _write_parquet(root / HUB_BENCH / "main/data/train-00000-of-00001-eddf1add30d20be1.parquet", rows)
    elif bench_at == "converted":  # urllib reads refs%2Fconvert%2Fparquet in a file:// URL as three folders
        _write_parquet(root / HUB_BENCH / "refs/convert/parquet/default/train/0000.parquet", rows)
    github = root / GITHUB_DATA
    github.mkdir(parents=True)
    (github / "flask_eval.json").write_text(json.dumps(flask_rows()))
    for name, n in (("vicuna_eval.json", 4), ("mt_bench_eval.json", 5)):
        shipped = SHIPPED_DIR / name
        if shipped.exists():
            shutil.copy(shipped, github / name)
        else:
            (github / name).write_text(json.dumps(flask_rows(n)))
    return root


def test_feedback_bench_comes_from_the_hubs_parquet(tmp_path, capsys, monkeypatch):
    """The Hub holds Feedback Bench as parquet only: it is fetched and converted to JSON lines that real.judge.data
    reads with the right grades; the mirror comes from REAL_DATA_MIRROR.  (Before: it asked for a JSON file
    the repository does not hold and blamed the network.)"""
    mirror = hub_mirror(tmp_path / "mirror")
    monkeypatch.setenv(download.MIRROR_ENV, str(mirror))
    out = tmp_path / "data"
    assert cli.main(["data", "download", "benchmarks", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "feedback_bench.json: 7 rows" in printed and "flask_eval.json: 6 rows" in printed
    assert f"{HUB_BENCH}/main/data/train-00000-of-00001-eddf1add30d20be1.parquet" in printed
    examples = load_prometheus(out / "feedback_bench.json")
    assert [e.grades for e in examples] == [[float(1 + i % 5)] for i in range(7)]
    assert examples[3].prompt == _prompt(3)
    if (SHIPPED_DIR / "vicuna_eval.json").exists():
        assert "vicuna_eval.json: 320 rows" in printed and "mt_bench_eval.json: 320 rows" in printed
    assert sorted(p.name for p in out.iterdir()) == ["feedback_bench.json", "flask_eval.json", "mt_bench_eval.json",
                                                     "vicuna_eval.json"]  # no parquet or partial file left


@pytest.mark.parametrize("bench_at", ["converted", "github"])
def test_feedback_bench_falls_back_to_the_conversion_then_github(tmp_path, capsys, bench_at):
    mirror = hub_mirror(tmp_path / "mirror", bench_at=bench_at)
    if bench_at == "github":
        (mirror / GITHUB_DATA / "feedback_collection_ood_test.json").write_text(json.dumps(feedback_bench_github_rows(5)))
    out = tmp_path / "data"
    assert cli.main(["data", "download", "feedback-bench", str(out), "--mirror", mirror.as_uri()]) == 0
    printed = capsys.readouterr().out
    assert f"feedback_bench.json: {7 if bench_at == 'converted' else 5} rows" in printed
    assert "no such file" in printed  # the places tried before are named with what they answered
    assert [p.name for p in out.iterdir()] == ["feedback_bench.json"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(tmp_path):
    """``hub_mirror`` served over HTTP on localhost."""
    root = hub_mirror(tmp_path / "served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_over_http_and_every_url_named_with_its_answer(tmp_path, capsys, http_mirror):
    root, url = http_mirror
    assert cli.main(["data", "download", "feedback-bench", str(tmp_path / "a"), "--mirror", url]) == 0
    assert "feedback_bench.json: 7 rows" in capsys.readouterr().out
    # the Hub renamed its file: every place is tried and named with the HTTP status it answered
    (root / HUB_BENCH / "main/data/train-00000-of-00001-eddf1add30d20be1.parquet").rename(
        root / HUB_BENCH / "main/data/train-00000-of-00001-0123456789abcdef.parquet")
    assert cli.main(["data", "download", "feedback-bench", str(tmp_path / "b"), "--mirror", url]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "no network" not in err
    for tried in (f"{url}/{HUB_BENCH}/main/data/train-00000-of-00001-eddf1add30d20be1.parquet",
                  f"{url}/{HUB_BENCH}/refs%2Fconvert%2Fparquet/default/train/0000.parquet",
                  f"{url}/{GITHUB_DATA}/feedback_collection_ood_test.json", f"{url}/feedback_bench.json"):
        assert f"{tried}: HTTP 404" in err
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_a_file_that_is_not_parquet_is_named(tmp_path, capsys):
    mirror = hub_mirror(tmp_path / "mirror", bench_at="none")
    bad = mirror / HUB_BENCH / "main/data/train-00000-of-00001-eddf1add30d20be1.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_text("<html>a login page</html>")
    assert cli.main(["data", "download", "feedback-bench", str(tmp_path / "d"), "--mirror", str(mirror)]) == 2
    err = capsys.readouterr().err
    assert f"{bad.as_uri()}: not a readable parquet file" in err


def test_without_pyarrow_the_error_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    mirror = hub_mirror(tmp_path / "mirror")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)  # import fails as if not installed
    assert cli.main(["data", "download", "feedback-bench", str(tmp_path / "d"), "--mirror", str(mirror)]) == 2
    assert "pip install 'real-kernels[data]'" in capsys.readouterr().err
