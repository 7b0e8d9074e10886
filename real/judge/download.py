"""``real data``: fetch the paper's training set and benchmarks from where they are published.

``real data download NAME DIR`` writes the files of ``NAME`` (one dataset, ``benchmarks`` or ``paper``)
into ``DIR`` under fixed names, so that the paper presets (``configs/paper/*.yaml``) find them:

==================  ==========================  ==============================================================
name                file in DIR                 what the source repositories hold (tried in this order)
==================  ==========================  ==============================================================
feedback-collection feedback_collection.json    Hub dataset prometheus-eval/Feedback-Collection:
                                                ``new_feedback_collection.json`` (JSON, ~1 GB)
feedback-bench      feedback_bench.json         Hub dataset prometheus-eval/Feedback-Bench: parquet only
                                                (``data/train-00000-of-00001-*.parquet`` on main, the Hub's
                                                own conversion ``default/train/0000.parquet``), converted
                                                to JSON lines; else prometheus-eval's GitHub copy
                                                ``feedback_collection_ood_test.json``
flask               flask_eval.json             github.com/prometheus-eval/prometheus-eval, eval/benchmark/data
vicuna              vicuna_eval.json            the same folder
mt-bench            mt_bench_eval.json          the same folder
==================  ==========================  ==============================================================

Files already in ``DIR`` are kept (``--force`` fetches them again); each file is written under a
temporary name and renamed once complete, then read back with ``real.judge.data`` (its row count is printed).
Parquet needs ``pyarrow`` (``pip install 'real-kernels[data]'``).

**Mirrors.**  ``--mirror URL`` (or the environment variable ``REAL_DATA_MIRROR``) replaces every source
host by ``URL/HOST``: the Hub file ``https://huggingface.co/datasets/prometheus-eval/Feedback-Bench/
resolve/main/data/x.parquet`` is looked for at ``URL/huggingface.co/datasets/prometheus-eval/
Feedback-Bench/resolve/main/data/x.parquet`` (the layout ``wget -x`` writes), and a GitHub file under
``URL/raw.githubusercontent.com/...``.  A folder that an earlier download filled (``URL/FILE``) works
too.  ``file://`` URLs and plain folder paths are accepted.  When every place fails, the error lists
each URL tried and what it answered (HTTP status, no such file, no network), and exits 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from real.judge.data import load_prometheus

MIRROR_ENV = "REAL_DATA_MIRROR"
_HUB = "https://huggingface.co/datasets/prometheus-eval/{repo}/resolve/{rev}/{path}"
_GITHUB = "https://raw.githubusercontent.com/prometheus-eval/prometheus-eval/main/eval/benchmark/data/{}"
_CONVERTED = "refs%2Fconvert%2Fparquet"  # the Hub's parquet conversion branch, URL-quoted as the Hub serves it


@dataclass(frozen=True)
class Dataset:
    name: str
    file: str  # the name it gets in DIR (always JSON / JSON lines, what real.judge.data reads)
    urls: Tuple[str, ...]  # where it is published, tried in order; a .parquet URL is converted
    what: str


DATASETS: Dict[str, Dataset] = {d.name: d for d in (
    Dataset("feedback-collection", "feedback_collection.json",
            (_HUB.format(repo="Feedback-Collection", rev="main", path="new_feedback_collection.json"),),
            "the training set: ~100k rows, one GPT-4 grade (orig_score) and feedback per row"),
    Dataset("feedback-bench", "feedback_bench.json",
            (_HUB.format(repo="Feedback-Bench", rev="main", path="data/train-00000-of-00001-eddf1add30d20be1.parquet"),
             _HUB.format(repo="Feedback-Bench", rev=_CONVERTED, path="default/train/0000.parquet"),
             _GITHUB.format("feedback_collection_ood_test.json")),
            "Feedback Bench (in-domain benchmark): 1,000 rows, one GPT-4 grade per row"),
    Dataset("flask", "flask_eval.json", (_GITHUB.format("flask_eval.json"),),
            "FLASK: rows with three GPT-4 grades (and human grades)"),
    Dataset("vicuna", "vicuna_eval.json", (_GITHUB.format("vicuna_eval.json"),),
            "Vicuna Bench: 320 rows, three GPT-4 grades each"),
    Dataset("mt-bench", "mt_bench_eval.json", (_GITHUB.format("mt_bench_eval.json"),),
            "MT Bench: 320 rows, three GPT-4 grades each"),
)}
GROUPS = {"benchmarks": ["feedback-bench", "flask", "vicuna", "mt-bench"],
          "paper": ["feedback-collection", "feedback-bench", "flask", "vicuna", "mt-bench"]}


class DownloadError(RuntimeError):
    """No place answered with the file; the message lists every URL tried and what it answered."""

    def __init__(self, dataset: str, answers: List[Tuple[str, str]], offline: bool):
        self.answers, self.offline = answers, offline
        lines = "\n".join(f"  {url}: {answer}" for url, answer in answers)
        hint = ("no source could be reached (no network?): run `real data download` on a machine that has one and "
                "copy the folder here, or pass --mirror URL / set " + MIRROR_ENV if offline else
                "the sources answered but none holds the file (moved or renamed upstream?): fetch it by hand into "
                "DIR under the name above, or pass --mirror URL")
        super().__init__(f"{dataset}: tried\n{lines}\n{hint}")


# Kept for callers that caught the old name.
NoNetwork = DownloadError


def resolve(name: str) -> List[Dataset]:
    if name in GROUPS:
        return [DATASETS[n] for n in GROUPS[name]]
    if name in DATASETS:
        return [DATASETS[name]]
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(list(DATASETS) + list(GROUPS))}")


def _mirror_base(mirror: str) -> str:
    """A folder path or a URL, as a URL without a trailing slash."""
    if "://" not in mirror:
        return Path(mirror).resolve().as_uri()
    return mirror.rstrip("/")


def candidate_urls(dataset: Dataset, mirror: Optional[str]) -> List[str]:
    """Where ``dataset`` is looked for: its sources, or under a mirror each source's ``HOST/PATH`` and then
    ``FILE`` (a copy of a download folder)."""
    if not mirror:
        return list(dataset.urls)
    base = _mirror_base(mirror)
    out = []
    for url in dataset.urls:
        parts = urllib.parse.urlsplit(url)
        out.append(f"{base}/{parts.netloc}{parts.path}")
    out.append(f"{base}/{dataset.file}")
    return out


def _answer(exc: BaseException) -> Tuple[str, bool]:
    """What a failed request answered, and whether it looks like no network at all (a name that does not
    resolve, a refused or timed-out connection, an unreachable network)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}", False
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, FileNotFoundError):
        return "no such file", False
    offline = isinstance(reason, (socket.gaierror, socket.timeout, ConnectionError, TimeoutError)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))
    if isinstance(exc, urllib.error.URLError) and isinstance(reason, str) and "Name or service" in reason:
        offline = True
    return f"{type(reason).__name__}: {reason}", offline


