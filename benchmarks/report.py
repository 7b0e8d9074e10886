"""Results out: a CSV in Liger-Kernel's benchmark layout, a JSON copy, markdown tables.

Liger-Kernel's benchmark CSV has the columns ``kernel_name, kernel_provider,
kernel_operation_mode, metric_name, metric_unit, x_name, x_value, y_value_50,
y_value_20, y_value_80, extra_benchmark_config_str, gpu_name, timestamp,
liger_version``; ours are the same with shorter names (``kernel, provider,
mode, metric, unit, x_name, x_value, p50, p20, p80, config, device,
timestamp, version``) plus ``status`` and ``note``, so that skipped, OOM and
failed cases are rows too, with empty values and the reason.  ``version`` is
the version of the provider's own package.  One row per metric: ``time`` (ms),
``memory`` (MiB, peak above the inputs; one measurement, so p20 = p80 = p50)
and, on CUDA, ``throughput`` (TFLOP/s).
"""
from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .measure import Result
from .shapes import ALL_PROVIDERS
from .workloads import LOGIT_STD, SEQ_LEN, get_op

CSV_FIELDS = (
    "kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80",
    "config", "device", "timestamp", "version", "status", "note",
)
BASELINE = "naive"
MODE_LABELS = {"forward": "forward", "full": "forward+backward"}


def describe_device(device: str) -> str:
    """'NVIDIA H200' on CUDA; 'CPU: <model> (<threads> threads)' otherwise."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def now_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def config_string(result: Result) -> str:
    shape = result.case.shape
    return json.dumps({
        "op": result.case.op, "H": shape.hidden, "V": shape.vocab, "dtype": shape.dtype,
        "seq_len": SEQ_LEN, "logit_std": LOGIT_STD, "warmup": result.case.warmup, "repeats": result.case.repeats,
    }, sort_keys=True)


def _metric_values(result: Result) -> List[Tuple[str, str, Optional[Tuple[float, float, float]]]]:
    metrics = [
        ("time", "ms", result.time_ms),
        ("memory", "MiB", None if result.memory_mb is None else (result.memory_mb,) * 3),
    ]
    if result.case.device == "cuda":
        metrics.append(("throughput", "TFLOP/s", result.tflops()))
    return metrics


def result_rows(results: Sequence[Result], device_name: str, timestamp: str) -> List[Dict[str, object]]:
    """One CSV row per (result, metric)."""
    rows = []
    for result in results:
        op = get_op(result.case.op)
        for metric, unit, values in _metric_values(result):
            p50, p20, p80 = values if values is not None else ("", "", "")
            rows.append({
                "kernel": op.kernel, "provider": result.case.provider, "mode": op.mode,
                "metric": metric, "unit": unit, "x_name": "N", "x_value": result.case.shape.n,
                "p50": p50, "p20": p20, "p80": p80, "config": config_string(result),
                "device": device_name, "timestamp": timestamp, "version": result.version,
                "status": result.status, "note": result.note,
            })
    return rows


def write_csv(rows: Sequence[Dict[str, object]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_json(rows: Sequence[Dict[str, object]], path: Path, meta: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
        f.write("\n")


# ---- markdown ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableKey:
    op: str
    hidden: int
    vocab: int
    dtype: str

    def title(self) -> str:
        op = get_op(self.op)
        return (f"{op.kernel}, {MODE_LABELS[op.mode]} ({self.op}): "
                f"H={self.hidden:,}, V={self.vocab:,}, {self.dtype}")


def group_results(results: Sequence[Result]) -> Dict[TableKey, List[Result]]:
    """Results of one (op, H, V, dtype) sweep together, in first-seen order."""
    groups: Dict[TableKey, List[Result]] = {}
    for r in results:
        s = r.case.shape
        groups.setdefault(TableKey(r.case.op, s.hidden, s.vocab, s.dtype), []).append(r)
    return groups


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    if value is None or base is None or base <= 0:
        return "–"
    return f"{value / base:.2f}x"


def provider_rank(name: str) -> int:
    return ALL_PROVIDERS.index(name) if name in ALL_PROVIDERS else len(ALL_PROVIDERS)


def markdown_table(key: TableKey, results: Sequence[Result]) -> str:
    cuda = any(r.case.device == "cuda" for r in results)
    header = ["N", "provider", "time ms: p50 (p20–p80)", "time vs naive", "peak MiB", "memory vs naive"]
    if cuda:
        header.append("TFLOP/s")
    lines = [f"### {key.title()}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h not in ("provider",) else "---" for h in header) + "|"]
    baselines = {r.case.shape.n: r for r in results if r.case.provider == BASELINE and r.ok}
    shown = [r for r in results if r.status != "skipped"]
    for r in sorted(shown, key=lambda r: (r.case.shape.n, provider_rank(r.case.provider))):
        base = baselines.get(r.case.shape.n)
        if r.ok:
            p50, p20, p80 = r.time_ms
            cells = [f"{_fmt(p50)} ({_fmt(p20)}–{_fmt(p80)})",
                     _ratio(p50, base.time_ms[0] if base else None),
                     "n/a" if r.memory_mb is None else _fmt(r.memory_mb),
                     _ratio(r.memory_mb, base.memory_mb if base else None)]
            if cuda:
                tf = r.tflops()
                cells.append(f"{tf[0]:.0f}" if tf else "")
        else:
            cells = [r.status.upper() if r.status != "error" else "error", "", "", ""] + ([""] if cuda else [])
        lines.append("| " + " | ".join([f"{r.case.shape.n:,}", r.case.provider] + cells) + " |")
    failures = [r for r in shown if r.status in ("error", "timeout", "oom") and r.note]
    if failures:
        lines.append("")
        lines += [f"- {r.case.provider} N={r.case.shape.n:,} {r.status}: {r.note}" for r in failures]
    return "\n".join(lines)


def skipped_summary(results: Sequence[Result]) -> List[str]:
    """One line per skipped provider (and distinct reason)."""
    seen: Dict[Tuple[str, str], None] = {}
    for r in results:
        if r.status == "skipped":
            seen.setdefault((r.case.provider, r.note), None)
    return [f"- {provider}: skipped, {reason}" for provider, reason in seen]


def memory_method(results: Sequence[Result], isolation: str) -> str:
    if any(r.case.device == "cuda" for r in results):
        return "torch.cuda.max_memory_allocated"
    if isolation == "subprocess":
        return "peak RSS, each provider in a fresh process"
    return "peak RSS, all providers in one process"


def markdown_report(results: Sequence[Result], *, title: str, device_name: str, command: str,
                    timestamp: str, isolation: str = "subprocess") -> str:
    versions = {}
    for r in results:
        versions.setdefault(r.case.provider, r.version)
    lines = [
        f"## {title}",
        "",
        f"Device: {device_name}. Measured {timestamp}.",
        f"Command: `{command}`",
        "Time: median (20th–80th percentile) after warm-up. Peak memory: above the inputs "
        f"({memory_method(results, isolation)}). Ratios against `naive` "
        "(materialised logits, log_softmax, gather) at the same N.",
        "",
    ]
    for key, group in group_results(results).items():
        if all(r.status == "skipped" for r in group):
            continue
        lines += [markdown_table(key, group), ""]
    skipped = skipped_summary(results)
    if skipped:
        lines += ["Not measured:"] + skipped + [""]
    lines.append("Versions: " + "; ".join(f"{p}: {v}" for p, v in versions.items() if v))
    return "\n".join(lines) + "\n"
