"""Does a 32B judge fit on one GPU for a REAL step?  Measure it, fused head then naive head.

Builds a Qwen3-32B-shaped ``Qwen3ForCausalLM`` with random weights directly on
the device in bf16 (nothing is downloaded), adds LoRA rank 64 on every linear
through peft, turns on gradient checkpointing, picks flash-attn 2 when it is
installed (else SDPA), and runs real REAL optimisation steps (decoder
forward, loss through the judge head, backward, AdamW step) on 8 rollouts of
2,048 prompt + 1,024 CoT tokens given as ready-made token ids (``--steps``, 2
by default: the time is the last step's, since the first one compiles the
Triton kernels; the peak the highest of them): first with the
fused head (``real_kernels`` through ``real.methods.objectives.judge_forward``), then
with the naive head (``[N, V]`` logits for every position, fp32
log-softmax, as a transformers-style trainer does).  A naive step that runs out
of memory is reported as such: that is the result.  Each head's peak memory and
step time are printed next to ``real plan``'s prediction for the same setting.

    python -m benchmarks.fit_32b                      # the 32B run (a GPU with ~140 GB; about 2-4 minutes)
    python -m benchmarks.fit_32b --scale-down         # a tiny shape on the CPU, seconds (what CI runs)
    python -m benchmarks.fit_32b --layers 8 --json out.json   # a custom shape

The AdamW states are created before the measured step (with lr 0), so each
head's peak includes them, as the planner's persistent bytes do.  On CUDA the
peak is ``torch.cuda.max_memory_allocated``; on the CPU it is the step's peak
above what was allocated before it, from the profiler's allocation events.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from real.judge.batching import TeacherForcedBatch
from real.planner.memory_model import FUSED_TILE_BYTES, GIB, TrainSetup
from real.planner.model_shapes import PRESETS, shape_from_config
from real.planner.plan import memory_plan
from real.model.head import JudgeForward, judge_forward
from real.methods.objectives import real_loss
from real_kernels.hf import decoder_hidden_states
from real_kernels.hf_model import lm_head_weight

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCORE_VALUES = [1.0, 2.0, 3.0, 4.0, 5.0]
SCALED_DOWN = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SCALED_DOWN_RUN = dict(rollouts=4, prompt_tokens=24, cot_tokens=16, lora_rank=4)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU while ``fn`` runs (above the start), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _attention(device: torch.device, requested: str) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except Exception:
            pass
    return "sdpa"


def build_model(config: dict, device: torch.device, dtype: torch.dtype, lora_rank: int, attention: str):
    """Random Qwen3 of ``config``'s shape, allocated on ``device`` in ``dtype``, LoRA + gradient checkpointing."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**{k: v for k, v in config.items() if k != "model_type"}, use_cache=False)
    cfg._attn_implementation = attention
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):  # adapters allocated (fp32, peft's default) where the base layers are
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def make_batch(vocab: int, rollouts: int, prompt_tokens: int, cot_tokens: int, device: torch.device,
               score_ids: List[int], seed: int = 0) -> TeacherForcedBatch:
    """One prompt and ``rollouts`` CoTs as token ids: prompt + (cot_tokens - 1) CoT tokens + the score token."""
    g = torch.Generator().manual_seed(seed)
    seq = prompt_tokens + cot_tokens
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g)
    ids = torch.randint(0, vocab, (rollouts, seq), generator=g)
    ids[:, :prompt_tokens] = prompt
    targets = 1 + 4 * torch.rand(rollouts, generator=g)
    score_index = (targets.round() - 1).long()
    ids[:, -1] = torch.tensor(score_ids)[score_index]
    cot_mask = torch.zeros(rollouts, seq, dtype=torch.bool)
    cot_mask[:, prompt_tokens - 1:seq - 2] = True  # next token is a CoT token; the score token excluded
    batch = TeacherForcedBatch(
        input_ids=ids, attention_mask=torch.ones(rollouts, seq, dtype=torch.long), cot_mask=cot_mask,
        score_pos=torch.full((rollouts,), seq - 2), score_token=ids[:, -1].clone(), score_index=score_index,
        targets=targets, prompt_lengths=torch.full((rollouts,), prompt_tokens),
    )
    return batch.to(device)


