"""benchmarks/gpu_suite.sh without a GPU: its syntax, its usage errors, its plan (under 8 minutes), and its
control flow with a stand-in for python that runs no benchmark: per-step time limits, a step that hangs, the
budget handed to the presets, SUMMARY.md and the tarball rewritten before, during and after every step (so a
suite killed at the device tool's limit still leaves everything done so far), --steps, and the exit status."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_suite.sh"
USAGE = "usage: bash benchmarks/gpu_suite.sh [--pack] [--steps NAMES] [--plan] OUT_DIR"
DEVICE_LIMIT_S = 480  # the suite's planned time must stay under 8 minutes

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# Answers the script's three kinds of python call: the peer probe (stdin), the machine line (-c), the steps (-m).
# gpu_check writes a partial report, then its final one; fit_32b records what OUT_DIR holds while it runs
# (SNAP_FROM -> SNAP), then hangs; GPU_CHECK_HANGS (a file for its pid) makes gpu_check hang after its
# partial report.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
    -) cat >/dev/null; echo "" ;;
    -c) echo "torch stub cuda False" ;;
    -m)
        echo "ran $*"
        case "$2" in
            benchmarks.gpu_check)
                mkdir -p "$4"
                echo "## GPU check stub, partial" >"$4/gpu_check.md"
                if [ -n "${GPU_CHECK_HANGS:-}" ]; then
                    echo $$ >"$GPU_CHECK_HANGS"
                    exec sleep 60
                fi
                echo "## GPU check stub" >"$4/gpu_check.md" ;;
            benchmarks.fit_32b)
                if [ -n "${SNAP:-}" ]; then
                    cp "$SNAP_FROM/SUMMARY.md" "$SNAP/summary_during_fit.md"
                    tar -tzf "$SNAP_FROM/results.tar.gz" >"$SNAP/tar_during_fit.txt"
                fi
                exec sleep 60 ;;
        esac ;;
esac
"""


def _fake_python(tmp_path: Path) -> Path:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return fake


def _run(args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=str(REPO))


