"""benchmarks/gpu_suite.sh without a GPU: its syntax, its usage error, and its control flow (per-step time
limits, a step that hangs, the budget handed to the presets, the summary, --pack) with a stand-in for
python that runs no benchmark."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# Answers the script's three kinds of python call: the peer probe (stdin), the machine line (-c), the steps (-m).
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
    -) cat >/dev/null; echo "" ;;
    -c) echo "torch stub cuda False" ;;
    -m)
        echo "ran $*"
        case "$2" in
            benchmarks.gpu_check) mkdir -p "$4"; echo "## GPU check stub" >"$4/gpu_check.md" ;;
            benchmarks.fit_32b) exec sleep 60 ;;
        esac ;;
esac
"""


def _run(args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(REPO))


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_usage_error_without_an_output_folder():
    for args in ([], ["--pack"], ["a", "b"], ["--bogus", "out"]):
        proc = _run(args)
        assert proc.returncode == 2, args
        assert "usage: bash benchmarks/gpu_suite.sh [--pack] OUT_DIR" in proc.stderr
    assert "OUT_DIR is required" in _run([]).stderr
    help_ = _run(["--help"])
    assert help_.returncode == 0 and "usage:" in help_.stderr


def test_steps_run_under_limits_a_hung_step_is_cut_and_pack_keeps_two_files(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PYTHON": str(fake), "GPU_SUITE_SECONDS": "8", "GPU_SUITE_CAPS": "1 2 1 1", "GPU_SUITE_MIN_STEP": "1"}
    proc = _run(["--pack", str(out)], env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # fit_32b timed out
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "results.tar.gz"]
    summary = (out / "SUMMARY.md").read_text()
    assert "| gpu_check | ok | 0 |" in summary
    assert "| fit_32b | TIMED-OUT | 124 |" in summary
    assert "## GPU check stub" in summary  # the steps' markdown is gathered into the summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"./SUMMARY.md", "./steps.tsv", "./logs/gpu_check.log", "./gpu_check/gpu_check.md"} <= names
        preset_log = tar.extractfile("./logs/gpu-32b.log").read().decode() if "./logs/gpu-32b.log" in names else ""
    # the presets ran (or were skipped for lack of time) with a --budget, never the placeholder
    if preset_log:
        assert "--preset gpu-32b" in preset_log and "--budget 10" in preset_log and "@BUDGET@" not in preset_log
    else:
        assert "| gpu-32b | skipped |" in summary
    elapsed_limit = 8 + 5 + 3  # total, timeout's kill-after, slack
    assert "done in" in proc.stdout and int(proc.stdout.split("done in ")[1].split("s")[0]) <= elapsed_limit
