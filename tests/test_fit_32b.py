"""The 32B fit script on a scaled-down shape on the CPU: a real REAL step with both heads, and the naive
head computing the same loss and gradients as the fused one (so the comparison on the GPU is fair)."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import fit_32b
from real.model.head import judge_forward
from real.methods.objectives import real_loss

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_scaled_down_run_reports_both_heads(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert fit_32b.main(["--scale-down", "--steps", "1", "--lr", "1e-2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused" in printed and "naive" in printed and "plan" in printed
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["attention"] == "sdpa" and report["complete"] is True
    fused, naive = report["results"]
    assert (fused["head"], naive["head"]) == ("fused", "naive")
    for r in (fused, naive):
        assert r["status"] == "ok" and r["weights_changed"]
        assert r["step_seconds"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        # the planner's step estimate for the same setting, within 25% on this tiny shape
        assert r["step_peak_bytes"] == pytest.approx(r["predicted_step_bytes"], rel=0.25)
    assert naive["step_peak_bytes"] > fused["step_peak_bytes"]


def test_naive_head_matches_fused_head():
    config = {**fit_32b.PRESETS["qwen3-32b"], **fit_32b.SCALED_DOWN}
    model = fit_32b.build_model(config, torch.device("cpu"), torch.float32, lora_rank=4, attention="sdpa")
    with torch.no_grad():  # non-zero LoRA B, so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    score_ids = list(range(16, 21))
    batch = fit_32b.make_batch(config["vocab_size"], 4, 24, 16, torch.device("cpu"), score_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(forward):
        loss, _ = real_loss(forward(), len(batch))
        grads = torch.autograd.grad(loss, trainable)
        return loss.detach(), grads

    fused_loss, fused_grads = loss_and_grads(lambda: judge_forward(model, batch, score_ids, fit_32b.SCORE_VALUES))
    naive_loss, naive_grads = loss_and_grads(lambda: fit_32b.naive_judge_forward(model, batch, score_ids, []))
    torch.testing.assert_close(naive_loss, fused_loss, rtol=1e-5, atol=1e-6)
    for g_fused, g_naive in zip(fused_grads, naive_grads):
        torch.testing.assert_close(g_naive, g_fused, rtol=1e-4, atol=1e-6)


def test_json_is_written_after_every_head_so_a_cut_run_keeps_the_fused_one(tmp_path, monkeypatch):
    out = tmp_path / "fit.json"
    real_run_head = fit_32b.run_head

    def cut_at_naive(model, optimizer, batch, score_ids, head, device):
        if head == "naive":
            raise KeyboardInterrupt  # the suite's timeout, or the device tool's limit
        return real_run_head(model, optimizer, batch, score_ids, head, device)

    monkeypatch.setattr(fit_32b, "run_head", cut_at_naive)
    with pytest.raises(KeyboardInterrupt):
        fit_32b.main(["--scale-down", "--steps", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False and [r["head"] for r in report["results"]] == ["fused"]
    assert report["results"][0]["status"] == "ok" and isinstance(report["results"][0]["loss"], float)
    assert not (tmp_path / "fit.json.tmp").exists()
