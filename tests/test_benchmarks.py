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
from benchmarks import providers as providers_module
from benchmarks.providers import (CPU_TRITON_REASON, LigerFp32AccumProvider, LigerProvider, LossProvider,
                                  NaiveProvider, PeerProvider, ProviderUnsupported, RealKernelsProvider,
                                  per_token_gradient_error)
from benchmarks.report import CSV_FIELDS
from benchmarks.shapes import PRESETS, QWEN3_VOCAB, Shape
from benchmarks.runner import run_cases
from benchmarks.worker import ProviderWorker, _death_result
from benchmarks.workloads import make_inputs, make_step
from real_kernels.loss import PHASES


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
        "--split-repeats", "2", "--phase-n", "40", "--output-dir", str(tmp_path),
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

    def row(provider, ms, loss="advantage", n=16384):
        return gpu_check.SplitRow(n, 5120, 151936, loss, provider, "ok", total_ms=ms)

    lines = gpu_check.target_lines([row("loss", 120.0), row("triton", 200.0), row("liger", 150.0),
                                    row("liger-fp32", 110.0), row("loss", 130.0, "judge"),
                                    row("triton", 160.0, "judge"), row("triton-low", 300.0, "judge"),
                                    row("loss", 999.0, n=16400)])
    assert lines[0] == "Targets (N=16,384):"
    assert "judge_loss forward+backward 120.0 ms on the advantage loss (target <= 140 ms): met" in lines[1]
    assert "- faster than liger (150.0 ms): yes" in lines and "- faster than liger-fp32 (110.0 ms): NO" in lines
    assert "- cce: not measured" in lines
    assert "- judge_head (triton) / judge_loss on the judge loss = 1.23x (target <= 1.3x): met" in lines
    assert '- judge_head (triton, memory="low") / judge_loss on the judge loss = 2.31x (the low-memory fallback: ' \
           'reported)' in lines
    assert gpu_check.target_lines([row("triton", 1.0)])[1:3] == [
        "- advantage loss: judge_loss not measured", "- judge_head (triton) / judge_loss on the judge loss: not measured"]
    assert row("loss", 1.0).failed is False and gpu_check.SplitRow(1, 1, 1, "judge", "loss", "oom").failed
    assert gpu_check.SplitRow(1, 1, 1, "judge", "cce", "error").failed is False  # peers are reported, not failed


def test_run_cases_budget_reports_unstarted_cases_as_skipped():
    cases = [Case("naive", "logprobs-fwd", Shape(8, 8, 64), "cpu", warmup=0, repeats=1)] * 2
    results = run_cases(cases, isolation="inprocess", progress=False, budget_s=0.0)
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert "time budget of 0 s spent" in results[0].note


def test_run_cases_skips_a_case_predicted_to_overrun_the_budget(monkeypatch):
    """A case is not started when the same provider and op at the previous N, scaled by N, says it would end past
    the budget (the first GPU run started N = 65,536 cases just before its budget ended and was killed)."""
    import benchmarks.runner as runner

    clock = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])

    def fake_run_case(case):
        clock[0] += case.shape.n / 1000  # 1 s per 1,000 rows
        return runner.Result(case, "ok")

    monkeypatch.setattr(runner, "run_case", fake_run_case)
    cases = [Case("naive", "logprobs-fwd", Shape(n, 8, 64), "cuda", warmup=0, repeats=1) for n in (2000, 4000, 8000)]
    results = runner.run_cases(cases, isolation="inprocess", progress=False, budget_s=10.0)
    # 2 s, then 4 s (6 s spent), then 8 s predicted with 4 s left: skipped before it starts
    assert [r.status for r in results] == ["ok", "ok", "skipped"]
    assert "would take about 8 s (from N=4000), 4 s were left" in results[2].note
    assert runner.predicted_seconds(None, 10) is None and runner.predicted_seconds((10, 2.0), 30) == 6.0


# ---- gpu_check saves as it goes; its phase section; the peers' version checks ------------------------------------

GPU_CHECK_TINY = ["--device", "cpu", "--backends", "torch,loss", "--n", "40", "--hidden", "24", "--vocab", "300",
                  "--row-chunk", "16", "--dtype", "fp32", "--split-n", "40", "--split-hidden", "24",
                  "--split-providers", "naive,torch,loss", "--split-repeats", "2", "--phase-n", "40", "--skip-timing"]


