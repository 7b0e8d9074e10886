"""Run benchmark cases in a fresh Python process and stream their results back.

On the CPU, peak memory is read from the process's resident set, so each
provider gets a process of its own: its imports, compiled graphs and
allocator caches never count against another provider.  The parent
(``run_in_subprocess``) sends a list of cases as JSON on stdin; the child
(``python -m benchmarks.worker``) answers one ``RESULT {json}`` line per case
as soon as it is measured.  If the child dies (the out-of-memory killer, a
segfault) or a case runs past its timeout, that case is reported as ``oom`` /
``error`` / ``timeout`` and a new child picks up the remaining cases.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List

from .measure import Case, Result, run_case

RESULT_PREFIX = "RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _stderr_tail(path: str, chars: int = 400) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return " ".join(text[-chars:].split())


def _death_result(case: Case, returncode: int, stderr_path: str) -> Result:
    if returncode in (-signal.SIGKILL, 137):
        return Result(case, "oom", "worker killed by SIGKILL (most likely the out-of-memory killer)")
    return Result(case, "error", f"worker exited with code {returncode}: {_stderr_tail(stderr_path)}"[:300])


def run_in_subprocess(cases: List[Case], timeout_s: float = 3600.0) -> Iterator[Result]:
    """Yield one Result per case, in order, measured in fresh worker processes."""
    remaining = list(cases)
    while remaining:
        with tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False) as err:
            stderr_path = err.name
        try:
            with open(stderr_path, "w") as err_file:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=err_file, text=True, env=_child_env(), cwd=str(REPO_ROOT),
                )
            lines: "queue.Queue[str | None]" = queue.Queue()

            def pump():
                for line in proc.stdout:
                    if line.startswith(RESULT_PREFIX):
                        lines.put(line[len(RESULT_PREFIX):])
                lines.put(None)  # end of stream

            threading.Thread(target=pump, daemon=True).start()
            proc.stdin.write(json.dumps([c.to_dict() for c in remaining]))
            proc.stdin.close()
            while remaining:
                try:
                    line = lines.get(timeout=timeout_s)
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    yield Result(remaining.pop(0), "timeout", f"no result after {timeout_s:.0f} s")
                    break
                if line is None:
                    returncode = proc.wait()
                    yield _death_result(remaining.pop(0), returncode, stderr_path)
                    break
                yield Result.from_dict(json.loads(line))
                remaining.pop(0)
            else:
                proc.wait()
        finally:
            os.unlink(stderr_path)


def main() -> int:
    cases = [Case.from_dict(d) for d in json.loads(sys.stdin.read())]
    for case in cases:
        result = run_case(case)
        sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
