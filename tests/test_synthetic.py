"""real.synthetic: deterministic, CoT-friendly, noisy continuous labels, flawed reference CoTs."""
import statistics

import pytest

from real.metrics import correlations
from real.prompts import SCORE_MARKER, format_cot
from real.synthetic import (
    SyntheticTask,
    expected_target,
    is_near_miss,
    make_examples,
    make_splits,
    render_feedback,
    sloppy_target,
)


def test_same_seed_same_examples_and_disjoint_splits():
    a = make_examples(50, seed=3)
    b = make_examples(50, seed=3)
    assert [(e.prompt, e.target, e.grades, e.feedback) for e in a] == [(e.prompt, e.target, e.grades, e.feedback)
                                                                      for e in b]
    assert [e.prompt for e in make_examples(50, seed=4)] != [e.prompt for e in a]
    train, held_out = make_splits(50, 50, seed=3)
    assert [e.prompt for e in train] == [e.prompt for e in a]
    assert [e.prompt for e in held_out] != [e.prompt for e in train]


def test_labels_are_noisy_means_of_three_grades():
    examples = make_examples(400, seed=0)
    for e in examples:
        assert len(e.grades) == 3 and all(g in (1, 2, 3, 4, 5) for g in e.grades)
        assert e.target == pytest.approx(sum(e.grades) / 3)
        assert e.meta["source"] == "synthetic"
    fractional = sum(1 for e in examples if e.target != int(e.target))
    assert fractional > 100  # continuous targets, not integers
    # the grades disagree often, yet follow the true score closely
    assert sum(1 for e in examples if len(set(e.grades)) > 1) > 150
    truth = [e.meta["true_score"] for e in examples]
    assert correlations(truth, [e.target for e in examples])["pearson"] > 0.9


def test_worked_cot_spells_out_the_score():
    for e in make_examples(100, seed=1):
        verdicts = [k == a for k, a in zip(e.meta["key"], e.meta["answers"])]
        assert e.meta["worked_cot"] == render_feedback(verdicts)
        assert e.meta["worked_cot"].split()[-1] == str(e.meta["true_score"])  # the last running score
    assert render_feedback([True, False, True, False]) == "yes 2 no 2 yes 3 no 3"


def test_reference_cots_over_count_near_misses():
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
    assert near > 200
    assert abs(near_yes / near - task.sloppy_prob) < 0.08
    # imitating the reference CoTs is measurably worse than the Bayes-optimal prediction
    held_out = make_examples(1000, seed=5, task=task)
    targets = [e.target for e in held_out]
    best = correlations([expected_target(e, task) for e in held_out], targets)["pearson"]
    imitation = correlations([sloppy_target(e, task) for e in held_out], targets)["pearson"]
    assert best > 0.9 and best - imitation > 0.1


def test_expected_target_matches_the_label_mean():
    task = SyntheticTask()
    examples = make_examples(3000, seed=7, task=task)
    by_score = {}
    for e in examples:
        by_score.setdefault(e.meta["true_score"], []).append(e)
    for score, group in by_score.items():
        empirical = statistics.fmean(e.target for e in group)
        assert empirical == pytest.approx(expected_target(group[0], task), abs=0.08)


def test_cot_tokens_sit_at_fixed_distances_for_the_tiny_tokenizer():
    from real.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    for e in make_examples(20, seed=0):
        cot = format_cot(e.feedback[0], round(e.target))
        prompt_ids = tok(e.prompt)["input_ids"]
        cot_ids = tok(cot)["input_ids"]
        pieces = [tok.decode([i]) for i in prompt_ids]
        digits = [i for i, p in enumerate(pieces) if p.isdigit()]
        assert len(digits) == 8 and all(b - a in (1, 2) for a, b in zip(digits, digits[1:]))
        cot_pieces = [tok.decode([i]) for i in cot_ids]
        verdicts = [i for i, p in enumerate(cot_pieces) if p.strip() in ("yes", "no")]
        assert [b - a for a, b in zip(verdicts, verdicts[1:])] == [3, 3, 3]
        assert SCORE_MARKER in cot_pieces


def test_bad_task_settings():
    with pytest.raises(ValueError, match="n_items"):
        SyntheticTask(n_items=5)
    with pytest.raises(ValueError, match="shift_probs"):
        SyntheticTask(shift_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="sloppy_prob"):
        SyntheticTask(sloppy_prob=1.5)
    with pytest.raises(ValueError, match="n must be"):
        make_examples(-1)
