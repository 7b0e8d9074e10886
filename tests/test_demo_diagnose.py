"""real.cpu_demo.diagnose: the verdict bookkeeping on hand-made CoTs, and the command on a checkpoint it trains."""
import pytest

from real.cpu_demo.diagnose import main, read_cot, verdict_stats
from real.judge.synthetic import make_examples, render_feedback

pytestmark = pytest.mark.usefixtures("one_thread")


class _Example:
    def __init__(self, key, answers):
        self.meta = {"key": key, "answers": answers}


def test_verdict_rates_by_kind_of_answer_and_arithmetic():
    ex = _Example(key=[3, 5, 7, 1], answers=[3, 6, 2, 1])  # right, near miss, far miss, right
    cot = "Feedback: yes 2 yes 3 no 2 yes 3 [RESULT] 3"  # the near miss marked yes, as the sloppy annotator does
    assert read_cot(cot) == ([True, True, False, True], [2, 3, 2, 3])
    stats = verdict_stats([ex], [cot])
    assert stats["right_yes"] == 1.0 and stats["near_miss_no"] == 0.0 and stats["far_no"] == 1.0
    assert stats["arithmetic_errors"] == 0.0 and stats["finals"].tolist() == [3.0]
    wrong_sum = "Feedback: yes 2 no 1 no 1 yes 5 [RESULT] 5"  # right verdicts, one bad increment (1 -> 5)
    stats = verdict_stats([ex], [wrong_sum])
    assert stats["near_miss_no"] == 1.0 and stats["arithmetic_errors"] == 0.25


def test_reference_cots_of_the_task_read_back_as_written():
    for ex in make_examples(20, seed=3):
        verdicts, scores = read_cot("Feedback: " + ex.meta["worked_cot"])
        assert [v == (k == a) for v, k, a in zip(verdicts, ex.meta["key"], ex.meta["answers"])] == [True] * 6
        assert "Feedback: " + render_feedback(verdicts) == "Feedback: " + ex.meta["worked_cot"] and len(scores) == 6


def test_command_on_a_trained_checkpoint(tmp_path, capsys):
    from real.loop.train_cli import main as train_main

    out = tmp_path / "run"
    assert train_main(["--method", "tract", "--model", "tiny", "--data", "synthetic", "--steps", "1",
                       "--synthetic-train-size", "16", "--synthetic-eval-size", "8", "--prompts-per-step", "4",
                       "--output-dir", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main([str(out / "checkpoint-1"), "--eval-size", "8", "--signal", "--prompts", "2",
                 "--group-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "near miss->no" in printed and "head slope" in printed
    assert "real_no_norm" in printed and "prediction term" in printed
    assert main([str(tmp_path / "missing")]) == 2