def _fetch(url: str, target: str, timeout: float) -> None:
    """``url`` into ``target`` through a temporary file (nothing partial is left behind)."""
    folder = os.path.dirname(target) or "."
    fd, partial = tempfile.mkstemp(prefix=".download-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the Hub's parquet files needs pyarrow: pip install 'real-kernels[data]' "
                          "(or pip install pyarrow)") from None
    return pq


def parquet_to_json_lines(parquet_path: str, target: str) -> int:
    """The rows of a parquet file as JSON lines (what ``real.judge.data`` reads); returns the row count."""
    rows = _pyarrow_parquet().read_table(parquet_path).to_pylist()
    folder = os.path.dirname(target) or "."
    fd, partial = tempfile.mkstemp(prefix=".convert-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return len(rows)


def fetch_dataset(dataset: Dataset, target: str, *, mirror: Optional[str] = None, timeout: float = 60.0,
                  log=print) -> str:
    """Try ``dataset``'s places in order; the first that answers is written to ``target``.  Returns its URL."""
    answers: List[Tuple[str, str]] = []
    offline = True
    for url in candidate_urls(dataset, mirror):
        parquet = urllib.parse.urlsplit(url).path.endswith(".parquet")
        if parquet:
            _pyarrow_parquet()  # say so before downloading anything
        log(f"{dataset.name}: fetching {url}")
        fetched = target + ".parquet" if parquet else target
        try:
            _fetch(url, fetched, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            answer, no_network = _answer(exc)
            answers.append((url, answer))
            offline = offline and no_network
            log(f"{dataset.name}: {url}: {answer}")
            continue
        if parquet:
            try:
                parquet_to_json_lines(fetched, target)
            except Exception as exc:  # pyarrow.ArrowInvalid and friends: not a parquet file after all
                answers.append((url, f"not a readable parquet file ({type(exc).__name__}: {exc})"))
                offline = False
                continue
            finally:
                os.remove(fetched)
        return url
    raise DownloadError(dataset.name, answers, offline)


def download(name: str, folder: str, *, mirror: Optional[str] = None, force: bool = False,
             timeout: float = 60.0, log=print) -> List[str]:
    """Fetch ``name``'s files into ``folder``; returns their paths.  Raises DownloadError naming each URL tried.

    ``mirror`` defaults to the environment variable ``REAL_DATA_MIRROR``."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    datasets = resolve(name)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for dataset in datasets:
        target = os.path.join(folder, dataset.file)
        if os.path.exists(target) and not force:
            log(f"{dataset.name}: {target} exists (kept; --force fetches it again)")
        else:
            fetch_dataset(dataset, target, mirror=mirror, timeout=timeout, log=log)
        rows = len(load_prometheus(target))
        log(f"{dataset.name}: {target}: {rows} rows ({dataset.what})")
        paths.append(target)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="real data", description="Fetch the REAL paper's training set and "
                                     "benchmarks (Feedback-Collection, Feedback Bench, FLASK, Vicuna Bench, MT "
                                     "Bench) from the Hugging Face Hub and prometheus-eval's GitHub repository.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="download NAME into DIR")
    get.add_argument("name", help="one of: " + ", ".join(list(DATASETS) + list(GROUPS)))
    get.add_argument("dir", help="folder to write the files into (created if missing)")
    get.add_argument("--mirror", metavar="URL", help="look for each source file at URL/HOST/PATH (the Hub's "
                     "URL/huggingface.co/datasets/.../resolve/main/...), then at URL/FILE; a folder or file:// "
                     f"works (default: ${MIRROR_ENV})")
    get.add_argument("--force", action="store_true", help="fetch files that are already in DIR again")
    get.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a source")
    sub.add_parser("list", help="list the datasets and where they come from")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "list":
        for d in DATASETS.values():
            print(f"{d.name:<20} {d.file:<26} {d.what}")
            for url in d.urls:
                print(f"{'':<20} {url}")
        for group, names in GROUPS.items():
            print(f"{group:<20} {', '.join(names)}")
        return 0
    try:
        download(args.name, args.dir, mirror=args.mirror, force=args.force, timeout=args.timeout)
    except DownloadError as exc:
        print(f"real data: {'no network' if exc.offline else 'not found'}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"real data: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
