"""The README's "Reproducing the paper" commands, in order, on the CPU with ``--model tiny``: a newcomer's path.

1. ``real data download paper DIR`` from a local mirror laid out as the Hub and GitHub lay the files out;
2. the TRACT warm-up from ``configs/paper/qwen3-8b-tract.yaml``;
3. REAL from ``configs/paper/qwen3-8b-real.yaml``, started from the warm-up's last checkpoint;
4. ``real eval`` of the REAL checkpoint on the four benchmarks (``--data DIR``), the paper's table, in the
   checkpoint's score phrase.

Only what a tiny CPU run needs is overridden (model, paths, step counts, batch sizes, lengths); everything else
is the presets' released settings, the released score phrase among them.
"""
import json
from pathlib import Path

import pytest

from real import cli
from real.judge.prompts import format_rubric, render_prompt

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "paper"
HUB = "huggingface.co/datasets/prometheus-eval"
GITHUB = "raw.githubusercontent.com/prometheus-eval/prometheus-eval/main/eval/benchmark/data"
RUBRIC = format_rubric("Is the answer correct?", ["wrong", "weak", "partial", "good", "perfect"])


def _prompt(i: int) -> str:
    return render_prompt(f"What is {i} + {i}?", str(2 * i + i % 3), RUBRIC, reference_answer=str(2 * i))


def _collection_rows(n: int):
    rows = []
    for i in range(n):
        score = 1 + i % 5
        feedback = f"The answer to {i} + {i} is {'right' if score > 3 else 'off'}. So the overall score is {score}."
        rows.append({"instruction": _prompt(i), "output": f"Feedback: {feedback} [RESULT] {score}",
                     "orig_feedback": feedback, "orig_score": str(score)})
    return rows


def _benchmark_rows(n: int):
    return [{"instruction": _prompt(100 + i), "gpt4_score": [1 + i % 5, 1 + (i + 1) % 5, 3],
             "gpt4_feedback": ["a", "b", "c"]} for i in range(n)]


def hub_layout_mirror(root: Path) -> Path:
    """The paper's files where the Hub and GitHub publish them, under ``root/HOST/PATH``."""
    collection = root / HUB / "Feedback-Collection/resolve/main/new_feedback_collection.json"
    collection.parent.mkdir(parents=True)
    collection.write_text(json.dumps(_collection_rows(8)))
    github = root / GITHUB
    github.mkdir(parents=True)
    bench = [{"instruction": r["instruction"], "gpt4_feedback": r["output"], "gpt4_score": int(r["orig_score"])}
             for r in _collection_rows(4)]
    (github / "feedback_collection_ood_test.json").write_text(json.dumps(bench))  # Feedback Bench's GitHub copy
    for name in ("flask_eval.json", "vicuna_eval.json", "mt_bench_eval.json"):
        (github / name).write_text(json.dumps(_benchmark_rows(4)))
    return root


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_readme_reproduction_commands_run_in_order(tmp_path, capsys):
    mirror, data, runs = hub_layout_mirror(tmp_path / "mirror"), tmp_path / "data", tmp_path / "runs"

    # 1. data
    assert cli.main(["data", "download", "paper", str(data), "--mirror", str(mirror)]) == 0
    assert {p.name for p in data.iterdir()} >= {"feedback_collection.json", "feedback_bench.json", "flask_eval.json",
                                               "vicuna_eval.json", "mt_bench_eval.json"}
    tiny = ["--model", "tiny", "--device", "cpu", "--no-progress", "--no-gradient-checkpointing",
            "--data", str(data / "feedback_collection.json"), "--eval-data", str(data / "feedback_bench.json"),
            "--eval-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8", "--max-cot-tokens", "48"]

    # 2. warm-up
    warm_up = runs / "qwen3-8b-tract"
    assert cli.main(["train", "--config", str(PRESETS / "qwen3-8b-tract.yaml"), *tiny, "--steps", "2",
                     "--save-every", "2", "--eval-every", "0", "--output-dir", str(warm_up)]) == 0
    assert (warm_up / "checkpoint-2").is_dir()

    # 3. REAL, from the warm-up's last checkpoint
    real_run = runs / "qwen3-8b-real"
    assert cli.main(["train", "--config", str(PRESETS / "qwen3-8b-real.yaml"), *tiny, "--steps", "1",
                     "--group-size", "2", "--save-every", "1", "--eval-every", "0", "--output-dir", str(real_run),
                     "--init-from", str(warm_up / "checkpoint-2")]) == 0
    assert (real_run / "checkpoint-1").is_dir()
    records = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("type") == "train" and r.get("method") == "real" for r in records)
    capsys.readouterr()

    # 4. the paper's table from the REAL checkpoint, on the four benchmarks
    table = tmp_path / "results.json"
    assert cli.main(["eval", "--model", str(real_run / "checkpoint-1"), "--data", str(data), "--max-new-tokens",
                     "8", "--limit", "4", "--batch-size", "4", "--device", "cpu", "--methods", "rail-sampled",
                     "rail-greedy", "--output", str(table)]) == 0
    printed, said = capsys.readouterr()
    # the score phrase the checkpoint was trained with (the preset's), without being told
    assert "--score-phrase released (the checkpoint's train_config.json)" in said
    results = json.loads(table.read_text())["results"]
    assert set(results) == {"rail-sampled", "rail-greedy"}
    assert set(results["rail-sampled"]) == {"feedback_bench", "flask_eval", "vicuna_eval", "mt_bench_eval", "Average"}
    assert "feedback_bench (n=4)" in printed and "Average" in printed
