"""Correlation metrics for judges and the paper-style report table.

A judge is scored by how well its predictions correlate with the ground truth:
Pearson r, Spearman rho and Kendall tau (tau-b) from ``scipy.stats``, reported
x100 per benchmark and averaged over benchmarks, as in the REAL paper.

Degenerate input never raises: fewer than 2 usable pairs, or a constant
prediction or target vector, gives NaN coefficients and a ``warnings.warn``.
Missing predictions (``None`` or NaN, e.g. a generation whose score could not
be parsed) are **dropped with a warning** giving the count; ``n`` is the number
of pairs actually used and ``dropped`` the number left out.  Targets must all be
finite (they come from data, so a NaN there is a bug and raises ``ValueError``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

METRICS = ("pearson", "spearman", "kendall")
METRIC_LABELS = {"pearson": "Pearson", "spearman": "Spearman", "kendall": "Kendall"}
_FOOTER_NAMES = {"pearson": "Pearson r", "spearman": "Spearman rho", "kendall": "Kendall tau"}
MIN_PAIRS = 2


def json_safe(value):
    """``value`` as JSON can hold it: NaN and infinities become None, inside dicts, lists and tuples too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def prediction_report(predictions: Sequence[float], targets: Sequence[float]) -> Dict[str, Any]:
    """Correlations, MSE and the spread of the predictions; warnings (e.g. a constant prediction) go in
    ``note`` instead of to stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: Dict[str, Any] = dict(correlations(predictions, targets))
    out.update(mse=float(np.mean([(p - t) ** 2 for p, t in zip(predictions, targets)])),
               prediction_mean=float(np.mean(predictions)), prediction_std=float(np.std(predictions)))
    if caught:
        out["note"] = "; ".join(str(w.message) for w in caught)
    return out


def _nan_result(n: int, dropped: int) -> Dict[str, float]:
    return {"pearson": math.nan, "spearman": math.nan, "kendall": math.nan, "n": n, "dropped": dropped}


def _as_float(value, what: str, index: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"{what}[{index}] is a boolean, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}[{index}] is not a number: {value!r}") from None


def correlations(predictions: Sequence, targets: Sequence) -> Dict[str, float]:
    """``{"pearson", "spearman", "kendall", "n", "dropped"}`` of predictions against targets.

    Coefficients are floats in [-1, 1] (not x100) or NaN for degenerate input.
    """
    from scipy import stats

    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets):
        raise ValueError(f"predictions and targets differ in length: {len(predictions)} vs {len(targets)}")
    pred = np.array([_as_float(p, "predictions", i) for i, p in enumerate(predictions)], dtype=np.float64)
    true = np.array([_as_float(t, "targets", i) for i, t in enumerate(targets)], dtype=np.float64)
    if not np.isfinite(true).all():
        bad = int(np.flatnonzero(~np.isfinite(true))[0])
        raise ValueError(f"targets must be finite; targets[{bad}] = {targets[bad]!r}")
    keep = np.isfinite(pred)
    dropped = int((~keep).sum())
    if dropped:
        warnings.warn(f"correlations: dropped {dropped} of {len(pred)} predictions that are None, NaN or infinite",
                      stacklevel=2)
    pred, true = pred[keep], true[keep]
    n = int(len(pred))
    if n < MIN_PAIRS:
        warnings.warn(f"correlations: {n} usable pair(s), need at least {MIN_PAIRS}; returning NaN", stacklevel=2)
        return _nan_result(n, dropped)
    constant = [name for name, v in (("predictions", pred), ("targets", true)) if np.ptp(v) == 0]
    if constant:
        warnings.warn(f"correlations: {' and '.join(constant)} constant over {n} pairs; correlation undefined, "
                      "returning NaN", stacklevel=2)
        return _nan_result(n, dropped)
    return {
        "pearson": float(stats.pearsonr(pred, true)[0]),
        "spearman": float(stats.spearmanr(pred, true)[0]),
        "kendall": float(stats.kendalltau(pred, true)[0]),
        "n": n,
        "dropped": dropped,
    }


def average_correlations(results: Iterable[Mapping]) -> Dict[str, float]:
    """Mean of each coefficient over several results (NaN if any is NaN), ``n`` summed."""
    results = list(results)
    if not results:
        raise ValueError("average_correlations needs at least one result")
    out = {m: float(np.mean([r[m] for r in results])) for m in METRICS}
    out["n"] = int(sum(r.get("n", 0) for r in results))
    out["dropped"] = int(sum(r.get("dropped", 0) for r in results))
    return out


def with_average(per_benchmark: Mapping[str, Mapping]) -> Dict[str, Mapping]:
    """``per_benchmark`` plus an ``"Average"`` entry (only when there are 2+ benchmarks)."""
    out = dict(per_benchmark)
    if len(per_benchmark) > 1:
        out["Average"] = average_correlations(per_benchmark.values())
    return out


def _cell(value: float) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def format_table(rows: Mapping[str, Mapping[str, Mapping]], metrics: Sequence[str] = METRICS,
                 title: Optional[str] = None) -> str:
    """The paper's table: one line per method, per benchmark its coefficients x100, then the average.

    ``rows`` maps method name -> benchmark name -> correlations dict.  An
    ``"Average"`` column is added when a method has 2+ benchmarks (an existing
    ``"Average"`` entry is recomputed, not trusted).  ``n`` per benchmark is
    shown in the header (the first method's count, with a ``*`` where methods
    used different counts, e.g. after dropped predictions).
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics}")
    if not rows:
        raise ValueError("format_table needs at least one method")
    table = {method: with_average({b: r for b, r in benches.items() if b != "Average"})
             for method, benches in rows.items()}
    columns: List[str] = []
    for benches in table.values():
        columns += [b for b in benches if b not in columns and b != "Average"]
    if any("Average" in benches for benches in table.values()):
        columns.append("Average")

    labels = [METRIC_LABELS[m] for m in metrics]
    first = next(iter(table.values()))

    def group_label(name: str) -> str:
        if name == "Average":
            return name
        counts = {benches[name].get("n") for benches in table.values() if name in benches}
        n = first.get(name, {}).get("n")
        return name if n is None else f"{name} (n={n}{'*' if len(counts) > 1 else ''})"

    # Per column group: cells wide enough for the metric labels and the group label.
    group_labels = [group_label(c) for c in columns]
    base_w = max(len(label) for label in labels)
    cell_ws = [max(base_w, -(-(len(g) + 1) // len(metrics)) - 1) for g in group_labels]
    group_ws = [len(metrics) * (w + 1) - 1 for w in cell_ws]

    method_w = max(len("method"), *(len(m) for m in table))
    lines = []
    if title:
        lines.append(title)
    lines.append((" " * method_w + " | " + " | ".join(g.center(w) for g, w in zip(group_labels, group_ws))).rstrip())
    lines.append("method".ljust(method_w) + " | " + " | ".join(
        " ".join(label.rjust(w) for label in labels) for w in cell_ws))
    lines.append("-" * len(lines[-1]))
    for method, benches in table.items():
        cells = []
        for column, w in zip(columns, cell_ws):
            result = benches.get(column)
            cells.append(" ".join((_cell(result[m]) if result else "-").rjust(w) for m in metrics))
        lines.append((method.ljust(method_w) + " | " + " | ".join(cells)).rstrip())
    lines.append("(" + ", ".join(_FOOTER_NAMES[m] for m in metrics) + " x100"
                 + ("; n*: methods used different numbers of rows, e.g. dropped predictions"
                    if any(g.endswith("*)") for g in group_labels) else "") + ")")
    return "\n".join(lines)
