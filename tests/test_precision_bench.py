"""benchmarks.precision on a tiny problem: every real_kernels row is there and fp32-accurate against fp64.

N=16, H=32, V=97 (a non-power-of-two vocabulary), bf16 inputs with logits of
std 2.  The peers (Liger, CCE) are left out here (CI does not install them and
CCE's torch.compile takes seconds); a peer that is not installed must give a
row that says so rather than crash.
"""
import json

import pytest
import torch

from benchmarks import precision

TINY = dict(n=16, hidden=32, vocab=97)


def test_real_kernels_rows_are_fp32_accurate_and_beat_naive_bf16(one_thread):
    problem = precision.make_problem(**TINY)
    rows = precision.run_problem(problem, ("naive-bf16",) + precision.OUR_IMPLS)
    by_name = {r.impl: r for r in rows}
    assert set(by_name) == {"bf16 floor", "naive-bf16", *precision.OUR_IMPLS}
    floor = by_name["bf16 floor"]
    for name in precision.OUR_IMPLS:
        row = by_name[name]
        assert row.status == "ok", (name, row.reason)
        assert row.logprob_max_abs < 1e-3 and row.logprob_mean_abs <= row.logprob_max_abs, name
        # bf16 gradients: within a few bf16 ulps of the max, never better than the rounded truth
        assert floor.dh_rel <= row.dh_rel + 1e-12 and row.dh_rel < 1e-2, name
        assert floor.dw_rel <= row.dw_rel + 1e-12 and row.dw_rel < 1e-2, name
    # the bf16 logits of the naive path cost orders of magnitude more on the log-probs
    assert by_name["naive-bf16"].logprob_max_abs > 10 * max(by_name[n].logprob_max_abs for n in precision.OUR_IMPLS)


def test_truth_is_the_fp64_log_softmax():
    problem = precision.make_problem(n=5, hidden=8, vocab=13)
    logprobs, dh, dw = precision.truth(problem)
    z = problem.hidden.double() @ problem.weight.double().T
    want = z[torch.arange(5), problem.targets] - torch.logsumexp(z, -1)
    torch.testing.assert_close(logprobs, want, rtol=0, atol=1e-12)
    assert dh.dtype == dw.dtype == torch.float64 and dh.shape == (5, 8) and dw.shape == (13, 8)


def test_missing_peer_gives_a_row_that_says_why(monkeypatch):
    real_find_spec = precision.importlib.util.find_spec
    monkeypatch.setattr(precision.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("liger_kernel", "cut_cross_entropy") else real_find_spec(name, *a))
    rows = precision.run_problem(precision.make_problem(**TINY), ("liger", "cce-torch_compile"))
    by_name = {r.impl: r for r in rows}
    assert by_name["liger"].status == "unavailable" and "pip install liger-kernel" in by_name["liger"].reason
    assert "pip install cut-cross-entropy" in by_name["cce-torch_compile"].reason
    assert "cut-cross-entropy" in precision.markdown(rows, TINY["n"], TINY["hidden"])


def test_cli_writes_the_table_and_json(tmp_path, capsys, one_thread):
    out = tmp_path / "p.json"
    assert precision.main(["--n", "16", "--hidden", "32", "--vocab", "97", "--impls", "loss-torch,head-torch",
                           "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| loss-torch |" in table and "| head-torch |" in table and "V=97" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["bf16 floor", "loss-torch", "head-torch"]
    with pytest.raises(SystemExit):
        precision.main(["--impls", "nope"])
