"""A run's output directory: ``metrics.jsonl``, ``train_config.json``, the STOP file, resume discovery.

``OUTPUT_DIR/metrics.jsonl`` gets one JSON line per training step and per
evaluation; ``OUTPUT_DIR/checkpoint-STEP/`` folders come from
``real.loop.checkpoint``.  Creating ``OUTPUT_DIR/STOP`` asks a running job to stop
after the current step with a checkpoint (it works under any launcher; torchrun
does not pass Ctrl-C on to the ranks); so do Ctrl-C and SIGTERM (what
schedulers and ``timeout`` send), through ``StopOnSignal``.

``metrics.jsonl`` is only appended to while a run goes; a resume that drops the
lines of steps it will redo rewrites it atomically (temporary file, then
``os.replace``), and a torn last line (the process was killed while writing it)
is dropped with a warning.

Under torchrun rank 0 alone reads and writes the folder; the other ranks get
its verdicts (the checkpoint to resume from, an error, a stop request) through
``real.multi_gpu.distributed``, so several nodes need the folder on a shared filesystem.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any, Callable, Dict, List, Optional

from real.loop import checkpoint as ckpt
from real.model.checkpoint_files import CONFIG_FILE
from real.multi_gpu import distributed as dist_utils
from real.judge.metrics import json_safe
from real.loop.resume import latest_intact_checkpoint

METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"  # create OUTPUT_DIR/STOP to stop after the current step with a checkpoint (any launcher)


def read_metrics(path: str, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """The records of the ``metrics.jsonl`` at ``path`` ([] when there is none); a torn last line is dropped with a
    warning, any other bad line is an error naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [(n, line) for n, line in enumerate(fh, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {n} is not JSON ({exc}); fix or remove it") from None
            log(f"warning: {path}: dropped a torn last line (line {n}; the run was killed while writing it)")
    return records


class RunDir:
    """The output directory of one run, seen from one rank (``env``: its ``real.multi_gpu.distributed.DistEnv``)."""

    def __init__(self, path: str, env, log: Callable[[str], None]):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--output-dir {path!r} is a file, not a directory; choose another --output-dir")
        self.path, self.env, self.log = path, env, log
        self.metrics_path = os.path.join(path, METRICS_FILE)
        self.stop_path = os.path.join(path, STOP_FILE)

    def resume_checkpoint(self, resume: bool) -> Optional[str]:
        """The newest intact checkpoint to resume from, falling back past damaged ones (rank 0 decides and says
        so; every rank gets its verdict and reads the files)."""
        if not resume:
            return None
        return self._on_main(lambda: latest_intact_checkpoint(self.path, self.log))

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; every rank gets its result, or raises its error (as a ValueError)."""
        result, error = None, None
        if self.env.is_main:
            try:
                result = fn()
            except (ValueError, OSError) as exc:
                error = exc
        result, error = dist_utils.broadcast_object((result, error), self.env)
        if isinstance(error, ValueError):
            raise error
        if error is not None:
            raise ValueError(f"{type(error).__name__}: {error}")
        return result

    def logged_eval(self, step: int) -> bool:
        """Whether ``metrics.jsonl`` holds an evaluation of ``step`` (collective)."""
        return bool(self._on_main(lambda: any(r.get("type") == "eval" and r.get("step") == step
                                              for r in self._read_metrics())))

    def prepare(self, *, resume: bool, overwrite: bool, resumed_from: Optional[str], step: int) -> None:
        """Rank 0 checks and prepares the directory; every rank gets its verdict (the same exception)."""
        self._on_main(lambda: self._prepare(resume, overwrite, resumed_from, step))

    def _prepare(self, resume: bool, overwrite: bool, resumed_from: Optional[str], step: int) -> None:
        os.makedirs(self.path, exist_ok=True)
        if os.path.exists(self.stop_path):
            os.remove(self.stop_path)
            self.log(f"removed a stale {self.stop_path} (it asks a running job to stop)")
        existing = ckpt.list_checkpoints(self.path)
        if resume:
            if resumed_from is None:
                self.log(f"--resume: no complete checkpoint in {self.path}; starting from step 0")
            else:
                self.log(f"resumed from {resumed_from} (step {step})")
            self.truncate_metrics(step)
            return
        if existing or os.path.exists(self.metrics_path):
            if not overwrite:
                raise ValueError(f"--output-dir {self.path!r} already holds a run "
                                 f"({len(existing)} checkpoint(s), metrics); pass --resume to continue it, "
                                 "--overwrite to start afresh, or choose another --output-dir")
            for _, path in existing:
                shutil.rmtree(path)
            if os.path.exists(self.metrics_path):
                os.remove(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Drop the log lines of steps after ``step`` (they are about to be redone), atomically."""
        if not os.path.exists(self.metrics_path):
            return
        kept = [r for r in self._read_metrics() if r.get("step", 0) <= step]
        _write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def _read_metrics(self) -> List[Dict[str, Any]]:
        return read_metrics(self.metrics_path, self.log)

    def write_config(self, config: Dict[str, Any]) -> None:
        if self.env.is_main:
            _write_atomically(os.path.join(self.path, CONFIG_FILE), json.dumps(config, indent=2))

    def write(self, record: Dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (rank 0; NaN and infinities written as null)."""
        if not self.env.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(record)) + "\n")

    def should_stop(self, requested: bool) -> bool:
        """True on every rank when any rank was asked to stop (Ctrl-C) or rank 0 sees the STOP file
        (collective: all ranks call it after each step)."""
        asked = requested or (self.env.is_main and os.path.exists(self.stop_path))
        return bool(dist_utils.max_over_ranks(int(asked), self.env))

    def clear_stop(self) -> None:
        if self.env.is_main and os.path.exists(self.stop_path):
            os.remove(self.stop_path)


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` all at once: a crash leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Aborted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, without a checkpoint; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """While entered, Ctrl-C (SIGINT) or SIGTERM (what schedulers and ``timeout`` send before killing a job)
    asks the run to stop after the current step with a checkpoint (``requested``; ``signum`` says which); a
    second one aborts at once (``Aborted``).  Under torchrun both reach every rank (torchrun passes SIGTERM on):
    each finishes the step, and the save is collective.  Outside the main thread no signal can reach the run,
    and nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]):
        self.log, self.requested, self.signum, self._previous = log, False, None, {}

    def _handler(self, signum, frame):
        if self.requested:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            raise Aborted(signum)
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"{name}: finishing this step, then saving a checkpoint (Ctrl-C or SIGTERM again aborts without "
                 "saving)")

    def __enter__(self) -> "StopOnSignal":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
