"""real demo: the README's main command, end to end in its --quick form (numbers meaningless, plumbing real)."""
import json
import math

import pytest
import torch

from real.cpu_demo.run import ROWS, build_parser, format_table, main


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quick_demo_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for _, label in ROWS:
        assert label in printed
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["table"]) == {key for key, _ in ROWS}
    for key, row in summary["table"].items():
        assert row["n"] == 16, key
        for metric in ("pearson", "spearman", "kendall"):
            value = row[metric]
            assert value is None or -1.0 <= value <= 1.0, (key, metric, value)
        assert math.isfinite(row["mse"])
    assert summary["timings_s"]["total"] > 0 and summary["seed"] == 0
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for phase in ("warmup_cot", "warmup", "real", "grpo", "raft", "tract"):
        assert (out / phase / "metrics.jsonl").is_file(), phase
    # the REAL run started from the warm-up's weights, not from scratch
    config = json.loads((out / "real" / "train_config.json").read_text())
    assert config["init_from"].endswith("warmup/checkpoint-4") and config["method"] == "real"
    raft = json.loads((out / "raft" / "train_config.json").read_text())
    assert raft["init_from"] == config["init_from"] and raft["method"] == "raft"
    assert "expected about" in printed  # the time estimate comes first
    assert printed.index("expected about") < printed.index("warm-up stage 1 (TRACT, learn the CoT): done")


def test_help_and_table_format(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "--seed" in text and "--rl-steps" in text
    table = format_table({"untrained": {"pearson": 0.1234, "spearman": None, "kendall": float("nan"), "mse": 2.0},
                          "real": {"pearson": 0.9, "spearman": 0.8, "kendall": 0.7, "mse": 0.25}})
    assert "12.3" in table and "n/a" in table and "90.0" in table and "0.250" in table


def test_seeds_report_writes_one_table_over_seeds_and_the_figures(tmp_path, capsys):
    out, report = tmp_path / "demo", tmp_path / "report"
    assert main(["--quick", "--seeds", "0", "1", "--output-dir", str(out), "--report", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "| row | seed 0 | seed 1 |" in text and "Mean ± std over 2 seed(s)" in text
    assert "commit " in text and "--seeds 0 1" in text
    for _, label in ROWS:
        assert label in text
    for seed in (0, 1):
        summary = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert summary["seed"] == seed
        assert f"{100 * summary['table']['real']['pearson']:.1f}" in text  # each seed's number, as it ran
    png = (report / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_stage_estimate_and_progress_count(tmp_path):
    from real.cpu_demo.run import DEFAULTS, phase_configs
    from real.cpu_demo.stages import estimate_seconds, packed_seconds, stage_seconds, steps_done

    assert packed_seconds([5.0, 3.0, 2.0, 1.0], 2) == 6.0 and packed_seconds([5.0, 3.0], 1) == 8.0
    phases = phase_configs(dict(DEFAULTS), str(tmp_path), 0)
    warmups = [p for p in phases if p[0].startswith("warmup")]
    branches = sorted((p for p in phases if not p[0].startswith("warmup")), key=lambda p: -stage_seconds(p[1]))
    total = estimate_seconds(warmups, branches, 2)
    assert 3 * 60 < total < 8 * 60, total  # the defaults are sized for the 8-minute budget on 2 cores
    assert estimate_seconds(warmups, branches, 1) > total
    run = tmp_path / "run"
    assert steps_done(str(run)) == 0  # not started yet
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n{"type": "eval", "step": 1}\n'
                                       '{"type": "train", "step": 2}\n')
    assert steps_done(str(run)) == 2


def test_warm_up_goes_on_until_the_cot_is_learned(tmp_path, capsys):
    """Stage 1 is extended (resumed, 100 steps at a time, capped by --max-cot-steps) while its reference-CoT
    cross-entropy says the CoT is not learned; stage 2 then starts from the last stage-1 checkpoint."""
    out = tmp_path / "demo"
    assert main(["--quick", "--max-cot-steps", "12", "--no-plot", "--no-raft", "--no-control",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the CoT is not learned after 8 steps" in printed and "4 more steps" in printed
    assert "warning: the CoT was not learned in 12 steps" in printed
    steps = [json.loads(line)["step"] for line in (out / "warmup_cot" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == list(range(1, 13))  # resumed, not restarted
    config = json.loads((out / "warmup" / "train_config.json").read_text())
    assert config["init_from"].endswith("warmup_cot/checkpoint-12")
    summary = json.loads((out / "results.json").read_text())
    assert summary["timings_s"]["warmup_cot"] > 0
