"""`real plan`: will this judge, trained this way, fit on these GPUs?

A memory planner: from a model (a built-in preset or a ``config.json``), the
number of GPUs and their memory, full fine-tuning or LoRA, the optimizer, the
batch (prompt and CoT lengths, rollouts per prompt, micro-batch tokens),
gradient checkpointing and the loss head (``fused`` or ``naive``), it prints
every component one GPU holds, the peak, and whether it fits.  The arithmetic
lives in ``real.planner.memory_model`` (its docstring says exactly what is counted), the
model shapes in ``real.planner.model_shapes``; this module assembles the plan
(``memory_plan``: one row per component, the peaks, the verdict) and prints it.

    real plan --model qwen3-32b --gpus 1 --gpu-memory 141 --lora-rank 64 --head fused
    real plan --model path/to/config.json --gpus 8 --parallel fsdp --json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional

from real.planner.memory_model import (ATTENTION_KERNELS, DTYPE_BYTES, GIB, HEADS, LORA_TARGET_SETS, OPTIMIZER_STATES,
                               OPTIMIZERS, PLAN_PARALLEL_MODES, TrainSetup, activation_bytes,
                               backward_working_bytes_per_token, fsdp_buffer_bytes, fused_head_bytes_per_row,
                               fused_workspace_bytes, head_held_bytes, layer_saved_bytes_per_token, loss_head_bytes,
                               ROLLOUT_ENGINES, param_bytes, rollout_bytes, vllm_engine_bytes)
from real.planner.model_shapes import PRESETS, ModelShape, load_shape


@dataclass
class Row:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    model: str
    setup: dict
    rows: List[Row]
    train_step: int  # what one training step adds on top of the persistent bytes (gradients, activations, head)
    train_peak: int
    rollout_peak: int
    peak: int
    capacity: int
    fits: bool
    facts: dict = field(default_factory=dict)

    def row(self, key: str) -> Row:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(key)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "setup": self.setup,
            "components": {r.key: {"bytes": r.bytes, "gib": r.bytes / GIB, "label": r.label, "note": r.note}
                           for r in self.rows},
            "train_step_bytes": self.train_step,
            "train_peak_bytes": self.train_peak,
            "rollout_peak_bytes": self.rollout_peak,
            "peak_bytes": self.peak,
            "peak_gib": self.peak / GIB,
            "capacity_bytes": self.capacity,
            "capacity_gib": self.capacity / GIB,
            "fits": self.fits,
            "headroom_gib": (self.capacity - self.peak) / GIB,
            "facts": self.facts,
        }


def memory_plan(shape: ModelShape, setup: TrainSetup) -> MemoryPlan:
    """Per-GPU bytes of every component, the training and rollout peaks, and whether it fits."""
    setup.validate()
    c, cc = DTYPE_BYTES[setup.dtype], DTYPE_BYTES[setup.compute]
    params = param_bytes(shape, setup)
    acts = activation_bytes(shape, setup)
    head = loss_head_bytes(shape, setup)
    tile = fused_workspace_bytes(shape, setup)
    fsdp = fsdp_buffer_bytes(shape, setup)
    roll = rollout_bytes(shape, setup)
    engine = vllm_engine_bytes(shape, setup)
    reserve = int(setup.reserve_gib * GIB)
    n = setup.tokens_per_micro_batch
    seqs = setup.sequences_per_micro_batch
    share = f" / {setup.gpus} GPUs" if setup.sharded else ""

    lora = f"LoRA r={setup.lora_rank} ({setup.lora_targets}), fp32 adapters" if setup.lora_rank else "full fine-tuning"
    if setup.head == "naive":
        head_note = (f"N={n:,} rows x V={shape.vocab_size:,} x {cc + 12} B (logits {cc} B + fp32 log-softmax 4 B "
                     f"+ gather grad 4 B + logits grad 4 B)")
    else:
        head_note = (f"{setup.head_rows_fused:,} CoT+score rows x "
                     f"{fused_head_bytes_per_row(shape.hidden_size, setup.compute, setup.score_values):,} B"
                     f" + one {tile / 2**20:g} MiB tile" + (" + fp32 dW [V, H]" if setup.lora_rank == 0 else ""))
    if setup.gradient_checkpointing:
        stash_label, stash_note = "activations: checkpointed layer inputs", f"{shape.num_layers} layers x N x H x {DTYPE_BYTES[setup.compute]} B"
        layer_label = "activations: one layer recomputed + backward"
    else:
        stash_label, stash_note = "activations: saved by all layers", f"{shape.num_layers} layers x N x {layer_saved_bytes_per_token(shape, setup):,} B"
        layer_label = "activations: backward working set"
    rows = [
        Row("weights", "weights", params.weights,
            f"{params.base_params / 1e9:.2f}B params x {c} B" + (f" + {params.trainable_params / 1e6:.1f}M adapter params x 4 B" if setup.lora_rank else "") + share),
        Row("gradients", "gradients", params.gradients, f"{params.trainable_params / 1e6:,.1f}M trainable" + share),
        Row("optimizer", f"optimizer states ({setup.optimizer})", params.optimizer,
            f"{OPTIMIZER_STATES[setup.optimizer]} state(s) per trainable element" + share),
        Row("fsdp_buffers", "FSDP all-gather buffers" if setup.sharded else "compute-dtype weight copies", fsdp,
            (f"root unit + 2 layers unsharded + 1 layer of unsharded grads, {setup.compute}" if setup.sharded
             else f"autocast's {setup.compute} copy of every weight" if fsdp else "not sharded")),
        Row("activations_stash", stash_label, acts.stash, stash_note),
        Row("activations_final", "activations: final norm + head input", acts.final, ""),
        Row("activations_layer", layer_label, acts.layer_backward,
            f"+ {backward_working_bytes_per_token(shape, setup):,} B/token working set"),
        Row("loss_head", f"loss head ({setup.head})", head, head_note),
        Row("rollout_kv_cache", "rollout KV cache", roll.kv_cache,
            f"{setup.generation_batch or setup.rollouts} seqs x {setup.sequence_tokens:,} tokens x "
            f"{2 * shape.num_layers * shape.kv_dim * c:,} B" if roll.kv_cache else
            "inside the vLLM engine" if setup.rollout_engine != "hf" else "generation elsewhere"),
        Row("rollout_prefill", "rollout prefill working set", roll.prefill, "one layer's MLP on the prompts"),
        Row("vllm_engine", "vLLM engine (while sampling)", engine.budget, _engine_note(setup, engine)),
        Row("reserve", "CUDA context + allocator reserve", reserve, "--reserve-gib"),
    ]
    persistent = params.weights + params.optimizer + fsdp + reserve
    # Two moments can be the peak of a step.  The head: every layer's stash, the final norm, the head's
    # buffers and the LM head's gradient.  The decoder's backward: one layer differentiated (recomputed
    # under checkpointing) while the stash shrinks and gradients appear layer by layer; with uniform
    # layers the worst layer is the first or the last one differentiated.
    layers = shape.num_layers
    head_grad = shape.vocab_size * shape.hidden_size * c if setup.lora_rank == 0 else 0
    head_phase = acts.stash + acts.final + head + head_grad
    decoder_phase = (max(layers * acts.stash_per_layer + params.layer_gradients,
                         acts.stash_per_layer + layers * params.layer_gradients)
                     + params.root_gradients + head_held_bytes(shape, setup) + acts.layer_backward)
    train_step = max(head_phase, decoder_phase)
    train_peak = persistent + train_step + engine.held_while_training
    rollout_peak = persistent + roll.kv_cache + roll.prefill + engine.budget
    peak = max(train_peak, rollout_peak)
    capacity = int(setup.gpu_memory_gib * GIB)
    # A vLLM engine must hold its weights and at least one whole sequence's KV cache in its share.
    engine_fits = setup.rollout_engine == "hf" or engine.kv_room >= engine.kv_per_sequence
    if setup.rollout_engine == "vllm-server":  # its own GPUs, of the same memory
        engine_fits = engine.weights + engine.kv_per_sequence <= capacity - reserve
    facts = {
        "tokens_per_micro_batch": n,
        "sequences_per_micro_batch": seqs,
        "fused_head_rows": setup.head_rows_fused,
        "vocab_size": shape.vocab_size,
        "params": params.base_params,
        "trainable_params": params.trainable_params,
        "naive_logits_bytes_per_row": shape.vocab_size * (c + 12),
        "layer_saved_bytes_per_token": layer_saved_bytes_per_token(shape, setup),
        "head_phase_bytes": head_phase,
        "decoder_backward_phase_bytes": decoder_phase,
        "rollout_engine": setup.rollout_engine,
    }
    if setup.rollout_engine != "hf":
        facts.update(vllm_engine_weights_bytes=engine.weights, vllm_kv_per_sequence_bytes=engine.kv_per_sequence,
                     vllm_kv_wanted_bytes=engine.kv_wanted, vllm_kv_room_bytes=engine.kv_room,
                     vllm_sequences_at_once=engine.sequences_at_once, vllm_engine_fits=engine_fits)
    return MemoryPlan(model=shape.name, setup=dict(asdict(setup), fused_tile_bytes=tile), rows=rows, train_step=train_step, train_peak=train_peak,
                rollout_peak=rollout_peak, peak=peak, capacity=capacity, fits=peak <= capacity and engine_fits,
                facts=facts)


def _engine_note(setup: TrainSetup, engine) -> str:
    if setup.rollout_engine == "hf":
        return "rollouts by transformers generate (--rollout-engine hf)"
    tp = setup.vllm_tensor_parallel_size
    split = f" per GPU (TP {tp})" if tp > 1 else ""
    what = (f"weights {engine.weights / GIB:.1f} GiB{split} + KV cache {max(engine.kv_room, 0) / GIB:.1f} GiB "
            f"({engine.sequences_at_once:,} seqs at once, a rollout has "
            f"{engine.kv_wanted // max(engine.kv_per_sequence, 1):,})")
    if setup.rollout_engine == "vllm-server":
        return (f"on the server's GPUs: weights {engine.weights / GIB:.1f} GiB{split} per GPU + KV cache "
                f"({engine.kv_per_sequence / GIB:.2f} GiB per sequence)")
    if engine.kv_room < engine.kv_per_sequence:
        return (f"TOO SMALL: {setup.vllm_gpu_memory_utilization:g} x GPU < weights {engine.weights / GIB:.1f} GiB"
                f"{split} + one sequence's KV; raise --vllm-gpu-memory-utilization or "
                "--vllm-tensor-parallel-size")
    asleep = "asleep while training" if setup.vllm_sleep else "held while training too (--no-vllm-sleep)"
    return f"{setup.vllm_gpu_memory_utilization:g} x GPU: {what}; {asleep}"


# --- the command -------------------------------------------------------------------------


def _memory_gib(text: str) -> float:
    """``141``, ``141GiB`` (2^30 bytes) or ``141GB`` (10^9 bytes) -> GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--gpu-memory: expected a number of GiB such as 80 or 141GB, got {text!r}")
    value = float(match.group(1))
    if match.group(2) == "gb":
        value = value * 1e9 / GIB
    if value <= 0:
        raise argparse.ArgumentTypeError("--gpu-memory must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="real plan",
        description="Memory planner: per-GPU bytes of weights, gradients, optimizer states, activations, "
                    "the loss head and the rollout KV cache, the peak, and whether it fits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="qwen3-8b",
                   help=f"a preset ({', '.join(PRESETS)}), a config.json, or a model folder holding one")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (all nodes together)")
    p.add_argument("--gpu-memory", type=_memory_gib, default=80.0,
                   help="memory of one GPU in GiB (suffix GB for 10^9 bytes, e.g. 141GB)")
    p.add_argument("--parallel", choices=PLAN_PARALLEL_MODES, default="fsdp",
                   help="fsdp shards weights, gradients and optimizer states over the GPUs; ddp replicates them")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                   help="parameter, gradient and optimizer-state dtype (and the compute dtype unless --compute-dtype)")
    p.add_argument("--compute-dtype", choices=tuple(DTYPE_BYTES), default=None,
                   help="mixed precision (real train --compute-dtype): activations, the head, the KV cache and "
                        "the FSDP-gathered units in this dtype, e.g. --dtype fp32 --compute-dtype bf16 as the "
                        "paper presets; default: --dtype")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank through peft (0 = full fine-tuning)")
    p.add_argument("--lora-targets", choices=tuple(LORA_TARGET_SETS), default="all-linear",
                   help="which linears get adapters")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw: 2 states per trainable element in its dtype; sgd: 1 momentum buffer")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (tokens)")
    p.add_argument("--cot-tokens", type=int, default=1024, help="generated tokens per rollout (chain of thought, marker and score token)")
    p.add_argument("--rollouts", type=int, default=8, help="CoTs sampled per prompt (G)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="tokens per forward/backward on one GPU (default: one prompt group, "
                        "rollouts x (prompt + CoT))")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer in backward (transformers' per-layer checkpointing)")
    p.add_argument("--head", choices=HEADS, default="fused",
                   help="fused: real_kernels.judge_head, no [N, V] logits; naive: model(...).logits + log_softmax")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa",
                   help="sdpa (padded batch: k/v repeated to every head, additive mask per layer) or flash "
                        "(flash-attn 2)")
    p.add_argument("--padded", action=argparse.BooleanOptionalAction, default=True,
                   help="the micro-batch holds sequences of different lengths (a padding mask); --no-padded for "
                        "equal lengths")
    p.add_argument("--rollout-on-gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="rollouts are generated on the same GPU (transformers generate): count their KV cache")
    p.add_argument("--generation-batch", type=int, default=None,
                   help="sequences generated at once per GPU (default: --rollouts)")
    p.add_argument("--rollout-engine", choices=ROLLOUT_ENGINES, default="hf",
                   help="hf: transformers generate on the trained model (its KV cache counted); vllm-colocate: "
                        "a vLLM engine on each GPU (its --vllm-gpu-memory-utilization share counted); "
                        "vllm-server: vLLM on other GPUs (their need reported)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="vllm-colocate: share of each GPU the engine takes while it samples")
    p.add_argument("--vllm-tensor-parallel-size", type=int, default=1, help="GPUs one vLLM engine spans")
    p.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=True,
                   help="vllm-colocate: the engine sleeps (holds nothing) while the trainer trains")
    p.add_argument("--reserve-gib", type=float, default=1.0, help="CUDA context and allocator slack, GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return p


def setup_from_args(args: argparse.Namespace) -> TrainSetup:
    return TrainSetup(
        gpus=args.gpus, gpu_memory_gib=args.gpu_memory, parallel=args.parallel, dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        lora_rank=args.lora_rank, lora_targets=args.lora_targets, optimizer=args.optimizer,
        prompt_tokens=args.prompt_tokens, cot_tokens=args.cot_tokens, rollouts=args.rollouts,
        micro_batch_tokens=args.micro_batch_tokens, gradient_checkpointing=args.gradient_checkpointing,
        head=args.head, attention=args.attention, padded=args.padded, rollout_on_gpu=args.rollout_on_gpu,
        generation_batch=args.generation_batch, reserve_gib=args.reserve_gib, rollout_engine=args.rollout_engine,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        vllm_tensor_parallel_size=args.vllm_tensor_parallel_size, vllm_sleep=args.vllm_sleep,
    )


def format_table(result: MemoryPlan) -> str:
    s = result.setup
    f = result.facts
    mode = f"LoRA r={s['lora_rank']} ({s['lora_targets']})" if s["lora_rank"] else "full fine-tuning"
    par = f", {s['parallel']}" if s["gpus"] > 1 else ""
    lines = [
        f"real plan: {result.model} on {s['gpus']} GPU(s) x {s['gpu_memory_gib']:.1f} GiB{par}, {mode}, "
        f"{s['dtype']}, {s['optimizer']}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"{s['head']} head",
        f"micro-batch per GPU: {f['sequences_per_micro_batch']} sequences x ({s['prompt_tokens']:,} prompt + "
        f"{s['cot_tokens']:,} CoT) = N {f['tokens_per_micro_batch']:,} tokens; "
        f"{f['params'] / 1e9:.2f}B params, {f['trainable_params'] / 1e6:,.1f}M trainable",
        "",
    ]
    width = max(len(r.label) for r in result.rows) + 2
    lines.append(f"{'component':<{width}}{'GiB':>9}  note")
    lines.append("-" * (width + 60))
    for r in result.rows:
        lines.append(f"{r.label:<{width}}{r.bytes / GIB:>9.2f}  {r.note}")
    lines.append("-" * (width + 60))
    lines.append(f"{'training step peak':<{width}}{result.train_peak / GIB:>9.2f}  weights + optimizer + FSDP + "
                 "reserve + max(head phase, decoder-backward phase), see below")
    engine_on_gpu = s["rollout_engine"] == "vllm-colocate"
    lines.append(f"{'rollout peak':<{width}}{result.rollout_peak / GIB:>9.2f}  weights + optimizer + FSDP + reserve"
                 + (" + vLLM engine" if engine_on_gpu else " + KV cache + prefill"))
    if not f.get("vllm_engine_fits", True):
        lines.append(f"the vLLM engine does not hold the weights and one sequence: {result.row('vllm_engine').note}")
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    headroom = (result.capacity - result.peak) / GIB
    why = ("the vLLM engine's share is too small" if headroom >= 0 and not result.fits else
           f"{'headroom' if headroom >= 0 else 'short by'} {abs(headroom):.2f} GiB")
    lines.append(f"{'peak per GPU':<{width}}{result.peak / GIB:>9.2f}  of {result.capacity / GIB:.2f} GiB -> "
                 f"{verdict} ({why})")
    lines.append("")
    lines.append(f"head phase            = stash + final + loss head + LM-head grad   = "
                 f"{f['head_phase_bytes'] / GIB:.2f} GiB")
    lines.append(f"decoder-backward phase = stash + grads so far + held logits + layer = "
                 f"{f['decoder_backward_phase_bytes'] / GIB:.2f} GiB")
    head = result.row("loss_head")
    lines.append(f"loss head ({s['head']}): {head.bytes:,} bytes")
    return "\n".join(lines)


def suggestions(shape: ModelShape, setup: TrainSetup) -> List[dict]:
    """Single changes that make a run that does not fit, fit: ``{"change", "flags", "peak_gib", "fits"}``.

    Tried one at a time: more GPUs (FSDP-sharded), LoRA, a micro-batch of one sequence, gradient
    checkpointing, the fused head; the first GPU count that fits is the one reported.
    """
    options = []
    for gpus in (2, 4, 8, 16, 32, 64, 128):
        if gpus > setup.gpus:
            options.append((f"{gpus} GPUs, FSDP", f"--gpus {gpus} --parallel fsdp",
                            replace(setup, gpus=gpus, parallel="fsdp")))
    if setup.lora_rank == 0:
        options.append(("LoRA r=64", "--lora-rank 64", replace(setup, lora_rank=64)))
    if (setup.micro_batch_tokens or 0) != setup.sequence_tokens:
        options.append(("one sequence per micro-batch", f"--micro-batch-tokens {setup.sequence_tokens}",
                        replace(setup, micro_batch_tokens=setup.sequence_tokens)))
    if not setup.gradient_checkpointing:
        options.append(("gradient checkpointing", "(drop --no-gradient-checkpointing)",
                        replace(setup, gradient_checkpointing=True)))
    if setup.head != "fused":
        options.append(("the fused head", "--head fused", replace(setup, head="fused")))
    found, more_gpus_found = [], False
    for change, flags, candidate in options:
        if change.endswith("GPUs, FSDP") and more_gpus_found:
            continue
        plan = memory_plan(shape, candidate)
        if plan.fits:
            more_gpus_found = more_gpus_found or change.endswith("GPUs, FSDP")
            found.append({"change": change, "flags": flags, "peak_gib": plan.peak / GIB, "fits": True})
    return found


def main(argv: Optional[List[str]] = None) -> int:
    """Exit 0 when the run fits, 2 when it does not (with what would fit) or the arguments are wrong."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        shape = load_shape(args.model)
        setup = setup_from_args(args)
        result = memory_plan(shape, setup)
        fixes = [] if result.fits else suggestions(shape, setup)
    except ValueError as exc:
        print(f"real plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.to_json(), "suggestions": fixes}, indent=2))
    else:
        print(format_table(result))
        if not result.fits:
            print("")
            if fixes:
                print("would fit with one change:")
                for fix in fixes:
                    print(f"  {fix['change']:<32} {fix['flags']:<40} peak {fix['peak_gib']:.2f} GiB")
            else:
                print("no single change tried (more GPUs, LoRA, one sequence per micro-batch, gradient "
                      "checkpointing, the fused head) makes it fit; combine them or use GPUs with more memory")
    return 0 if result.fits else 2


if __name__ == "__main__":
    sys.exit(main())
