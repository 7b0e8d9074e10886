"""Two CPU processes (gloo) take the same training steps as one process with the same global batch.

One process trains the tiny judge for a few REAL steps on a global batch of
P prompt groups; two spawned ranks train the same model on half the groups
each, under FSDP2 (full fine-tuning, and LoRA with gradient checkpointing) and
under DDP.  Their all-reduced losses must match the one-process losses
(relative 1e-4) and their updated weights must match.  The LM-head weight
(tied to the embeddings in the tiny model) trains too, so this checks that
the fused head's direct use of the weight is gathered and reduce-scattered
correctly.  The fsdp scenario runs the whole step inside ``wrapped(...)``; ddp
and fsdp-lora run only the forward inside it, compute the loss after it, and
accumulate gradients over two micro-batches (``gradient_sync``).  The same
spawn also checks:

- the trap itself: outside ``wrapped(...)`` the head weight is a ``[V/2, H]``
  shard; inside, the whole ``[V, H]`` weight;
- rollouts through the FSDP root: greedy ``generate_cots`` gives the same CoTs
  as one process, with layers gathered per step or kept gathered
  (``unsharded_for_generation``), and ranks whose sequences stop at different
  lengths do not hang;
- resuming with another number of ranks: a full state (model + AdamW) saved
  by 2 FSDP ranks after 2 steps continues in 1 process with the same step-3
  loss, and a 1-process state continues on 2 FSDP ranks likewise.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from rank_utils import assert_same_weights, free_port

from real.judge.batching import build_teacher_forced_batch
from real.multi_gpu.distributed import DistEnv, all_gather_list, all_reduce_metrics, shard_for_rank
from real.loop.full_state import full_model_state_dict, full_optimizer_state_dict, load_full_state
from real.multi_gpu.parallel import clip_grad_norm, gradient_sync, unsharded_for_generation, unwrap_model, wrap_model
from real.planner.memory_model import TrainSetup, param_bytes
from real.planner.model_shapes import shape_from_config
from real.model.head import judge_forward
from real.methods.objectives import real_loss
from real.judge.prompts import resolve_score_token_ids
from real.judge.synthetic import make_examples
from real.model.tiny import build_tiny_model, build_tiny_tokenizer

GROUP = 2  # rollouts per prompt
PROMPTS = 4  # prompt groups in the global batch: 2 per rank
STEPS = 3
LR = 1e-3
SCORE_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]
SCENARIOS = {  # name -> (parallel mode, LoRA rank, gradient checkpointing)
    "fsdp": ("fsdp", 0, False),
    "ddp": ("ddp", 0, False),
    "fsdp-lora-ckpt": ("fsdp", 4, True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(lora_rank: int = 0, checkpointing: bool = False):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # lora_A's random init: the same in every process
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora_rank:
            model.enable_input_require_grads()
    model.train()
    return model, tokenizer


def _global_batch(tokenizer):
    examples = make_examples(PROMPTS, seed=3)
    prompts = [ex.prompt for ex in examples for _ in range(GROUP)]
    # ready-made "rollouts": each group's reference CoT and a second, shortened one
    cots = []
    for ex in examples:
        cots += [ex.feedback[0], ex.feedback[0][: len(ex.feedback[0]) // 2]]
    targets = [ex.target for ex in examples for _ in range(GROUP)]
    ids = resolve_score_token_ids(tokenizer, SCORE_VALUES)
    batch = build_teacher_forced_batch(tokenizer, prompts, cots, targets, ids, SCORE_VALUES,
                                       max_prompt_tokens=96, max_cot_tokens=48)
    return batch, ids, [ex.prompt for ex in examples]


def _rows(batch, rows: slice):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)})


def _step_fn(model, batch, score_ids):
    fwd = judge_forward(model, batch, score_ids, SCORE_VALUES)
    return real_loss(fwd, GROUP, beta=1.0)


def _train(wrapped, optimizer, batch, score_ids, steps, env=None, loss_outside=False, micro_batches=1):
    """``loss_outside``: only the forward (decoder + fused head) runs inside ``wrapped``, the loss after it,
    as a loop that keeps its loss code unchanged would do; otherwise the whole step runs inside.
    ``micro_batches``: whole prompt groups per micro-batch, gradients accumulated, synchronised on the last."""
    losses = []
    size = len(batch) // micro_batches
    for _ in range(steps):
        step_loss = 0.0
        for k in range(micro_batches):
            mb = _rows(batch, slice(k * size, (k + 1) * size))
            with gradient_sync(wrapped, enabled=k == micro_batches - 1):
                if loss_outside:
                    loss, terms = real_loss(wrapped(judge_forward, mb, score_ids, SCORE_VALUES), GROUP, beta=1.0)
                else:
                    loss, terms = wrapped(_step_fn, mb, score_ids)
                (loss / micro_batches).backward()
            step_loss += float(terms["loss"]) / micro_batches  # terms are detached 0-dim tensors
        clip_grad_norm(wrapped, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_metrics({"loss": step_loss}, env)["loss"])
    return losses


def _greedy_cots(wrapped, tokenizer, prompts):
    from real.judge.inference import generate_cots

    with torch.no_grad():
        return wrapped(generate_cots, tokenizer, prompts, n=1, greedy=True, max_new_tokens=6, batch_size=4,
                       progress=False)


def _uneven_generation(wrapped, tokenizer, env):
    """Rank 0's sequences finish after 1 new token, rank 1's after 5: under FSDP every decoding step
    all-gathers the layers, so rank 0 must keep stepping until rank 1 is done (transformers' synced_gpus)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n, self.start = n, None

        def __call__(self, input_ids, scores, **kwargs):
            self.start = input_ids.shape[1] if self.start is None else self.start
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - self.start + 1 >= self.n)

    ids = torch.tensor([tokenizer("###Feedback: ")["input_ids"]])
    new_tokens = 1 if env.rank == 0 else 5

    def generate(model):
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([StopAfter(new_tokens)]))
        return out.shape[1] - ids.shape[1]

    with torch.no_grad():
        return wrapped(generate)


