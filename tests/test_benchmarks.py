"""Smoke tests of the benchmark suite's machinery on tiny shapes (correctness of what is timed, not timing).

Covers: every provider computes the same log-probs, advantage loss, judge loss
and gradients as naive PyTorch (including the loss-mode provider ``loss``,
and the peers' judge-head composition through a plain-PyTorch stand-in for a
peer's fused cross entropy); the CLI writes the
CSV / JSON / markdown / PNG outputs and reports skipped providers with their
reason; the per-provider worker process measures peak memory that reflects
the materialised logits and is restarted after a timeout; gpu_check fails clearly without CUDA and its shared code
path passes on the CPU.
"""
import csv
import json
import math

import pytest
import torch

from benchmarks import __main__ as bench_cli
from benchmarks import gpu_check
from benchmarks.measure import Case, Result, is_oom, quantiles
from benchmarks.providers import CPU_TRITON_REASON, LossProvider, NaiveProvider, PeerProvider, RealKernelsProvider
from benchmarks.report import CSV_FIELDS
from benchmarks.shapes import PRESETS, QWEN3_VOCAB, Shape
from benchmarks.runner import run_cases
from benchmarks.worker import ProviderWorker, _death_result
from benchmarks.workloads import make_inputs, make_step


pytestmark = pytest.mark.usefixtures("one_thread")


class PlainCrossEntropyPeer(PeerProvider):
    """Stands in for a peer library's fused CE: exercises the peers' judge-head composition."""

    name = "plain-ce"
    module = "torch"
    dist = "torch"

    def cross_entropy(self, hidden, weight, targets):
        return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def _grads(loss, inputs):
    return torch.autograd.grad(loss, (inputs.hidden, inputs.weight))