def _interrupt_after(calls: int, fn):
    """``fn``, but the call after the first ``calls`` raises KeyboardInterrupt (a run killed mid-section)."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)
    return wrapped


def test_gpu_check_saves_every_finished_row_when_a_later_one_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "time_forward_backward", _interrupt_after(2, gpu_check.time_forward_backward))
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(GPU_CHECK_TINY + ["--output-dir", str(tmp_path)])
    checks = json.loads((tmp_path / "gpu_check_correctness.json").read_text())
    assert len(checks) == 2 * (7 + 6) and all(c["passed"] for c in checks)  # the section before: complete
    split = json.loads((tmp_path / "gpu_check_split.json").read_text())
    assert [(r["loss"], r["provider"], r["status"]) for r in split] == [("advantage", "naive", "ok"),
                                                                         ("advantage", "torch", "ok")]
    assert split[1]["total_ms"] > 0 and split[1]["dh_rel_err"] < 1e-4  # finished rows, with their numbers
    report = (tmp_path / "gpu_check.md").read_text()
    assert "**In progress**" in report and ": forward/backward timing (a run cut here keeps the rows above)" in report
    assert "| 40 | advantage | torch |" in report and "| 40 | judge |" not in report
    assert "| 24 | t=0.7 normalize ignore mask | loss | d weight |" in report
    assert not list(tmp_path.glob("*.tmp"))  # files are replaced whole


def test_gpu_check_saves_correctness_rows_per_backend_as_they_come(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_outputs_and_grads", _interrupt_after(2, gpu_check._outputs_and_grads))
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(GPU_CHECK_TINY + ["--output-dir", str(tmp_path)])
    checks = json.loads((tmp_path / "gpu_check_correctness.json").read_text())
    # setting 1 (5 outputs with the entropy, 2 gradients) for torch and loss; setting 2 was cut
    assert [(c["setting"], c["backend"]) for c in checks] == [("t=1.0 entropy", "torch")] * 7 + [
        ("t=1.0 entropy", "loss")] * 7
    assert "**In progress** " in (tmp_path / "gpu_check.md").read_text()
    assert json.loads((tmp_path / "gpu_check_split.json").read_text()) == []


def test_gpu_check_phase_section_calls_the_breakdown_at_the_target_shape(tmp_path, monkeypatch):
    calls = []

    def fake_breakdown(n, hdim, vocab, *, dtype, device, repeats):
        calls.append((n, hdim, vocab, dtype, device, repeats))
        ms = [float(i + 1) for i in range(len(PHASES))]
        return [{"phase": p, "ms": m, "share": m / sum(ms)} for p, m in zip(PHASES, ms)]

    monkeypatch.setattr(gpu_check, "_phase_breakdown_fn", lambda: fake_breakdown)
    assert gpu_check.main(GPU_CHECK_TINY + ["--skip-split", "--phase-repeats", "2", "--output-dir",
                                            str(tmp_path)]) == 0
    assert calls == [(40, 24, 300, torch.float32, "cpu", 2)]
    saved = json.loads((tmp_path / "gpu_check_phases.json").read_text())
    assert saved["shape"] == [40, 24, 300] and [r["phase"] for r in saved["rows"]] == list(PHASES)
    report = (tmp_path / "gpu_check.md").read_text()
    assert "### judge_loss phase by phase: N=40, H=24, V=300, float32" in report
    assert "| dW GEMM | 6.00 | 21.4% |" in report and "| total | 28.00 | 100% |" in report
    assert "Complete in" in report and "In progress" not in report
    # the defaults are the target shape
    args = gpu_check.build_parser().parse_args([])
    assert (args.phase_n, args.split_hidden, args.vocab, args.dtype) == (16384, 5120, QWEN3_VOCAB, "bfloat16")


def test_gpu_check_phase_section_through_the_real_loss_phases_module(tmp_path):
    """benchmarks.loss_phases on the CPU at a small odd shape: every phase timed, shares summing to 1."""
    assert gpu_check.main(GPU_CHECK_TINY + ["--skip-split", "--phase-n", "300", "--phase-repeats", "1",
                                            "--output-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "gpu_check_phases.json").read_text())
    assert saved["note"] == "" and [r["phase"] for r in saved["rows"]] == list(PHASES)
    assert all(r["ms"] > 0 for r in saved["rows"]) and sum(r["share"] for r in saved["rows"]) == pytest.approx(1.0)
    report = (tmp_path / "gpu_check.md").read_text()
    assert "### judge_loss phase by phase: N=300, H=24, V=300, float32" in report and "| dlogits pass |" in report


def test_gpu_check_phase_section_reports_a_failure_instead_of_crashing(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("hook missing")

    monkeypatch.setattr(gpu_check, "_phase_breakdown_fn", lambda: broken)
    rows, note = gpu_check.run_phases(8, 8, 50, dtype="float32", device="cpu", repeats=1)
    assert rows == [] and note == "failed: RuntimeError: hook missing"
    assert "Phase breakdown failed: RuntimeError: hook missing." in gpu_check.phases_markdown(
        rows, note, 8, 8, 50, "float32", "cpu")


def _plain_ce(hidden, weight, targets):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


class _GradientsFormedInForward(torch.autograd.Function):
    """What liger-kernel 0.7.0 / 0.8.0 do with reduction='none': per-row losses, gradients of their plain sum
    formed in the forward, then scaled by the first element of the per-row upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            ce = _plain_ce(h, w, targets)
            ctx.save_for_backward(*torch.autograd.grad(ce.sum(), (h, w)))
        return ce.detach()

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.flatten()[0], dw * grad.flatten()[0], None


