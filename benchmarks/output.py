"""Write one run's files: CSV, JSON, markdown and plots, under one stem in one folder."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from .measure import Result
from .report import markdown_report, now_stamp, result_rows, write_csv, write_json


def write_outputs(results: Sequence[Result], *, output_dir: Path, stem: str, title: str, device_name: str,
                  command: str, plots: bool = True, isolation: str = "subprocess") -> Dict[str, object]:
    """Returns {"markdown": text, "csv": path, "json": path, "md": path, "plots": [paths]}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timestamp = now_stamp()
    rows = result_rows(results, device_name, timestamp)
    markdown = markdown_report(results, title=title, device_name=device_name, command=command, timestamp=timestamp,
                               isolation=isolation)
    paths = {"csv": output_dir / f"{stem}.csv", "json": output_dir / f"{stem}.json", "md": output_dir / f"{stem}.md"}
    write_csv(rows, paths["csv"])
    write_json(rows, paths["json"], {"title": title, "device": device_name, "command": command, "timestamp": timestamp})
    paths["md"].write_text(markdown)
    plot_paths: List[Path] = []
    if plots:
        from .plots import plot_results

        plot_paths = plot_results(results, output_dir, stem)
    return {"markdown": markdown, **paths, "plots": plot_paths}