def _start_hanging_suite(tmp_path: Path, out: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "PYTHON": str(_fake_python(tmp_path)), "GPU_CHECK_HANGS": str(tmp_path / "step.pid"),
           "TMPDIR": str(tmp_path), **env}
    return subprocess.Popen(["bash", str(SCRIPT), "--pack", str(out)], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _end(proc: subprocess.Popen, tmp_path: Path) -> None:
    """SIGKILL the suite's process group (as the device tool does at its limit) and the hung step, which
    timeout put in a process group of its own."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    pid_file = tmp_path / "step.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tar_names(path: Path) -> set:
    with tarfile.open(path) as tar:
        return set(tar.getnames())


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_usage_errors_name_what_is_wrong():
    for args in ([], ["--pack"], ["a", "b"], ["--bogus", "out"], ["--steps"]):
        proc = _run(args)
        assert proc.returncode == 2, args
        assert USAGE in proc.stderr
    assert "OUT_DIR is required" in _run([]).stderr
    bad_step = _run(["--steps", "gpu_check,fit_64b", "out"])
    assert bad_step.returncode == 2 and "got 'fit_64b'" in bad_step.stderr
    bad_caps = _run(["--plan", "out"], env={"GPU_SUITE_CAPS": "1 2"})
    assert bad_caps.returncode == 2 and "GPU_SUITE_CAPS needs 4 numbers" in bad_caps.stderr
    help_ = _run(["--help"])
    assert help_.returncode == 0 and "usage:" in help_.stderr


def test_plan_stays_under_eight_minutes_and_lists_every_step(tmp_path):
    proc = _run(["--plan", str(tmp_path / "never")])
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "never").exists()  # --plan runs nothing
    caps = {m[0]: int(m[1]) for m in re.findall(r"^  (\S+): cap (\d+) s: ", proc.stdout, re.M)}
    assert list(caps) == ["gpu_check", "fit_32b", "gpu-32b", "gpu-8b"]
    planned, steps, setup = map(int, re.search(r"planned total: (\d+) s \(steps (\d+) s \+ setup (\d+) s\)",
                                               proc.stdout).groups())
    assert steps == sum(caps.values()) and planned == steps + setup
    assert planned < DEVICE_LIMIT_S
    assert "--budget @BUDGET@" in proc.stdout and "--providers naive,triton,loss,liger,cce" in proc.stdout
    # a rerun of one step plans that step alone
    one = _run(["--plan", "--steps", "fit_32b", str(tmp_path / "never")])
    assert re.findall(r"^  (\S+): cap", one.stdout, re.M) == ["fit_32b"]
    assert f"planned total: {caps['fit_32b'] + setup} s" in one.stdout


def test_summary_and_tarball_are_written_after_every_step_and_a_hung_step_is_cut(tmp_path):
    out, snap = tmp_path / "out", tmp_path / "snap"
    snap.mkdir()
    env = {"PYTHON": str(_fake_python(tmp_path)), "GPU_SUITE_SECONDS": "6", "GPU_SUITE_CAPS": "1 1 1 1",
           "GPU_SUITE_MIN_STEP": "1", "SNAP": str(snap), "SNAP_FROM": str(out), "TMPDIR": str(tmp_path)}
    t0 = time.monotonic()
    proc = _run(["--pack", str(out)], env=env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr  # fit_32b timed out: not everything passed
    # what the device tool would have brought back had the suite been killed while fit_32b ran
    during = (snap / "summary_during_fit.md").read_text()
    assert "| gpu_check | ok | 0 |" in during and "| fit_32b | running |" in during
    assert "| gpu-8b | not run yet |" in during and "## GPU check stub" in during
    assert {"./gpu_check/gpu_check.md", "./logs/gpu_check.log", "./SUMMARY.md"} <= set(
        (snap / "tar_during_fit.txt").read_text().split())
    # and at the end
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "results.tar.gz"]
    summary = (out / "SUMMARY.md").read_text()
    statuses = dict(re.findall(r"^\| (\S+) \| (\S+) \|", summary, re.M)[1:])  # after the header row
    assert list(statuses) == ["gpu_check", "fit_32b", "gpu-32b", "gpu-8b"]
    assert statuses["gpu_check"] == "ok" and statuses["fit_32b"] == "TIMED-OUT"
    assert set(statuses.values()) <= {"ok", "TIMED-OUT", "skipped"}  # a loaded machine may leave a preset no time
    not_ok = sum(status != "ok" for status in statuses.values())
    assert f"complete, {not_ok} step(s) failed, timed out or skipped" in summary.splitlines()[0]
    assert "| gpu_check | ok | 0 |" in summary and "| fit_32b | TIMED-OUT | 124 |" in summary
    names = _tar_names(out / "results.tar.gz")
    assert {"./SUMMARY.md", "./steps.tsv", "./logs/gpu_check.log", "./gpu_check/gpu_check.md"} <= names
    with tarfile.open(out / "results.tar.gz") as tar:
        assert tar.extractfile("./SUMMARY.md").read().decode() == summary
        preset_log = tar.extractfile("./logs/gpu-32b.log").read().decode() if "./logs/gpu-32b.log" in names else ""
    # the presets ran (or were skipped for lack of time) with a --budget, never the placeholder
    if preset_log:
        assert "--preset gpu-32b" in preset_log and "--budget 10" in preset_log and "@BUDGET@" not in preset_log
    else:
        assert "| gpu-32b | skipped |" in summary
    assert elapsed <= 6 + 5 + 6  # steps' total, timeout's kill-after, slack


def test_a_suite_killed_mid_step_leaves_the_step_s_partial_results(tmp_path):
    """The device tool kills the command at its limit: what was packed before stays, the running step's
    partial files included (the tarball is refreshed while a step runs)."""
    out = tmp_path / "out"
    proc = _start_hanging_suite(tmp_path, out, GPU_SUITE_REFRESH="1")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tarball = out / "results.tar.gz"
            if tarball.exists() and "./gpu_check/gpu_check.md" in _tar_names(tarball):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the running step's partial report never reached the tarball")
    finally:
        _end(proc, tmp_path)
    assert "| gpu_check | running |" in (out / "SUMMARY.md").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        assert tar.extractfile("./gpu_check/gpu_check.md").read().decode() == "## GPU check stub, partial\n"


def test_sigterm_records_the_interrupted_step_and_packs(tmp_path):
    out = tmp_path / "out"
    proc = _start_hanging_suite(tmp_path, out)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "step.pid").exists():
            assert time.monotonic() < deadline, "gpu_check never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 130
    finally:
        _end(proc, tmp_path)
    summary = (out / "SUMMARY.md").read_text()
    assert "interrupted after" in summary.splitlines()[0] and "| gpu_check | INTERRUPTED |" in summary
    assert "./gpu_check/gpu_check.md" in _tar_names(out / "results.tar.gz")
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.md", "results.tar.gz"]


def test_steps_reruns_one_step_and_the_exit_status_says_it_passed(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--steps", "gpu_check", str(out)], env={"PYTHON": str(_fake_python(tmp_path))})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "SUMMARY.md").read_text()
    assert "complete, every step passed" in summary.splitlines()[0]
    assert "| gpu_check | ok | 0 |" in summary and "fit_32b" not in summary.split("Elapsed")[0].split("| step |")[1]
    assert (out / "gpu_check" / "gpu_check.md").read_text() == "## GPU check stub\n"