def _worker(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from real.multi_gpu.distributed import cleanup_distributed, setup_distributed
    from real_kernels.hf_model import lm_head_weight

    env = setup_distributed(device="cpu", timeout_s=60)  # a hang fails within a minute
    results = {}
    try:
        data = torch.load(os.path.join(workdir, "batch.pt"), weights_only=False)
        batch, score_ids, prompts = data["batch"], data["score_ids"], data["prompts"]
        my_rows = shard_for_rank(list(range(len(batch))), env)
        local = _rows(batch, slice(my_rows[0], my_rows[-1] + 1))
        for name, (mode, lora_rank, ckpt) in SCENARIOS.items():
            model, tokenizer = _build(lora_rank, ckpt)
            wrapped = wrap_model(model, mode, env)
            optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
            if name == "fsdp":
                outside = lm_head_weight(unwrap_model(wrapped))
                inside = wrapped(lambda m: tuple(lm_head_weight(m).shape))
                results["head_shapes"] = (tuple(outside.to_local().shape), inside)
                results["cots"] = _greedy_cots(wrapped, tokenizer, shard_for_rank(prompts, env))
                with unsharded_for_generation(wrapped):
                    results["cots_unsharded"] = _greedy_cots(wrapped, tokenizer, shard_for_rank(prompts, env))
                results["head_shape_after"] = tuple(lm_head_weight(unwrap_model(wrapped)).to_local().shape)
                results["uneven_lengths"] = _uneven_generation(wrapped, tokenizer, env)
            losses = _train(wrapped, optimizer, local, score_ids, STEPS if name != "fsdp" else 2, env,
                            loss_outside=name != "fsdp", micro_batches=1 if name == "fsdp" else 2)
            if name == "fsdp":  # save after 2 steps (full, rank-independent), then take step 3
                model_state = full_model_state_dict(wrapped)
                optim_state = full_optimizer_state_dict(wrapped, optimizer)
                if env.is_main:
                    torch.save({"model": model_state, "optim": optim_state}, os.path.join(workdir, "fsdp-step2.pt"))
                losses += _train(wrapped, optimizer, local, score_ids, 1, env)
            state = full_model_state_dict(wrapped)
            results[name] = {"losses": losses, "state": state}
        # resume a 1-process checkpoint (written by the parent after 2 steps) on 2 FSDP ranks
        model, _ = _build()
        wrapped = wrap_model(model, "fsdp", env)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
        saved = torch.load(os.path.join(workdir, "single-step2.pt"), weights_only=False) if env.is_main else {}
        load_full_state(wrapped, saved.get("model"), optimizer, saved.get("optim"))
        results["resumed-from-1"] = {"losses": _train(wrapped, optimizer, local, score_ids, 1, env)}
        results["all_cots"] = all_gather_list(results["cots"], env)
        results["padded_split"] = all_gather_list(shard_for_rank(list("abcde"), env, pad=True), env, total=5)
        results["metrics"] = all_reduce_metrics({"loss": float(rank), "peak_mem_mb": 10.0 * rank, "train_tokens": 5,
                                                 "advantage_min": -float(rank), "method": "real"}, env)
        # the planner's per-GPU weight bytes under FSDP are what rank 0 holds
        model, _ = _build()
        wrapped = wrap_model(model, "fsdp", env)
        results["local_weight_bytes"] = sum(p.to_local().numel() * p.element_size() for p in wrapped.parameters())
        if env.is_main:
            torch.save(results, os.path.join(workdir, "results.pt"))
    finally:
        cleanup_distributed()


def _single(lora_rank=0, ckpt=False, steps=STEPS, batch=None, score_ids=None, save_after=None, workdir=None):
    model, tokenizer = _build(lora_rank, ckpt)
    wrapped = wrap_model(model, "none", DistEnv())
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    losses = []
    for step in range(1, steps + 1):
        losses += _train(wrapped, optimizer, batch, score_ids, 1)
        if save_after == step:
            torch.save({"model": full_model_state_dict(wrapped), "optim": full_optimizer_state_dict(wrapped, optimizer)},
                       os.path.join(workdir, "single-step2.pt"))
    return losses, full_model_state_dict(wrapped), wrapped, tokenizer


def test_two_ranks_match_one_process(tmp_path):
    start = time.time()
    tokenizer = build_tiny_tokenizer()
    batch, score_ids, prompts = _global_batch(tokenizer)
    assert len(batch) == GROUP * PROMPTS
    torch.save({"batch": batch, "score_ids": score_ids, "prompts": prompts}, tmp_path / "batch.pt")

    ref_losses, ref_state, ref_wrapped, tok = _single(batch=batch, score_ids=score_ids, save_after=2,
                                                      workdir=str(tmp_path))
    lora_losses, lora_state, _, _ = _single(4, True, batch=batch, score_ids=score_ids)
    ref_cots = _greedy_cots(wrap_model(_build()[0], "none", DistEnv()), tok, prompts)

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)

    # the trap: outside the root forward the head weight is a shard; inside it is whole
    vocab, hidden = unwrap_model(ref_wrapped).get_output_embeddings().weight.shape
    assert results["head_shapes"] == ((vocab // 2 + vocab % 2, hidden), (vocab, hidden))
    assert results["head_shape_after"] == results["head_shapes"][0]  # resharded after unsharded generation

    for name, (_, lora_rank, _) in SCENARIOS.items():
        expected_losses, expected_state = (lora_losses, lora_state) if lora_rank else (ref_losses, ref_state)
        got = results[name]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(expected_losses), rtol=1e-4, atol=0,
                                   msg=lambda m, name=name: f"{name}: losses differ from one process: {m}")
        assert_same_weights(expected_state, got["state"], name)
    assert ref_losses[0] != ref_losses[-1], "the steps did not change the model"

    # rollouts through the FSDP root: rank r generated the CoTs of its prompt share
    assert results["all_cots"] == ref_cots
    assert results["cots_unsharded"] == results["cots"]
    assert results["padded_split"] == list("abcde")
    assert results["uneven_lengths"] == 1  # rank 0 stopped after one token while rank 1 went on, no hang
    assert results["metrics"] == {"loss": 0.5, "peak_mem_mb": 10.0, "train_tokens": 10, "advantage_min": -1.0,
                                  "method": "real"}
    shape = shape_from_config({**unwrap_model(ref_wrapped).config.to_dict(), "model_type": "qwen3"})
    planned = param_bytes(shape, TrainSetup(gpus=2, parallel="fsdp", dtype="fp32"))
    assert results["local_weight_bytes"] == planned.weights

    # 2 FSDP ranks -> 1 process: continue from the rank-0 full checkpoint taken after step 2
    model, _ = _build()
    wrapped = wrap_model(model, "none", DistEnv())
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    saved = torch.load(tmp_path / "fsdp-step2.pt", weights_only=False)
    load_full_state(wrapped, saved["model"], optimizer, saved["optim"])
    step3 = _train(wrapped, optimizer, batch, score_ids, 1)
    assert step3[0] == pytest.approx(ref_losses[2], rel=1e-4)
    assert_same_weights(ref_state, full_model_state_dict(wrapped), "resumed 2 -> 1")
    # 1 process -> 2 FSDP ranks
    assert results["resumed-from-1"]["losses"][0] == pytest.approx(ref_losses[2], rel=1e-4)
    assert time.time() - start < 90
