"""The byte arithmetic of `real plan`: how many bytes one GPU holds while training a judge.

Model shapes and presets are ``real.planner.model_shapes``; the plan assembled from
these numbers, its rows and the printed table are ``real.planner.plan``.

Everything here is plain integer arithmetic on a model's shape, so it can be
checked against real models (``tests/test_plan.py`` builds small Qwen3 / Llama
models from a config and compares parameter, gradient and optimizer bytes
exactly, and the activation and loss-head estimates against a profiler-measured
peak on the CPU).

What is counted, per GPU (c = bytes of the compute/parameter dtype):

- **weights**: every parameter in its dtype; LoRA adapters in fp32 (peft's
  default ``autocast_adapter_dtype=True`` keeps adapters of a bf16/fp16 model in
  fp32).  FSDP shards every parameter over the GPUs (dim 0, padded to a
  multiple of the world size); DDP replicates.
- **gradients**: one per trainable element, in the parameter's dtype.
- **optimizer states**: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the
  parameter's dtype (torch.optim.AdamW); SGD with momentum one buffer.  The
  per-tensor ``step`` counters are host scalars and not counted.
- **activations**: what autograd saves for backward in a transformers
  Llama/Qwen-style decoder layer, enumerated tensor by tensor
  (``layer_saved_bytes_per_token``; exact against a CPU model, see the tests).
  peft casts each LoRA linear's input to its fp32 adapters (a copy per module).
  SDPA on a padded batch keeps k/v repeated to every head and an additive mask
  per layer.  With gradient checkpointing (transformers' per-layer,
  non-reentrant) only each layer's input ``[N, H]`` stays, and one layer is
  recomputed at a time in backward.  A backward working set per token
  ``(2H + 2I) * g`` (g = 4 if any fp32 path is involved, else c) covers the
  gradient buffers of the layer being differentiated; it was fitted to
  measured peaks.  The step's peak is the larger of two moments: the loss head
  (every layer's stash + the head) and the decoder's backward (one layer
  differentiated while gradients accumulate and the stash shrinks).
- **loss head**: *naive* is what a transformers-style trainer does:
  ``logits = model(...).logits`` (``[N, V]`` in c bytes, held by the caller
  through backward), ``log_softmax(logits.float())`` (fp32, kept for backward),
  ``gather`` of the target log-probs; backward makes the gather's dense fp32
  gradient and the fp32 gradient of the logits.  Peak ``N * V * (c + 4 + 4 + 4)``
  bytes (14 B per logit for bf16: "the logits, their fp32 upcast, and their
  gradients").  The logits stay alive through the decoder's backward.  *fused*
  (``real_kernels.judge_head``) never builds ``[N, V]``: per row fp32 copies of
  the hidden row, the fp32 ``dh`` accumulator, ``dh`` itself and a few fp32
  statistics, plus the kernels' workspace (``real_kernels.workspace``: one
  vocabulary tile), plus an fp32 ``dW`` ``[V, H]`` accumulator when the LM
  head is trained.  The naive head runs over every position (``model(...)``
  returns logits for all of them); the fused head over the CoT rows and one
  score row per sequence (what ``real_kernels.hf.judge_outputs`` sends it).
- **rollout KV cache** when generation runs on the same GPU (transformers
  ``generate``): ``2 * layers * kv_heads * head_dim * c`` bytes per token of
  every sequence generated at once, plus the prefill working set of one layer.
  Rollout and training do not overlap in time, so the peak is
  ``persistent + max(training step, rollout)``.
- **vLLM engine** (``rollout_engine`` vllm-colocate): vLLM takes
  ``gpu_memory_utilization x GPU memory`` while it samples (the merged weights
  split over its tensor-parallel GPUs, the rest KV cache); asleep (level 2)
  it holds nothing while the trainer trains, awake it adds that share to the
  training peak too.  vllm-server puts it on other GPUs: their need (weights
  / TP + the KV cache of a rollout) is reported, not added.
- **FSDP gather buffers** (more than one GPU with FSDP): the unsharded root
  unit (embeddings, LM head, final norm) for the whole step plus two decoder
  layers (the current one and the prefetched next), and one layer's unsharded
  gradients before their reduce-scatter.
- **reserve**: CUDA context and allocator slack, a fixed user-settable amount.

Not counted: rotary tables, position ids and masks other than SDPA's, CPU-side
tensors, NCCL buffers beyond the gather buffers, fragmentation beyond the reserve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from real.planner.model_shapes import ModelShape
from real_kernels.workspace import MAX_TILE_BYTES, head_workspace_bytes

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # per-element state tensors (SGD with momentum)
PLAN_PARALLEL_MODES = ("fsdp", "ddp")  # how the planned GPUs share the model (real.multi_gpu.distributed's, less "none")
HEADS = ("fused", "naive")
ROLLOUT_ENGINES = ("hf", "vllm-colocate", "vllm-server")  # real.loop.config's, less the alias vllm
ATTENTION_KERNELS = ("sdpa", "flash")  # as the planner counts attention memory
LORA_TARGET_SETS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
FUSED_TILE_BYTES = MAX_TILE_BYTES  # the fused head's largest workspace (real_kernels.workspace)


@dataclass
class TrainSetup:
    """What is trained, how, on how many GPUs: the planner's inputs (CLI flags of `real plan`)."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    parallel: str = "fsdp"
    dtype: str = "bf16"  # parameters, gradients, optimizer states
    compute_dtype: Optional[str] = None  # mixed precision (real train --compute-dtype): activations, gathered
    # units, head and KV cache in it; None: dtype
    lora_rank: int = 0
    lora_targets: str = "all-linear"
    optimizer: str = "adamw"
    prompt_tokens: int = 2048
    cot_tokens: int = 1024  # generated tokens per rollout: the chain of thought, its marker and the score token
    rollouts: int = 8
    micro_batch_tokens: Optional[int] = None  # default: one prompt group, rollouts * (prompt + cot)
    gradient_checkpointing: bool = True
    head: str = "fused"
    attention: str = "sdpa"
    padded: bool = True  # rollouts of different lengths share a padded batch (an attention mask)
    rollout_on_gpu: bool = True
    generation_batch: Optional[int] = None  # sequences generated at once; default: rollouts
    rollout_engine: str = "hf"  # hf (generate on the trained model), vllm-colocate or vllm-server
    vllm_gpu_memory_utilization: float = 0.3  # vllm-colocate: the engine's share of the GPU while it samples
    vllm_tensor_parallel_size: int = 1  # GPUs one vLLM engine spans
    vllm_sleep: bool = True  # vllm-colocate: the engine releases its memory while the trainer trains
    score_values: int = 5
    reserve_gib: float = 1.0
    fused_tile_bytes: Optional[int] = None  # the fused head's workspace; None: what real_kernels.workspace says

    def validate(self) -> None:
        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
        for name in ("gpus", "gpu_memory_gib", "prompt_tokens", "cot_tokens", "rollouts", "micro_batch_tokens",
                     "generation_batch", "score_values"):
            positive(name)
        for name in ("lora_rank", "reserve_gib"):
            positive(name, allow_zero=True)
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout_engine must be one of {', '.join(ROLLOUT_ENGINES)}, got {self.rollout_engine!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPE_BYTES:
            raise ValueError(f"compute_dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.compute_dtype!r}")
        choices = {"parallel": PLAN_PARALLEL_MODES, "dtype": tuple(DTYPE_BYTES), "optimizer": OPTIMIZERS,
                   "head": HEADS, "attention": ATTENTION_KERNELS, "lora_targets": tuple(LORA_TARGET_SETS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.sequence_tokens:
            raise ValueError(
                f"micro_batch_tokens={self.micro_batch_tokens} is smaller than one sequence "
                f"({self.prompt_tokens} prompt + {self.cot_tokens} CoT tokens)"
            )

    @property
    def compute(self) -> str:
        """The dtype forward and backward compute in."""
        return self.compute_dtype or self.dtype

    @property
    def mixed(self) -> bool:
        return self.compute != self.dtype

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.cot_tokens

    @property
    def sequences_per_micro_batch(self) -> int:
        tokens = self.micro_batch_tokens or self.rollouts * self.sequence_tokens
        return max(1, tokens // self.sequence_tokens)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.sequences_per_micro_batch * self.sequence_tokens

    @property
    def head_rows_fused(self) -> int:
        """Rows the fused head sees: one per CoT token and one score row per sequence, i.e. ``cot_tokens``
        per sequence (the score token is the last of the CoT's tokens)."""
        return self.sequences_per_micro_batch * self.cot_tokens

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.gpus > 1


# ----------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer states


def _sharded_numel(shape: Tuple[int, ...], world: int) -> int:
    """Elements one rank holds of a parameter FSDP2 shards on dim 0 (padded to a multiple of world)."""
    if world == 1:
        return math.prod(shape)
    rows = -(-shape[0] // world)
    return rows * math.prod(shape[1:])


def lora_targets(setup: TrainSetup) -> Tuple[str, ...]:
    return LORA_TARGET_SETS[setup.lora_targets] if setup.lora_rank else ()


def adapter_bytes_per_element(setup: TrainSetup) -> int:
    """peft keeps adapters of a bf16/fp16 model in fp32 (autocast_adapter_dtype=True)."""
    return 4


def adapter_compute_bytes(setup: TrainSetup) -> int:
    """The dtype LoRA computes in: fp32 adapters cast their input to fp32, except under FSDP, which
    gathers every parameter of a unit in the compute dtype (``real.multi_gpu.distributed``'s MixedPrecisionPolicy)."""
    return DTYPE_BYTES[setup.compute] if setup.sharded else adapter_bytes_per_element(setup)


@dataclass(frozen=True)
class ParamBytes:
    weights: int
    gradients: int
    optimizer: int
    base_params: int
    trainable_params: int
    root_gradients: int  # gradients of the embeddings, final norm and LM head (full fine-tuning)
    layer_gradients: int  # gradients of one decoder layer (its weights, or its adapters)


def param_bytes(shape: ModelShape, setup: TrainSetup) -> ParamBytes:
    """Weights, gradients and optimizer states one GPU holds (exact for torch AdamW / SGD and peft LoRA)."""
    c = DTYPE_BYTES[setup.dtype]
    world = setup.gpus if setup.sharded else 1
    states = OPTIMIZER_STATES[setup.optimizer]
    root = sum(_sharded_numel(s, world) for s in shape.root_param_shapes())
    layer = sum(_sharded_numel(s, world) for s in shape.layer_param_shapes())
    base_bytes = (root + shape.num_layers * layer) * c
    if setup.lora_rank:
        a = adapter_bytes_per_element(setup)
        adapters = shape.lora_shapes(setup.lora_rank, lora_targets(setup))
        adapter_bytes = sum(_sharded_numel(s, world) for s in adapters) * a
        trainable_bytes, root_grads = adapter_bytes, 0
        layer_grads = adapter_bytes // shape.num_layers
        weights = base_bytes + adapter_bytes
        trainable = sum(math.prod(s) for s in adapters)
    else:
        weights = trainable_bytes = base_bytes
        root_grads, layer_grads = root * c, layer * c
        trainable = shape.num_params()
    return ParamBytes(weights=weights, gradients=trainable_bytes, optimizer=states * trainable_bytes,
                      base_params=shape.num_params(), trainable_params=trainable,
                      root_gradients=root_grads, layer_gradients=layer_grads)


# ----------------------------------------------------------------------------------------------
# Activations


def layer_saved_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """Bytes autograd saves per token for one decoder layer (transformers Llama/Qwen layer, SDPA/flash).

    Enumerated op by op (c = compute dtype bytes, a = adapter bytes):
    RMSNorm keeps its fp32 input (4H) and rsqrt (4), plus the normalised
    activation (cH) when its weight trains; a trained linear keeps its input
    (shared by q/k/v and by gate/up); a LoRA linear keeps its input cast to the
    adapter dtype (a copy per module when a != c) and lora_A's output (a r);
    Qwen3's q/k norms keep 4Q + 4 heads (+ cQ trained), 4K + 4 kv heads (+ cK);
    attention keeps q, k, v, its output and an fp32 log-sum-exp per head;
    SwiGLU keeps gate, silu(gate) and up (3cI).
    """
    h, i, q, k = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    c = DTYPE_BYTES[setup.compute]
    full = setup.lora_rank == 0
    targets = set(lora_targets(setup))
    a = adapter_compute_bytes(setup)
    # SDPA with a padding mask (rollouts of different lengths) repeats k/v to every head (transformers'
    # repeat_kv); without padding, and with flash-attn, attention works on the kv heads directly.
    k_attn = q if (setup.attention == "sdpa" and setup.padded) else k

    total = 2 * (4 * h + 4 + (c * h if full else 0))  # two RMSNorms
    if shape.qk_norm:
        total += 4 * q + 4 * shape.num_heads + (c * q if full else 0)
        total += 4 * k + 4 * shape.num_kv_heads + (c * k if full else 0)
    total += c * q + 2 * c * k_attn + c * q + 4 * shape.num_heads  # attention: q, k, v, output, lse
    total += 3 * c * i  # SwiGLU: gate, silu(gate), up

    # Inputs of the linears: y1 -> q/k/v, attention output -> o (already kept above), y2 -> gate/up, p -> down.
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), h), "attn_out": (("o_proj",), q),
              "mlp_in": (("gate_proj", "up_proj"), h), "mlp_mid": (("down_proj",), i)}
    for group, (modules, width) in groups.items():
        keeps_at_c = full or (a == c and any(m in targets for m in modules))
        if keeps_at_c and group != "attn_out":
            total += c * width
        if a != c:
            total += sum(a * width for m in modules if m in targets)
    total += sum(a * setup.lora_rank for _ in targets)  # lora_A outputs
    if setup.attention == "flash" and setup.padded:
        total += c * q  # flash-attn's unpadded output is copied back to the padded layout
    return total


def final_saved_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """The final RMSNorm: fp32 input, rsqrt, and the normalised activation when its weight trains."""
    c = DTYPE_BYTES[setup.compute]
    return 4 * shape.hidden_size + 4 + (c * shape.hidden_size if setup.lora_rank == 0 else 0)


def backward_working_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """Gradient buffers alive while one layer is differentiated (fitted to measured CPU peaks, conservative)."""
    c = DTYPE_BYTES[setup.compute]
    g = 4 if (setup.lora_rank or c == 4) else c
    return (2 * shape.hidden_size + 2 * shape.intermediate_size) * g


def attention_mask_bytes_per_layer(setup: TrainSetup) -> int:
    """SDPA turns the boolean padding mask into an additive one of the compute dtype, kept per layer."""
    if setup.attention != "sdpa" or not setup.padded:
        return 0
    t = setup.sequence_tokens
    return setup.sequences_per_micro_batch * t * t * DTYPE_BYTES[setup.compute]


@dataclass(frozen=True)
class ActivationBytes:
    stash_per_layer: int  # kept from a layer's forward to its backward: its input (checkpointing) or all it saves
    stash: int  # all layers' stash
    final: int  # final norm + the head's input rows
    layer_backward: int  # one layer recomputed (checkpointing) + the backward working set


def activation_bytes(shape: ModelShape, setup: TrainSetup) -> ActivationBytes:
    c = DTYPE_BYTES[setup.compute]
    n = setup.tokens_per_micro_batch
    per_layer = layer_saved_bytes_per_token(shape, setup) * n + attention_mask_bytes_per_layer(setup)
    working = backward_working_bytes_per_token(shape, setup) * n
    if setup.gradient_checkpointing:
        stash_per_layer = n * shape.hidden_size * c
        layer_backward = per_layer + working
    else:
        stash_per_layer = per_layer
        layer_backward = working
    head_rows = setup.head_rows_fused if setup.head == "fused" else n
    final = final_saved_bytes_per_token(shape, setup) * n + head_rows * shape.hidden_size * c
    return ActivationBytes(stash_per_layer=stash_per_layer, stash=shape.num_layers * stash_per_layer,
                           final=final, layer_backward=layer_backward)


# ----------------------------------------------------------------------------------------------
# Loss head


def naive_head_bytes(rows: int, vocab: int, dtype: str) -> int:
    """``N * V * (c + 4 + 4 + 4)``: logits as the model returns them (held through backward), their fp32
    log-softmax (kept for backward), the gather's dense fp32 gradient, and the fp32 gradient of the logits.
    For fp32 models the upcast is a no-op but the four N x V tensors are the same."""
    return rows * vocab * (DTYPE_BYTES[dtype] + 12)


def fused_head_bytes(rows: int, hidden: int, vocab: int, dtype: str, score_values: int,
                     head_trainable: bool, tile_bytes: int = FUSED_TILE_BYTES) -> int:
    """O(rows) + one tile (+ fp32 dW [V, H] when the LM head trains).

    Per row: fp32 copies of the hidden row used by the matmuls and the fp32 dh
    accumulator (3 x 4H, what the chunked torch backend holds; the Triton
    kernels need less), dh itself (cH), and fp32 statistics (lse, target
    log-prob, entropy, score log-probs and their gradients, expected score, errors).
    """
    return rows * fused_head_bytes_per_row(hidden, dtype, score_values) + tile_bytes + (
        vocab * hidden * 4 if head_trainable else 0)


def fused_head_bytes_per_row(hidden: int, dtype: str, score_values: int) -> int:
    return hidden * (12 + DTYPE_BYTES[dtype]) + 4 * (12 + 4 * score_values)


def head_held_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Head tensors still alive while the decoder is differentiated: the naive trainer's logits (held by
    the model output it keeps); the fused head keeps nothing of size N x V."""
    if setup.head == "naive":
        return setup.tokens_per_micro_batch * shape.vocab_size * DTYPE_BYTES[setup.compute]
    return 0


def loss_head_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    if setup.head == "naive":
        return naive_head_bytes(setup.tokens_per_micro_batch, shape.vocab_size, setup.compute)
    return fused_head_bytes(setup.head_rows_fused, shape.hidden_size, shape.vocab_size, setup.compute,
                            setup.score_values, head_trainable=setup.lora_rank == 0,
                            tile_bytes=fused_workspace_bytes(shape, setup))


def fused_workspace_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """The fused head's workspace: ``setup.fused_tile_bytes``, or what the kernels report for these rows.

    ``real train`` runs the head in loss mode (``judge_loss``): one chunk of logits on the GPU; the fp32
    ``dW`` it also holds is counted by ``fused_head_bytes`` when the head trains."""
    if setup.fused_tile_bytes is not None:
        return setup.fused_tile_bytes
    return head_workspace_bytes(setup.head_rows_fused, shape.vocab_size, shape.hidden_size, setup.compute,
                                mode="loss", device_type="cuda", weight_grad=False)


# ----------------------------------------------------------------------------------------------
# FSDP buffers and rollouts


def fsdp_buffer_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Unsharded root unit for the whole step + two unsharded layers + one layer's unsharded gradients, in
    the compute dtype (mixed precision: the gradients also in fp32 for the reduce-scatter).  Not sharded
    but mixed (autocast): the compute-dtype copy of every weight, which autocast caches for the step."""
    if not setup.sharded:
        return shape.num_params() * DTYPE_BYTES[setup.compute] if setup.mixed else 0
    c = DTYPE_BYTES[setup.compute]
    root = sum(math.prod(s) for s in shape.root_param_shapes()) * c
    layer = sum(math.prod(s) for s in shape.layer_param_shapes()) * c
    if setup.lora_rank:
        adapters_per_layer = sum(math.prod(s) for s in shape.lora_shapes(setup.lora_rank, lora_targets(setup)))
        adapters_per_layer //= shape.num_layers
        layer += adapters_per_layer * c  # all-gathered in the compute dtype (MixedPrecisionPolicy)
        layer_grads = adapters_per_layer * 4
    else:
        layer_grads = layer + (layer // c * 4 if setup.mixed else 0)
    return root + 2 * layer + layer_grads


@dataclass(frozen=True)
class RolloutBytes:
    kv_cache: int
    prefill: int


def rollout_bytes(shape: ModelShape, setup: TrainSetup) -> RolloutBytes:
    """KV cache of every sequence generated at once, and the prefill working set of one layer (transformers
    ``generate`` on the trained model; a vLLM engine's memory is ``vllm_engine_bytes``)."""
    if not setup.rollout_on_gpu or setup.rollout_engine != "hf":
        return RolloutBytes(0, 0)
    c = DTYPE_BYTES[setup.compute]
    seqs = setup.generation_batch or setup.rollouts
    kv = seqs * setup.sequence_tokens * 2 * shape.num_layers * shape.kv_dim * c
    prompt_tokens = seqs * setup.prompt_tokens
    prefill = prompt_tokens * (3 * shape.intermediate_size + 2 * shape.hidden_size) * c + seqs * shape.vocab_size * 4
    return RolloutBytes(kv_cache=kv, prefill=prefill)


@dataclass(frozen=True)
class VLLMEngineBytes:
    """One GPU's share of a vLLM engine.  vLLM takes ``gpu_memory_utilization`` of the GPU when it starts
    (weights, its activation peak, and the rest as KV cache blocks); sequences beyond what the KV cache
    holds wait their turn (slower, not out of memory)."""

    budget: int  # what the engine holds on a trainer GPU while it samples (0: on other GPUs)
    held_while_training: int  # what it keeps while the trainer trains (0 asleep, level 2)
    weights: int  # the full (merged) model in the compute dtype, split over tensor-parallel GPUs
    kv_per_sequence: int  # one prompt + CoT's KV cache on one GPU
    kv_wanted: int  # KV cache for every sequence of a rollout at once (an engine serves its TP ranks' prompts)
    kv_room: int  # budget - weights: the KV cache the engine can hold

    @property
    def sequences_at_once(self) -> int:
        return max(0, self.kv_room) // self.kv_per_sequence if self.kv_per_sequence else 0


def vllm_engine_bytes(shape: ModelShape, setup: TrainSetup) -> VLLMEngineBytes:
    """The vLLM engine's bytes per GPU (colocated on the trainer's GPUs, or a server's GPU for
    ``vllm-server``), in 16-bit.  Its own activation peak and CUDA graphs come out of the KV share and are not
    counted separately."""
    if setup.rollout_engine == "hf":
        return VLLMEngineBytes(0, 0, 0, 0, 0, 0)
    c = 2  # the engine samples in bf16 / fp16 whatever the trainer keeps (real.loop.vllm_rollout)
    tp = setup.vllm_tensor_parallel_size
    weights = shape.num_params() * c // tp
    kv_per_sequence = setup.sequence_tokens * 2 * shape.num_layers * shape.kv_dim * c // tp
    seqs = setup.generation_batch or setup.rollouts
    budget = int(setup.vllm_gpu_memory_utilization * setup.gpu_memory_gib * GIB)
    colocated = setup.rollout_engine == "vllm-colocate"
    return VLLMEngineBytes(budget=budget if colocated else 0,
                           held_while_training=budget if colocated and not setup.vllm_sleep else 0,
                           weights=weights, kv_per_sequence=kv_per_sequence, kv_wanted=seqs * tp * kv_per_sequence,
                           kv_room=budget - weights)

