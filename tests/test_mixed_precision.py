"""Mixed precision (``--dtype float32 --compute-dtype bfloat16``), as the released code trains: fp32
parameters, gradients and AdamW states, forward and backward in bf16.

In one process (and under DDP) ``real.multi_gpu.parallel.wrap_model`` runs every ``wrapped(fn, ...)`` call under
``torch.autocast(bf16)`` and ``real_kernels.hf`` hands the fused head bf16 hidden rows and a bf16 LM-head
weight; under FSDP the MixedPrecisionPolicy gathers bf16 units and reduce-scatters fp32 gradients.
Checked on the tiny Qwen3 against fp64, fp32 and bf16 copies of the same model:

- the outputs are computed in bf16: as far from fp64 as a bf16 model's (and far more than fp32's), the
  head's GEMMs see bf16 inputs (loss mode and plain), the loss is a bf16 model's to bf16 rounding;
- one AdamW step keeps fp32 parameters, fp32 gradients and fp32 states, and applies an update of
  lr 1e-6 that a bf16-weight model rounds away;
- two FSDP ranks on gloo (CPU) with the policy: bf16 units, fp32 shards, gradients and states, the
  one-process bf16 model's loss, and the small update kept.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from rank_utils import free_port
from test_distributed import SCORE_VALUES, _build, _global_batch, _rows

import real_kernels.hf as hf
import real_kernels.loss as kernel_loss
from real.model.head import micro_batch_loss
from real.model.head import judge_forward
from real.multi_gpu.parallel import unwrap_model, wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")
LR = 1e-6  # the released REAL's learning rate; tiny's weights are ~0.016 in magnitude


def _outputs(wrapped, batch, ids):
    with torch.no_grad():
        fwd = wrapped(judge_forward, batch, ids, SCORE_VALUES)
    return torch.cat([fwd.cot_logprobs[fwd.cot_mask].double(), fwd.score_logprobs.reshape(-1).double()])


def _sft_loss(fwd, seqs):
    """A sum over the chunk's sequences (what micro_batch_loss requires): squared error and CoT NLL."""
    return fwd.sq_error.sum() - fwd.cot_logprobs.sum() / 64.0, {}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP DTensor, else the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _adamw_step(wrapped, batch, ids, seen=None):
    """One AdamW step on ``_sft_loss`` (the head in loss mode); ``seen`` gets the LM-head weight's dtype as
    the head reads it.  Returns (loss, gradients, optimizer, share of the parameters' elements changed)."""
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=0.0)
    before = [_local(p).detach().clone() for p in wrapped.parameters()]

    def step(model, *args):
        if seen is not None:
            seen.append(hf.lm_head_weight(model).dtype)
        return micro_batch_loss(model, *args)

    loss, _, _ = wrapped(step, batch, ids, SCORE_VALUES, _sft_loss)
    loss.backward()
    grads = [p.grad for p in wrapped.parameters()]
    optimizer.step()
    changed = sum(int((_local(p).detach() != b).sum()) for p, b in zip(wrapped.parameters(), before))
    total = sum(b.numel() for b in before)
    return float(loss.detach()), grads, optimizer, changed / total