def naive_judge_forward(model, batch: TeacherForcedBatch, score_ids: List[int], logits_holder: list) -> JudgeForward:
    """The naive head, as ``real plan --head naive`` counts it: ``[B, T, V]`` logits for every position
    (what ``model(...).logits`` returns), an fp32 log-softmax over all of them, one gather of the next
    tokens; the score distribution from the score rows' logits.

    ``logits_holder`` keeps the logits alive through backward, as a trainer
    holding ``model(...).logits`` does.
    """
    hidden = decoder_hidden_states(model, batch.input_ids, batch.attention_mask)
    weight = lm_head_weight(model)
    logits = hidden @ weight.T
    logits_holder.append(logits)
    next_tokens = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    cot_logprobs = logp.gather(2, next_tokens[:, :, None]).squeeze(2) * batch.cot_mask
    rows = torch.arange(len(batch), device=logits.device)
    # the score rows again from their hidden states: indexing `logits` would back-propagate a dense [B, T, V]
    score_logprobs = torch.log_softmax((hidden[rows, batch.score_pos] @ weight.T).float(), dim=-1)[:, score_ids]
    expected = score_logprobs.exp() @ torch.tensor(SCORE_VALUES, device=logits.device)
    return JudgeForward(
        cot_logprobs=cot_logprobs, cot_mask=batch.cot_mask, score_logprobs=score_logprobs,
        expected_score=expected, sq_error=(expected - batch.targets) ** 2,
        log_pi_star=score_logprobs.gather(1, batch.score_index[:, None]).squeeze(1),
        targets=batch.targets, score_pos=batch.score_pos,
    )