def test_per_token_probe_tells_a_usable_peer_from_a_reduced_or_wrongly_weighted_one():
    assert per_token_gradient_error(_plain_ce, "cpu") is None
    assert per_token_gradient_error(_plain_ce, "cpu", dtype=torch.float32, vocab=333) is None
    reduced = per_token_gradient_error(lambda h, w, t: _plain_ce(h, w, t).sum(), "cpu")
    assert "returns a loss of shape () for reduction='none'" in reduced
    wrong = per_token_gradient_error(_GradientsFormedInForward.apply, "cpu")
    assert wrong.startswith("per-token gradients wrong in this version (dh off by") and "defers" in wrong


def test_liger_fp32_row_says_why_when_the_installed_liger_has_no_accum_dtype(monkeypatch):
    def old_liger(input, weight, target, bias=None, ignore_index=-100, reduction="mean"):
        return _plain_ce(input, weight, target)

    provider = LigerFp32AccumProvider()
    provider.module = "torch"  # stands in for an installed liger_kernel
    monkeypatch.setattr(LigerProvider, "_function", staticmethod(lambda: old_liger))
    monkeypatch.setattr(LigerProvider, "version", lambda self: "liger-kernel 0.6.1")
    assert provider.unavailable_reason("cpu").startswith("needs CUDA")
    assert provider.unavailable_reason("cuda") == (
        "liger-kernel 0.6.1 has no accum_dtype argument (it exists since liger-kernel 0.6.2): dW accumulates in the "
        "weight's dtype only")
    inputs = make_inputs(Shape(n=12, hidden=8, vocab=50), "cpu")
    with pytest.raises(ProviderUnsupported, match="has no accum_dtype argument"):
        provider.judge(inputs)
    # the default accumulator needs no accum_dtype: the same old version computes its row
    plain = LigerProvider()
    assert torch.isfinite(plain.judge(inputs))


def test_liger_installed_here_passes_the_per_token_probe_under_the_interpreter():
    """The installed Liger (0.8.5 here) defers its reduction='none' gradients; both accumulators pass."""
    pytest.importorskip("liger_kernel")
    for provider in (LigerProvider(), LigerFp32AccumProvider()):
        assert per_token_gradient_error(provider.cross_entropy, "cpu", n=16, hidden=16, vocab=130) is None, provider.name


def test_split_reports_an_unsupported_variant_as_skipped_with_the_reason(monkeypatch):
    class NoMemoryArgument(RealKernelsProvider):
        def judge(self, inputs):
            raise ProviderUnsupported("this real_kernels' judge_head has no memory= argument")

    monkeypatch.setitem(providers_module.PROVIDERS, "torch-low", lambda: NoMemoryArgument("torch", name="torch-low"))
    rows = gpu_check.run_split([24], 8, 64, dtype="float32", device="cpu", providers=["naive", "torch-low"],
                               losses=["judge"], repeats=2)
    assert [(r.provider, r.status) for r in rows] == [("naive", "ok"), ("torch-low", "skipped")]
    assert rows[1].note == "this real_kernels' judge_head has no memory= argument" and not rows[1].failed
    def linear_logprobs_without_memory(hidden, weight, targets, backend="auto"):
        raise AssertionError("not called")

    with pytest.raises(ProviderUnsupported, match="linear_logprobs_without_memory has no memory= argument"):
        RealKernelsProvider("torch", memory="low")._memory_kwargs(linear_logprobs_without_memory)
    assert providers_module.get_provider("triton-low").unavailable_reason("cpu") == CPU_TRITON_REASON


def test_triton_low_passes_memory_low_where_judge_head_takes_it(monkeypatch):
    """Once judge_head has memory=, the triton-low row runs and asks for the low-memory path (here through the
    torch backend, the CPU's, so the values can be checked against naive's)."""
    import real_kernels

    real_judge_head, asked = real_kernels.judge_head, []

    def judge_head_with_memory(*args, memory="auto", backend="auto", **kwargs):
        asked.append(memory)
        return real_judge_head(*args, backend="torch", **kwargs)

    monkeypatch.setattr(real_kernels, "judge_head", judge_head_with_memory)
    assert providers_module.get_provider("triton-low").unavailable_reason("cuda") is None
    inputs = make_inputs(Shape(n=300, hidden=24, vocab=1000), "cpu", seed=3)
    low = RealKernelsProvider("torch", memory="low", name="torch-low")
    _assert_same_loss_and_grads(low.judge(inputs), NaiveProvider().judge(inputs), inputs)
    assert asked == ["low"]


def test_the_determinism_probe_explains_itself_and_refuses_without_cuda(capsys):
    """benchmarks.determinism is a GPU diagnosis (which step makes two identical calls differ); on a machine
    without CUDA it must say so and exit 2, not fail deep inside a CUDA call."""
    import torch

    from benchmarks import determinism

    with pytest.raises(SystemExit) as help_exit:
        determinism.main(["--help"])
    assert help_exit.value.code == 0
    assert "bit for bit" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert determinism.main([]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
