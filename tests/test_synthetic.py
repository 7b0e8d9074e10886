"""real.judge.synthetic: deterministic, order-dependent (CoT-friendly), noisy continuous labels, flawed reference CoTs."""
import statistics

import pytest

from real.judge.metrics import correlations
from real.judge.prompts import SCORE_MARKER, format_cot
from real.judge.synthetic import (
    SyntheticTask,
    expected_target,
    is_near_miss,
    make_examples,
    make_splits,
    render_feedback,
    running_scores,
    sloppy_target,
)


def _fields(examples):
    return [(e.prompt, e.target, e.grades, e.feedback) for e in examples]


def test_same_seed_same_examples_and_disjoint_splits():
    a = make_examples(50, seed=3)
    assert _fields(a) == _fields(make_examples(50, seed=3))
    assert [e.prompt for e in make_examples(50, seed=4)] != [e.prompt for e in a]
    train, held_out = make_splits(50, 50, seed=3)
    assert _fields(train) == _fields(a)
    assert [e.prompt for e in held_out] != [e.prompt for e in train]


def test_running_score_is_clipped_so_order_matters():
    assert running_scores([True, False, True, False]) == [2, 1, 2, 1]
    assert running_scores([False, False, True, True]) == [1, 1, 2, 3]  # same count, different grade
    assert running_scores([True] * 6) == [2, 3, 4, 5, 5, 5]
    assert render_feedback([True, False, True]) == "yes 2 no 1 yes 2"


def test_labels_are_noisy_means_of_three_grades():
    examples = make_examples(400, seed=0)
    for e in examples:
        assert len(e.grades) == 3 and all(g in (1, 2, 3, 4, 5) for g in e.grades)
        assert e.target == pytest.approx(sum(e.grades) / 3)
        assert e.meta["source"] == "synthetic"
    assert sum(1 for e in examples if e.target != int(e.target)) > 100  # continuous, not integers
    assert sum(1 for e in examples if len(set(e.grades)) > 1) > 150  # the graders disagree often
    for score in (1, 2, 3, 4, 5):
        assert sum(1 for e in examples if e.meta["true_score"] == score) > 15


def test_the_worked_cot_carries_what_the_count_cannot():
    examples = make_examples(2000, seed=1)
    for e in examples[:100]:
        verdicts = [k == a for k, a in zip(e.meta["key"], e.meta["answers"])]
        assert e.meta["worked_cot"] == render_feedback(verdicts)
        assert e.meta["worked_cot"].split()[-1] == str(e.meta["true_score"])  # the grade is the last running score
    targets = [e.target for e in examples]
    rule = correlations([e.meta["true_score"] for e in examples], targets)["pearson"]
    count = correlations([e.meta["n_correct"] for e in examples], targets)["pearson"]
    assert rule > 0.88 and rule - count > 0.08  # the order of right and wrong answers matters


def test_reference_cots_over_score_near_misses():
    task = SyntheticTask()
    near_yes = near = 0
    for e in make_examples(600, seed=2, task=task):
        words = e.feedback[0].split()[0::2]
        for k, a, w in zip(e.meta["key"], e.meta["answers"], words):
            if k == a:
                assert w == "yes"
            elif is_near_miss(k, a):
                near += 1
                near_yes += w == "yes"
            else:
                assert w == "no"
    assert near > 300
    assert abs(near_yes / near - task.sloppy_prob) < 0.06
    held_out = make_examples(1000, seed=5, task=task)
    targets = [e.target for e in held_out]
    best = correlations([expected_target(e, task) for e in held_out], targets)["pearson"]
    imitation = correlations([sloppy_target(e, task) for e in held_out], targets)["pearson"]
    assert best > 0.88 and best - imitation > 0.2  # imitating the reference CoTs is clearly worse


def test_expected_target_matches_the_label_mean():
    task = SyntheticTask()
    examples = make_examples(4000, seed=7, task=task)
    by_score = {}
    for e in examples:
        by_score.setdefault(e.meta["true_score"], []).append(e)
    for score, group in by_score.items():
        empirical = statistics.fmean(e.target for e in group)
        predicted = statistics.fmean(expected_target(e, task) for e in group)
        assert empirical == pytest.approx(predicted, abs=0.06), score
    targets = [e.target for e in examples]
    assert statistics.fmean(targets) == pytest.approx(statistics.fmean(expected_target(e, task) for e in examples),
                                                      abs=0.03)


def test_cot_tokens_sit_at_fixed_distances_for_the_tiny_tokenizer():
    from real.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    for e in make_examples(20, seed=0):
        pieces = [tok.decode([i]) for i in tok(e.prompt)["input_ids"]]
        digits = [i for i, p in enumerate(pieces) if p.isdigit()]
        assert len(digits) == 12 and [b - a for a, b in zip(digits, digits[1:])] == [1, 2] * 5 + [1]
        cot_pieces = [tok.decode([i]) for i in tok(format_cot(e.feedback[0], round(e.target)))["input_ids"]]
        verdicts = [i for i, p in enumerate(cot_pieces) if p.strip() in ("yes", "no")]
        assert [b - a for a, b in zip(verdicts, verdicts[1:])] == [3] * 5
        assert SCORE_MARKER in cot_pieces


def test_bad_task_settings():
    with pytest.raises(ValueError, match="n_items"):
        SyntheticTask(n_items=0)
    with pytest.raises(ValueError, match="start"):
        SyntheticTask(start=6)
    with pytest.raises(ValueError, match="shift_probs"):
        SyntheticTask(shift_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="sloppy_prob"):
        SyntheticTask(sloppy_prob=1.5)
    with pytest.raises(ValueError, match="n must be"):
        make_examples(-1)