def _create_optimizer_states(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's states now (a step with lr 0 on zero gradients), so both heads are measured with them."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def _fingerprint(params: List[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(p.double().pow(2).sum() for p in params))


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass
class HeadResult:
    head: str
    status: str  # "ok" or "oom"
    loss: Optional[float]
    step_seconds: Optional[float]
    peak_bytes: Optional[int]  # CUDA: max allocated; CPU: the step's peak above what was allocated before
    step_peak_bytes: Optional[int]  # the step's peak above what was allocated before it
    predicted_peak_bytes: int
    predicted_step_bytes: int
    weights_changed: bool = False  # the trainable parameters moved: a real optimizer step happened
    message: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def run_head(model, optimizer, batch, score_ids, head: str, device: torch.device) -> Dict[str, object]:
    """One REAL step with ``head``; returns loss, seconds, peak bytes (or the OOM)."""
    holder: list = []

    def step():
        if head == "fused":
            fwd = judge_forward(model, batch, score_ids, SCORE_VALUES)
        else:
            fwd = naive_judge_forward(model, batch, score_ids, holder)
        loss, terms = real_loss(fwd, len(batch))
        loss.backward()
        holder.clear()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(terms["loss"])  # a float, or a 0-dim tensor (real_loss keeps its terms on the device)

    gc.collect()
    result: Dict[str, object] = {"loss": None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        try:
            result["loss"] = step()
            torch.cuda.synchronize(device)
            result["status"] = "ok"
        except Exception as exc:  # an OOM is the naive head's expected result, anything else is re-raised
            if not _is_oom(exc):
                raise
            result["status"], result["message"] = "oom", str(exc).split("\n")[0][:300]
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device)
        result.update(step_seconds=seconds if result["status"] == "ok" else None, peak_bytes=peak,
                      step_peak_bytes=peak - before)
        holder.clear()
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
    else:
        start = time.perf_counter()
        box = {}
        step_peak = cpu_peak_bytes(lambda: box.setdefault("loss", step()))
        result.update(status="ok", loss=box["loss"], step_seconds=time.perf_counter() - start,
                      peak_bytes=None, step_peak_bytes=step_peak)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fit_32b",
        description="One REAL step of a Qwen3-32B-shaped LoRA judge on one GPU: peak memory and step time with "
                    "the fused head, then the naive head, next to `real plan`'s prediction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scale-down", action="store_true",
                   help=f"a tiny shape on the CPU in fp32 ({SCALED_DOWN}, {SCALED_DOWN_RUN}), for tests")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --scale-down)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--heads", default="fused,naive", help="which heads to run, in order")
    p.add_argument("--rollouts", type=int, default=None, help="CoTs of the one prompt (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default 2048)")
    p.add_argument("--cot-tokens", type=int, default=None,
                   help="CoT length including the score token (default 1024)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 64)")
    p.add_argument("--attention", choices=("auto", "sdpa", "flash_attention_2"), default="auto",
                   help="auto: flash_attention_2 when flash-attn is installed and on CUDA, else sdpa")
    for flag, key in (("--layers", "num_hidden_layers"), ("--hidden", "hidden_size"),
                      ("--intermediate", "intermediate_size"), ("--attn-heads", "num_attention_heads"),
                      ("--kv-heads", "num_key_value_heads"), ("--head-dim", "head_dim"), ("--vocab", "vocab_size")):
        p.add_argument(flag, type=int, default=None, dest=key, help=f"override the model's {key}")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate of the step")
    p.add_argument("--steps", type=int, default=2,
                   help="REAL steps per head; the time is the last step's (the first compiles the Triton kernels), "
                        "the peak the highest of all")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    config = dict(PRESETS["qwen3-32b"])
    run = dict(rollouts=8, prompt_tokens=2048, cot_tokens=1024, lora_rank=64)
    if args.scale_down:
        config.update(SCALED_DOWN)
        run.update(SCALED_DOWN_RUN)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    for key in ("rollouts", "prompt_tokens", "cot_tokens", "lora_rank"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    if min(run.values()) < 1 or run["cot_tokens"] < 2 or args.steps < 1:
        print("fit_32b: --rollouts, --prompt-tokens, --lora-rank, --steps must be >= 1 and --cot-tokens >= 2",
              file=sys.stderr)
        return 2
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not heads or set(heads) - {"fused", "naive"}:
        print(f"fit_32b: --heads takes fused and/or naive, got {args.heads!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cpu" if args.scale_down or not torch.cuda.is_available() else "cuda"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    attention = _attention(device, args.attention)
    shape = shape_from_config(config, name="qwen3-32b-shaped" if not args.scale_down else "scaled-down qwen3")

    t0 = time.perf_counter()
    print(f"[fit_32b] building a random {shape.num_params() / 1e9:.2f}B-param Qwen3 on {device} in {dtype_name}, "
          f"LoRA r={run['lora_rank']}, gradient checkpointing, attention {attention} ...", flush=True)
    model = build_model(config, device, dtype, run["lora_rank"], attention)
    score_ids = list(range(16, 16 + len(SCORE_VALUES)))
    batch = make_batch(config["vocab_size"], run["rollouts"], run["prompt_tokens"], run["cot_tokens"], device,
                       score_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    _create_optimizer_states(optimizer)
    print(f"[fit_32b] built in {time.perf_counter() - t0:.1f}s; {sum(p.numel() for p in trainable) / 1e6:.1f}M "
          f"trainable; batch {run['rollouts']} x ({run['prompt_tokens']} + {run['cot_tokens']}) tokens", flush=True)

    results: List[HeadResult] = []
    for head in heads:
        setup = TrainSetup(gpus=1, dtype=dtype_name, lora_rank=run["lora_rank"], prompt_tokens=run["prompt_tokens"],
                           cot_tokens=run["cot_tokens"], rollouts=run["rollouts"], gradient_checkpointing=True,
                           head=head, attention="flash" if attention == "flash_attention_2" else "sdpa",
                           padded=False, rollout_on_gpu=False, reserve_gib=0, fused_tile_bytes=_tile_bytes(device, batch, config))
        predicted = memory_plan(shape, setup)
        print(f"[fit_32b] {head} head: {args.steps} REAL step(s) ...", flush=True)
        before = _fingerprint(trainable)
        measured = None
        for _ in range(args.steps):
            last = run_head(model, optimizer, batch, score_ids, head, device)
            measured = last if measured is None else {
                **last, **{k: max(measured[k], last[k]) for k in ("peak_bytes", "step_peak_bytes")
                           if measured[k] is not None and last[k] is not None}}
            if last["status"] != "ok":
                break
        results.append(HeadResult(head=head, predicted_peak_bytes=predicted.train_peak,
                                  predicted_step_bytes=predicted.train_step,
                                  weights_changed=_fingerprint(trainable) != before, **measured))
        print("  " + _describe(results[-1]), flush=True)
        if args.json:  # after every head, so a run cut at its time limit keeps the heads it finished
            _write_json(args.json, {"device": str(device), "device_name": _device_name(device), "dtype": dtype_name,
                                    "attention": attention, "config": config, "run": run,
                                    "params": shape.num_params(), "total_seconds": time.perf_counter() - t0,
                                    "complete": head == heads[-1], "results": [r.to_json() for r in results]})

    print(_table(results, device))
    print(f"[fit_32b] total {time.perf_counter() - t0:.1f}s")
    return 0


def _write_json(path: str, report: dict) -> None:
    """Written to a temporary name and renamed: a kill during the write leaves the previous version."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)


def _tile_bytes(device: torch.device, batch: TeacherForcedBatch, config: dict) -> int:
    """The fused head's tile: the chunked torch backend's buffer on the CPU; the planner's default on CUDA."""
    if device.type == "cuda":
        return FUSED_TILE_BYTES
    from real_kernels import torch_backend

    rows = int(batch.cot_mask.sum()) + len(batch)
    token_chunk, vocab_chunk = torch_backend.tile_chunks(rows, config["vocab_size"], torch_backend.DEFAULT_TILE_ELEMS)
    return token_chunk * vocab_chunk * 4


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _gib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f}" if value >= 0.1 * GIB else f"{value / 2**20:.1f}M"


def _describe(r: HeadResult) -> str:
    if r.status == "oom":
        return f"OUT OF MEMORY (peak {_gib(r.peak_bytes)} GiB when it failed): {r.message}"
    peak = f"peak {_gib(r.peak_bytes)} GiB, " if r.peak_bytes is not None else ""
    return (f"loss {r.loss:.4f}, {r.step_seconds:.2f}s, {peak}step peak {_gib(r.step_peak_bytes)}"
            f"{'' if r.step_peak_bytes is not None and r.step_peak_bytes < 0.1 * GIB else ' GiB'}")


def _table(results: List[HeadResult], device: torch.device) -> str:
    lines = ["", f"{'head':<7}{'status':<8}{'step s':>8}{'peak GiB':>10}{'plan GiB':>10}{'step GiB':>10}"
             f"{'plan step':>11}"]
    for r in results:
        seconds = "-" if r.step_seconds is None else f"{r.step_seconds:.2f}"
        lines.append(f"{r.head:<7}{r.status:<8}{seconds:>8}{_gib(r.peak_bytes):>10}{_gib(r.predicted_peak_bytes):>10}"
                     f"{_gib(r.step_peak_bytes):>10}{_gib(r.predicted_step_bytes):>11}")
    lines.append("peak: torch.cuda.max_memory_allocated (CUDA only); step: the step's peak above what was allocated "
                 "before it; plan: real plan for the same setting (no rollouts, no reserve); GiB unless marked M (MiB)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