def test_one_process_computes_in_bf16_and_keeps_fp32_master_weights(monkeypatch):
    model, tokenizer = _build()
    batch, ids, _ = _global_batch(tokenizer)
    fp32 = wrap_model(copy.deepcopy(model), "none")
    bf16 = wrap_model(copy.deepcopy(model).to(torch.bfloat16), "none")
    mixed = wrap_model(copy.deepcopy(model), "none", compute_dtype=torch.bfloat16)
    assert unwrap_model(mixed).model.embed_tokens.weight.dtype == torch.float32

    # The fused head takes fp32 / bf16 / fp16 only, so fp32 is the reference: its own error (~1e-6 on
    # log-probs of ~-6) is far below bf16's (~1e-2).
    exact = _outputs(fp32, batch, ids)
    err = {name: float((_outputs(w, batch, ids) - exact).abs().max()) for name, w in (("bf16", bf16),
                                                                                     ("mixed", mixed))}
    assert err["mixed"] > 1e-4, err  # it computes in bf16, not fp32 ...
    assert err["mixed"] < 2 * err["bf16"], err  # ... and no worse than a bf16 model

    seen = []  # the dtypes of the fused head's inputs, plain and in loss mode
    head, loss_head = hf.judge_head, kernel_loss.judge_loss
    monkeypatch.setattr(hf, "judge_head", lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or head(h, w, *a, **k))
    monkeypatch.setattr(kernel_loss, "judge_loss",
                        lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or loss_head(h, w, *a, **k))
    _outputs(mixed, batch, ids)
    loss_fp32, _, _, _ = _adamw_step(fp32, batch, ids)
    loss_bf16, _, _, changed_bf16 = _adamw_step(bf16, batch, ids)
    seen.clear()
    _outputs(mixed, batch, ids)
    loss_mixed, grads, optimizer, changed_mixed = _adamw_step(mixed, batch, ids)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2, seen

    ulp = 2.0 ** (torch.tensor(loss_bf16).abs().log2().floor().item() - 7)  # one bf16 ulp of the loss
    assert abs(loss_mixed - loss_bf16) <= ulp, (loss_mixed, loss_bf16, ulp)
    assert loss_mixed != loss_fp32
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    states = [s for p in mixed.parameters() for s in optimizer.state[p].values() if torch.is_tensor(s) and s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    # lr 1e-6 on weights of ~0.016: kept in fp32, rounded away in bf16 (half an ulp there is ~3e-5)
    assert changed_mixed > 0.9, changed_mixed
    assert changed_bf16 < 0.05, changed_bf16


def test_compute_dtype_wider_than_the_parameters_is_an_error():
    model, _ = _build()
    with pytest.raises(ValueError, match="compute_dtype"):
        wrap_model(model.to(torch.bfloat16), "none", compute_dtype=torch.float32)
    from real.loop.config import make_config

    with pytest.raises(ValueError, match="compute_dtype"):
        make_config(dtype="bfloat16", compute_dtype="float32")
    assert make_config(dtype="float32", compute_dtype="bfloat16").compute_dtype == "bfloat16"


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule

    from real.multi_gpu.distributed import all_reduce_metrics, cleanup_distributed, setup_distributed

    env = setup_distributed(device="cpu", timeout_s=60)
    try:
        model, tokenizer = _build()
        batch, ids, _ = _global_batch(tokenizer)
        half = len(batch) // world
        mine = _rows(batch, slice(rank * half, (rank + 1) * half))
        wrapped = wrap_model(model, "fsdp", env, compute_dtype=torch.bfloat16)
        policies = {m._get_fsdp_state()._mp_policy.param_dtype for m in wrapped.modules() if isinstance(m, FSDPModule)}
        gathered = []
        loss, grads, optimizer, changed = _adamw_step(wrapped, mine, ids, gathered)
        loss, changed = all_reduce_metrics({"loss": loss, "changed": changed}, env).values()
        states = [s for p in wrapped.parameters() for s in optimizer.state[p].values() if torch.is_tensor(s) and s.dim()]
        result = dict(policies=sorted(map(str, policies)), gathered=[str(d) for d in gathered], loss=loss,
                      changed=changed, shards={str(_local(p).dtype) for p in wrapped.parameters()},
                      grads={str(_local(g).dtype) for g in grads}, states={str(_local(s).dtype) for s in states})
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()


def test_two_fsdp_ranks_gather_bf16_and_keep_fp32_shards(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model, tokenizer = _build()
    batch, ids, _ = _global_batch(tokenizer)
    half = len(batch) // 2
    # FSDP's param_dtype=bf16 runs the whole model in bf16: the loss of a bf16 model (mean of the halves')
    expected = sum(_adamw_step(wrap_model(copy.deepcopy(model).to(torch.bfloat16), "none"),
                               _rows(batch, slice(r * half, (r + 1) * half)), ids)[0] for r in range(2)) / 2
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["policies"] == ["torch.bfloat16"], got
        assert got["gathered"] == ["torch.bfloat16"], got
        assert got["shards"] == got["grads"] == got["states"] == {"torch.float32"}, got
        assert got["loss"] == pytest.approx(expected, rel=1e-3), (got["loss"], expected)
        assert got["changed"] > 0.9, got
