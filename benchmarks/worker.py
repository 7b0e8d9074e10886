"""Run benchmark cases in fresh Python processes, one per provider, and stream their results back.

On the CPU, peak memory is read from the process's resident set, so each
provider gets a process of its own: its imports, compiled graphs and
allocator caches never count against another provider.  A ``ProviderWorker``
keeps that process alive across cases, so the runner can interleave providers
(all providers at one N, then the next N): on a shared machine whose load
drifts, providers compared in one table row are then measured minutes apart
at most, not a whole sweep apart.

Protocol: the parent writes one case as JSON per line on the child's stdin;
the child (``python -m benchmarks.worker``) answers one ``RESULT {json}`` line
per case.  If the child dies (the out-of-memory killer, a segfault) or a case
runs past its timeout, that case is reported as ``oom`` / ``error`` /
``timeout`` and the next case starts a new child.
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
from typing import Optional

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


class ProviderWorker:
    """One child process that measures cases on request; restarted after a crash or a timeout."""

    def __init__(self, timeout_s: float = 3600.0):
        self.timeout_s = timeout_s
        self._proc: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr_path = ""

    def _start(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".stderr", delete=False) as err:
            self._stderr_path = err.name
        with open(self._stderr_path, "w") as err_file:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err_file, text=True, env=_child_env(), cwd=str(REPO_ROOT),
            )
        self._lines = queue.Queue()
        proc, lines = self._proc, self._lines

        def pump():
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    lines.put(line[len(RESULT_PREFIX):])
            lines.put(None)  # end of stream: the child exited

        threading.Thread(target=pump, daemon=True).start()

    def run(self, case: Case) -> Result:
        if self._proc is None:
            self._start()
        try:
            self._proc.stdin.write(json.dumps(case.to_dict()) + "\n")
            self._proc.stdin.flush()
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self._proc.kill()
            self._finish()
            return Result(case, "timeout", f"no result after {self.timeout_s:.0f} s")
        except BrokenPipeError:
            line = None
        if line is None:
            returncode = self._proc.wait()
            result = _death_result(case, returncode, self._stderr_path)
            self._finish()
            return result
        return Result.from_dict(json.loads(line))

    def _finish(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._stderr_path:
            try:
                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = ""

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            self._finish()


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        result = run_case(Case.from_dict(json.loads(line)))
        sys.stdout.write(RESULT_PREFIX + json.dumps(result.to_dict()) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
