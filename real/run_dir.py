"""A run's output directory: ``metrics.jsonl``, ``train_config.json``, the STOP file, resume discovery.

``OUTPUT_DIR/metrics.jsonl`` gets one JSON line per training step and per
evaluation; ``OUTPUT_DIR/checkpoint-STEP/`` folders come from
``real.checkpoint``.  Creating ``OUTPUT_DIR/STOP`` asks a running job to stop
after the current step with a checkpoint (it works under any launcher; torchrun
does not pass Ctrl-C on to the ranks).

Under torchrun rank 0 alone reads and writes the folder; the other ranks get
its verdicts (the checkpoint to resume from, an error, a stop request) through
``real.distributed``, so several nodes need the folder on a shared filesystem.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from typing import Any, Callable, Dict, Optional

from real import checkpoint as ckpt
from real import distributed as dist_utils
from real.metrics import json_safe

METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"  # create OUTPUT_DIR/STOP to stop after the current step with a checkpoint (any launcher)


class RunDir:
    """The output directory of one run, seen from one rank (``env``: its ``real.distributed.DistEnv``)."""

    def __init__(self, path: str, env, log: Callable[[str], None]):
        self.path, self.env, self.log = path, env, log
        self.metrics_path = os.path.join(path, METRICS_FILE)
        self.stop_path = os.path.join(path, STOP_FILE)

    def resume_checkpoint(self, resume: bool) -> Optional[str]:
        """The newest complete checkpoint to resume from (rank 0 decides; every rank reads its files)."""
        if not resume:
            return None
        return dist_utils.broadcast_object(ckpt.latest_checkpoint(self.path) if self.env.is_main else None, self.env)

    def prepare(self, *, resume: bool, overwrite: bool, resumed_from: Optional[str], step: int) -> None:
        """Rank 0 checks and prepares the directory; every rank gets its verdict (the same exception)."""
        error = None
        if self.env.is_main:
            try:
                self._prepare(resume, overwrite, resumed_from, step)
            except (ValueError, OSError) as exc:
                error = exc
        error = dist_utils.broadcast_object(error, self.env)
        if isinstance(error, ValueError):
            raise error
        if error is not None:
            raise ValueError(f"{type(error).__name__}: {error}")

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
        """Drop the log lines of steps after ``step`` (they are about to be redone)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as fh:
            kept = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.metrics_path, "w", encoding="utf-8") as fh:
            fh.writelines(kept)

    def write_config(self, config: Dict[str, Any]) -> None:
        if self.env.is_main:
            with open(os.path.join(self.path, ckpt.CONFIG_FILE), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2)

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


class CtrlC:
    """While entered, Ctrl-C asks the run to stop after the current step (``requested``); a second Ctrl-C
    aborts at once.  Under torchrun Ctrl-C reaches every rank: each finishes the step, and the save is
    collective.  Outside the main thread Ctrl-C cannot reach the run, and nothing is installed."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.requested, self._previous, self._installed = log, False, None, False

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.log("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again aborts without saving)")

    def __enter__(self) -> "CtrlC":
        try:
            self._previous, self._installed = signal.signal(signal.SIGINT, self._handler), True
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
