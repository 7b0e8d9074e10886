"""real.judge.metrics: correlations against direct formulas, degenerate input, and the table."""
import math
import warnings

import numpy as np
import pytest

from real.judge.metrics import average_correlations, correlations, format_table, with_average


def _ranks(x):
    # average ranks for ties, written out so the test does not lean on scipy
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = np.asarray(x)[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _kendall_tau_b(x, y):
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))


def test_correlations_match_direct_formulas():
    rng = np.random.default_rng(1)
    targets = rng.integers(1, 6, size=40).astype(float)  # ties, like averaged 1..5 grades
    predictions = targets + rng.normal(scale=1.0, size=40)
    result = correlations(predictions.tolist(), targets.tolist())
    assert result["n"] == 40 and result["dropped"] == 0
    assert result["pearson"] == pytest.approx(np.corrcoef(predictions, targets)[0, 1], abs=1e-12)
    assert result["spearman"] == pytest.approx(np.corrcoef(_ranks(predictions), _ranks(targets))[0, 1], abs=1e-12)
    assert result["kendall"] == pytest.approx(_kendall_tau_b(predictions, targets), abs=1e-12)
    assert all(isinstance(result[k], float) for k in ("pearson", "spearman", "kendall"))


def test_perfect_and_reversed_order():
    up = correlations([1, 2, 3, 4], [2.0, 4.0, 6.0, 9.0])
    assert up["spearman"] == pytest.approx(1.0) and up["kendall"] == pytest.approx(1.0)
    down = correlations([4, 3, 2, 1], [1, 2, 3, 4])
    assert down["pearson"] == pytest.approx(-1.0) and down["kendall"] == pytest.approx(-1.0)


@pytest.mark.parametrize("predictions,targets,match", [
    ([3.0, 3.0, 3.0], [1, 2, 3], "predictions constant"),
    ([1, 2, 3], [4, 4, 4], "targets constant"),
    ([1.0], [2.0], "1 usable pair"),
    ([], [], "0 usable pair"),
])
def test_degenerate_input_gives_nan_with_warning(predictions, targets, match):
    with pytest.warns(UserWarning, match=match):
        result = correlations(predictions, targets)
    assert all(math.isnan(result[k]) for k in ("pearson", "spearman", "kendall"))
    assert result["n"] == len(predictions)


def test_missing_predictions_are_dropped_and_counted():
    with pytest.warns(UserWarning, match="dropped 2 of 6"):
        result = correlations([1, None, 3, float("nan"), 5, 2], [1, 2, 3, 4, 5, 2])
    assert result["n"] == 4 and result["dropped"] == 2
    assert result["pearson"] == pytest.approx(1.0)


def test_all_predictions_missing_is_nan_not_an_exception():
    with pytest.warns(UserWarning):
        result = correlations([None, None, None], [1, 2, 3])
    assert math.isnan(result["pearson"]) and result["n"] == 0 and result["dropped"] == 3


@pytest.mark.parametrize("predictions,targets,match", [
    ([1, 2], [1, 2, 3], "differ in length"),
    ([1, 2, 3], [1, None, 3], "targets must be finite"),
    ([1, 2, 3], [1, float("nan"), 3], "targets must be finite"),
    ([1, "x", 3], [1, 2, 3], r"predictions\[1\]"),
    ([1, True, 3], [1, 2, 3], "boolean"),
])
def test_bad_input_raises(predictions, targets, match):
    with pytest.raises(ValueError, match=match):
        correlations(predictions, targets)


def test_no_scipy_warning_leaks_for_normal_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        correlations([1, 2, 3, 5, 4], [1, 2, 3, 4, 5])


def test_average_and_nan_propagation():
    a = {"pearson": 0.5, "spearman": 0.4, "kendall": 0.3, "n": 10}
    b = {"pearson": 0.7, "spearman": 0.2, "kendall": 0.1, "n": 20}
    avg = average_correlations([a, b])
    assert avg["pearson"] == pytest.approx(0.6) and avg["spearman"] == pytest.approx(0.3) and avg["n"] == 30
    nan = dict(b, pearson=math.nan)
    assert math.isnan(average_correlations([a, nan])["pearson"])
    assert "Average" in with_average({"x": a, "y": b}) and "Average" not in with_average({"x": a})


def test_format_table_shows_x100_and_average():
    a = {"pearson": 0.5, "spearman": 0.4, "kendall": 0.3, "n": 10}
    b = {"pearson": 0.7, "spearman": 0.2, "kendall": math.nan, "n": 20}
    text = format_table({"rail": {"bench_a": a, "bench_b": b}, "decode": {"bench_a": b, "bench_b": a}})
    lines = text.splitlines()
    assert "bench_a (n=10*)" in lines[0] and "bench_b (n=20*)" in lines[0] and "Average" in lines[0]
    assert lines[1].split()[:4] == ["method", "|", "Pearson", "Spearman"]
    rail = next(line for line in lines if line.startswith("rail"))
    assert rail.split("|")[1].split() == ["50.0", "40.0", "30.0"]
    assert rail.split("|")[2].split() == ["70.0", "20.0", "nan"]
    assert rail.split("|")[3].split() == ["60.0", "30.0", "nan"]  # average over benchmarks, NaN propagates
    assert "n*: methods used different numbers of rows" in lines[-1]

    two = format_table({"m": {"only": a}}, metrics=("pearson", "spearman"))
    assert "Average" not in two and "Kendall" not in two
    assert two.splitlines()[2].startswith("-")


def test_format_table_rejects_bad_arguments():
    with pytest.raises(ValueError, match="metrics"):
        format_table({"m": {}}, metrics=("accuracy",))
    with pytest.raises(ValueError, match="at least one method"):
        format_table({})