def _assert_same_loss_and_grads(got_loss, want_loss, inputs):
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-4)
    for want, got in zip(_grads(want_loss, inputs), _grads(got_loss, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("provider", [RealKernelsProvider("torch"), LossProvider(), PlainCrossEntropyPeer()],
                         ids=["torch", "loss", "peer"])
def test_providers_match_naive_on_logprobs_and_judge_head(provider):
    inputs = make_inputs(Shape(n=300, hidden=24, vocab=1000), "cpu", seed=3)
    assert inputs.score_rows.tolist() == [255]  # one full sequence of 256 rows and a partial one
    naive = NaiveProvider()
    args = (inputs.hidden, inputs.weight, inputs.next_tokens)
    torch.testing.assert_close(provider.logprobs(*args), naive.logprobs(*args), rtol=1e-5, atol=1e-5)
    # the fwd+bwd op differentiates advantage_loss; for naive that is autograd through logprobs
    want_adv = naive.advantage_loss(*args, inputs.grad_logprobs)
    assert torch.equal(want_adv, (inputs.grad_logprobs * naive.logprobs(*args)).sum())
    _assert_same_loss_and_grads(provider.advantage_loss(*args, inputs.grad_logprobs), want_adv, inputs)

    _assert_same_loss_and_grads(provider.judge(inputs), naive.judge(inputs), inputs)


def test_loss_provider_chunks_rows_and_runs_every_op():
    """Several judge_loss chunks (the loss_fn's row slices index the advantages), and each timed op runs."""
    from real_kernels import judge_loss

    inputs = make_inputs(Shape(n=300, hidden=16, vocab=200), "cpu", seed=1)
    args = (inputs.hidden, inputs.weight, inputs.next_tokens)
    adv = inputs.grad_logprobs
    seen = []

    def loss_fn(out, rows):
        seen.append(rows)
        return (adv[rows] * out.logprobs).sum()

    loss, _ = judge_loss(*args, loss_fn, chunk_size=128, backend="torch")
    assert [(r.start, r.stop) for r in seen] == [(0, 128), (128, 256), (256, 300)]
    _assert_same_loss_and_grads(loss, NaiveProvider().advantage_loss(*args, adv), inputs)
    for op in ("logprobs-fwd", "logprobs-fwdbwd", "judge-fwdbwd"):
        make_step(LossProvider(), op, inputs)()


def test_judge_inputs_look_like_a_teacher_forced_batch():
    inputs = make_inputs(Shape(n=600, hidden=8, vocab=500), "cpu")
    assert inputs.score_rows.tolist() == [255, 511]
    assert (inputs.cot_targets[inputs.score_rows] == -100).all()
    assert (inputs.cot_targets[~inputs.score_mask] == inputs.next_tokens[~inputs.score_mask]).all()
    k_star = inputs.next_tokens[inputs.score_rows]
    assert torch.equal(k_star, inputs.score_ids[(inputs.score_targets.round().long() - 1)])
    assert make_inputs(Shape(n=10, hidden=8, vocab=500), "cpu").score_rows.tolist() == [9]


def test_cli_writes_csv_json_markdown_plots_and_reports_skipped_providers(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = bench_cli.main([
        "--n", "16,40", "--hidden", "16", "--vocab", "300", "--providers", "naive,torch,triton,liger,loss",
        "--repeats", "3", "--warmup", "0", "--isolation", "inprocess", "--output-dir", str(out_dir), "--no-progress",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(out_dir / "custom.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CSV_FIELDS
    assert len(rows) == 5 * 3 * 2 * 2  # providers x ops x N x metrics (time, memory on the CPU)
    by_status = {}
    for row in rows:
        by_status.setdefault((row["provider"], row["status"]), []).append(row)
    assert {p for p, s in by_status if s == "ok"} == {"naive", "torch", "loss"}
    triton_rows = by_status[("triton", "skipped")]
    assert len(triton_rows) == 12 and all(r["note"] == CPU_TRITON_REASON and r["p50"] == "" for r in triton_rows)
    assert len(by_status[("liger", "skipped")]) == 12  # not installed, or no CPU path
    for row in by_status[("naive", "ok")] + by_status[("torch", "ok")] + by_status[("loss", "ok")]:
        p20, p50, p80 = float(row["p20"]), float(row["p50"]), float(row["p80"])
        assert 0 <= p20 <= p50 <= p80 and math.isfinite(p80)
        assert row["x_name"] == "N" and row["x_value"] in ("16", "40")
        assert json.loads(row["config"])["V"] == 300
    assert {(r["kernel"], r["mode"]) for r in rows} == {
        ("linear_logprobs", "forward"), ("linear_logprobs", "full"), ("judge_head", "full")}

    saved = json.loads((out_dir / "custom.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["command"].startswith("python -m benchmarks")
    markdown = (out_dir / "custom.md").read_text()
    assert markdown in printed
    assert "| 40 | torch |" in markdown and "| 40 | loss |" in markdown and "time vs naive" in markdown
    assert f"triton: skipped, {CPU_TRITON_REASON}" in markdown and "liger: skipped" in markdown
    assert len(list(out_dir.glob("custom_*.png"))) == 3


def test_cli_rejects_bad_flags_naming_them(capsys):
    for argv, flag in ((["--n", "0"], "--n"), (["--providers", "naive,nope"], "--providers"),
                       (["--dtype", "int8"], "--dtype"), (["--ops", "backward"], "--ops")):
        with pytest.raises(SystemExit):
            bench_cli.main(argv + ["--no-progress"])
        assert flag in capsys.readouterr().err


def test_presets_match_the_documented_sweeps():
    cpu = PRESETS["cpu"]
    assert [s.n for s in cpu.shapes()] == [512, 1024, 2048]
    assert (cpu.hidden, cpu.vocab, cpu.dtype) == (512, QWEN3_VOCAB, "float32")
    for name, hidden in (("gpu-8b", 4096), ("gpu-32b", 5120)):
        preset = PRESETS[name]
        assert (preset.hidden, preset.vocab, preset.dtype, max(preset.n_values)) == (
            hidden, QWEN3_VOCAB, "bfloat16", 65536)


def test_worker_processes_measure_peak_memory_and_recover_from_a_timeout():
    shape = Shape(n=512, hidden=32, vocab=32768)  # fp32 logits: 64 MiB; naive also holds log_softmax's 64 MiB
    cases = [Case(p, "logprobs-fwd", shape, "cpu", warmup=1, repeats=1) for p in ("naive", "torch")]
    naive, ours = run_cases(cases, isolation="subprocess", progress=False)  # one process per provider
    assert naive.ok and ours.ok, (naive.note, ours.note)
    logits_mib = shape.n * shape.vocab * 4 / 2**20
    assert naive.memory_mb >= 1.5 * logits_mib
    assert ours.memory_mb < 0.5 * naive.memory_mb

    worker = ProviderWorker(timeout_s=0.01)  # a child cannot even import torch that fast
    tiny_case = Case("naive", "logprobs-fwd", Shape(8, 8, 64), "cpu", warmup=0, repeats=1)
    try:
        assert worker.run(tiny_case).status == "timeout"
        worker.timeout_s = 300
        assert worker.run(tiny_case).ok  # a fresh child takes over
    finally:
        worker.close()


def test_failures_are_classified_not_raised():
    case = Case("naive", "logprobs-fwd", Shape(4, 4, 8))
    assert _death_result(case, -9, "/nonexistent").status == "oom"
    assert _death_result(case, 1, "/nonexistent").status == "error"
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 30.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(ValueError("targets out of range"))
    restored = Result.from_dict(Result(case, "ok", time_ms=(2.0, 1.0, 3.0), memory_mb=1.5).to_dict())
    assert restored.case == case and restored.time_ms == (2.0, 1.0, 3.0)


def test_quantiles():
    assert quantiles([5.0]) == (5.0, 5.0, 5.0)
    p50, p20, p80 = quantiles([float(x) for x in range(1, 12)])  # 1..11
    assert (p50, p20, p80) == (6.0, 3.0, 9.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_gpu_check_without_cuda_exits_2_with_a_clear_message(capsys):
    assert gpu_check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_check_code_path_on_cpu(tmp_path, capsys):
    """Every section of gpu_check on tiny shapes: correctness of judge_head (torch) and judge_loss against the
    reference, the forward/backward timing with its determinism and agreement columns (a row tail at N=44, a
    provider skipped with its reason), and the per-provider timing."""
    rc = gpu_check.main([
        "--device", "cpu", "--backends", "torch,loss", "--n", "40", "--hidden", "24", "--vocab", "300",
        "--row-chunk", "16", "--dtype", "fp32", "--providers", "naive,torch,loss", "--repeats", "1",
        "--split-n", "40,44", "--split-hidden", "24", "--split-providers", "naive,torch,triton,loss",
        "--split-repeats", "2", "--output-dir", str(tmp_path),
    ])
    assert rc == 0
    checks = json.loads((tmp_path / "gpu_check_correctness.json").read_text())
    assert len(checks) == 2 * (7 + 6)  # 2 backends x (outputs + 2 grads per setting; the second has no entropy)
    assert all(c["passed"] for c in checks)
    assert {c["backend"] for c in checks} == {"torch", "loss"}
    assert max(c["rel_err"] for c in checks if c["quantity"].startswith("d ")) < 1e-4
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| 24 | t=0.7 normalize ignore mask | torch | d weight |" in report
    assert "| 24 | t=0.7 normalize ignore mask | loss | d weight |" in report
    assert "### linear_logprobs, forward (logprobs-fwd)" in report
    assert (tmp_path / "gpu_check_timing.csv").exists()

    split = json.loads((tmp_path / "gpu_check_split.json").read_text())
    assert {(r["n"], r["loss"]) for r in split} == {(n, loss) for n in (40, 44) for loss in ("advantage", "judge")}
    assert len(split) == 2 * 2 * 4
    for r in split:
        if r["provider"] == "triton":
            assert r["status"] == "skipped" and r["note"] == CPU_TRITON_REASON
            continue
        assert r["status"] == "ok" and r["deterministic"] is True, r
        assert r["forward_ms"] > 0 and r["backward_ms"] >= 0 and r["total_ms"] > 0 and r["tflops"] > 0
        if r["provider"] == "naive":
            assert r["dh_rel_err"] is None
        else:
            assert r["dh_rel_err"] < 1e-4 and r["dw_rel_err"] < 1e-4
    assert "### Forward and backward timed apart: N=40 and 44, H=24, V=300" in report
    assert "| 44 | judge | loss |" in report


def test_gpu_check_budget_skips_the_rest_and_targets_are_read_off_the_split_rows(tmp_path):
    rc = gpu_check.main([
        "--device", "cpu", "--backends", "torch", "--n", "8", "--hidden", "8", "--vocab", "50",
        "--split-n", "8", "--split-hidden", "8", "--budget", "0", "--output-dir", str(tmp_path),
    ])
    assert rc == 1  # nothing checked is a failure
    assert json.loads((tmp_path / "gpu_check_split.json").read_text()) == []

    row = lambda provider, ms: gpu_check.SplitRow(16384, 5120, 151936, "advantage", provider, "ok", total_ms=ms)
    lines = gpu_check.target_lines([row("loss", 120.0), row("triton", 200.0), row("liger", 150.0)])
    assert "judge_loss forward+backward 120.0 ms (target <= 140 ms): met" in lines[1]
    assert any("faster than liger (150.0 ms): yes" in line for line in lines)
    assert any("cce: not measured" in line for line in lines)
    assert any("= 1.67x (target <= 1.5x): NOT met" in line for line in lines)
    assert row("loss", 1.0).failed is False and gpu_check.SplitRow(1, 1, 1, "judge", "loss", "oom").failed
    assert gpu_check.SplitRow(1, 1, 1, "judge", "cce", "error").failed is False  # peers are reported, not failed


def test_run_cases_budget_reports_unstarted_cases_as_skipped():
    cases = [Case("naive", "logprobs-fwd", Shape(8, 8, 64), "cpu", warmup=0, repeats=1)] * 2
    results = run_cases(cases, isolation="inprocess", progress=False, budget_s=0.0)
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert "time budget of 0 s spent" in results[0].note
