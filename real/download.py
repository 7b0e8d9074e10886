"""``real data``: fetch the paper's training set and benchmarks in their published layouts.

``real data download NAME DIR`` writes the files of ``NAME`` (one dataset, ``benchmarks`` or ``paper``)
into ``DIR`` under fixed names, so that the paper presets (``configs/paper/*.yaml``) find them:

==================  ==========================  ==============================================
name                file                        source
==================  ==========================  ==============================================
feedback-collection feedback_collection.json    Hugging Face dataset prometheus-eval/Feedback-Collection
feedback-bench      feedback_bench.json         Hugging Face dataset prometheus-eval/Feedback-Bench
flask               flask_eval.json             github.com/prometheus-eval/prometheus-eval (eval/benchmark/data)
vicuna              vicuna_eval.json            the same folder
mt-bench            mt_bench_eval.json          the same folder
==================  ==========================  ==============================================

Files already in ``DIR`` are kept (``--force`` fetches them again); each file is written under a
temporary name and renamed once complete, then read back with ``real.data`` (its row count is printed).
Without a network the command says so and exits 2: run it on a machine that has one and copy ``DIR``,
or point ``--mirror URL`` at a copy (``URL/FILE`` for each file; ``file://`` URLs work).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

_HF = "https://huggingface.co/datasets/prometheus-eval/{}/resolve/main/new_feedback_collection.json"
_GITHUB = "https://raw.githubusercontent.com/prometheus-eval/prometheus-eval/main/eval/benchmark/data/{}"


@dataclass(frozen=True)
class Dataset:
    name: str
    file: str  # the name it gets in DIR
    url: str
    what: str


DATASETS: Dict[str, Dataset] = {d.name: d for d in (
    Dataset("feedback-collection", "feedback_collection.json", _HF.format("Feedback-Collection"),
            "the training set: ~100k rows, one GPT-4 grade (orig_score) and feedback per row"),
    Dataset("feedback-bench", "feedback_bench.json", _HF.format("Feedback-Bench"),
            "Feedback Bench (in-domain benchmark): 1,000 rows, one GPT-4 grade per row"),
    Dataset("flask", "flask_eval.json", _GITHUB.format("flask_eval.json"),
            "FLASK: rows with three GPT-4 grades (and human grades)"),
    Dataset("vicuna", "vicuna_eval.json", _GITHUB.format("vicuna_eval.json"),
            "Vicuna Bench: 320 rows, three GPT-4 grades each"),
    Dataset("mt-bench", "mt_bench_eval.json", _GITHUB.format("mt_bench_eval.json"),
            "MT Bench: 320 rows, three GPT-4 grades each"),
)}
GROUPS = {"benchmarks": ["feedback-bench", "flask", "vicuna", "mt-bench"],
          "paper": ["feedback-collection", "feedback-bench", "flask", "vicuna", "mt-bench"]}


class NoNetwork(RuntimeError):
    """A source could not be reached; the message says what to do instead."""


def resolve(name: str) -> List[Dataset]:
    if name in GROUPS:
        return [DATASETS[n] for n in GROUPS[name]]
    if name in DATASETS:
        return [DATASETS[name]]
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(list(DATASETS) + list(GROUPS))}")


def _fetch(url: str, target: str, timeout: float) -> None:
    folder = os.path.dirname(target) or "."
    fd, partial = tempfile.mkstemp(prefix=".download-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NoNetwork(
            f"cannot fetch {url} ({reason}). This machine may have no network: run `real data download` on one "
            "that has, then copy the folder here, or pass --mirror URL pointing at a copy of the files") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def download(name: str, folder: str, *, mirror: Optional[str] = None, force: bool = False,
             timeout: float = 60.0, log=print) -> List[str]:
    """Fetch ``name``'s files into ``folder``; returns their paths.  Raises NoNetwork when a source is unreachable."""
    from real.data import load_prometheus

    os.makedirs(folder, exist_ok=True)
    paths = []
    for dataset in resolve(name):
        target = os.path.join(folder, dataset.file)
        url = f"{mirror.rstrip('/')}/{dataset.file}" if mirror else dataset.url
        if os.path.exists(target) and not force:
            log(f"{dataset.name}: {target} exists (kept; --force fetches it again)")
        else:
            log(f"{dataset.name}: fetching {url}")
            _fetch(url, target, timeout)
        rows = len(load_prometheus(target))
        log(f"{dataset.name}: {target}: {rows} rows ({dataset.what})")
        paths.append(target)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="real data", description="Fetch the REAL paper's training set and "
                                     "benchmarks (Feedback-Collection, Feedback Bench, FLASK, Vicuna Bench, MT "
                                     "Bench) in their published layouts.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="download NAME into DIR")
    get.add_argument("name", help="one of: " + ", ".join(list(DATASETS) + list(GROUPS)))
    get.add_argument("dir", help="folder to write the files into (created if missing)")
    get.add_argument("--mirror", metavar="URL", help="fetch URL/FILE instead of each file's source (file:// works)")
    get.add_argument("--force", action="store_true", help="fetch files that are already in DIR again")
    get.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a source")
    sub.add_parser("list", help="list the datasets and where they come from")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "list":
        for d in DATASETS.values():
            print(f"{d.name:<20} {d.file:<26} {d.url}\n{'':<20} {d.what}")
        for group, names in GROUPS.items():
            print(f"{group:<20} {', '.join(names)}")
        return 0
    try:
        download(args.name, args.dir, mirror=args.mirror, force=args.force, timeout=args.timeout)
    except (NoNetwork, ValueError, FileNotFoundError) as exc:
        print(f"real data: {'no network' if isinstance(exc, NoNetwork) else 'error'}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
