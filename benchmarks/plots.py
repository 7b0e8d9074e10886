"""PNG plots of time and peak memory against N, one figure per (operation, H, V, dtype) sweep.

Left panel: median time with a p20–p80 band; right panel: peak memory above
the inputs.  Log-log axes, one line per provider; failed or skipped points are
left out of the lines (the tables say why).  Uses the non-interactive Agg
backend, so it works on headless machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from .measure import Result
from .report import provider_rank, group_results


def plot_results(results: Sequence[Result], output_dir: Path, stem: str) -> List[Path]:
    """Write one PNG per sweep that has measured points; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, group in group_results(results).items():
        ok = [r for r in group if r.ok]
        if not ok:
            continue
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in sorted({r.case.provider for r in ok}, key=provider_rank):
            points = sorted((r for r in ok if r.case.provider == provider), key=lambda r: r.case.shape.n)
            ns = [r.case.shape.n for r in points]
            line = ax_time.plot(ns, [r.time_ms[0] for r in points], marker="o", label=provider)[0]
            ax_time.fill_between(ns, [r.time_ms[1] for r in points], [r.time_ms[2] for r in points],
                                 color=line.get_color(), alpha=0.2)
            mem = [(r.case.shape.n, r.memory_mb) for r in points if r.memory_mb is not None]
            if mem:
                ax_mem.plot([n for n, _ in mem], [max(m, 1e-3) for _, m in mem], marker="o",
                            color=line.get_color(), label=provider)
        for ax, ylabel in ((ax_time, "time (ms)"), (ax_mem, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (token rows)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(key.title(), fontsize=10)
        fig.tight_layout()
        path = output_dir / f"{stem}_{key.op}_H{key.hidden}_V{key.vocab}_{key.dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
