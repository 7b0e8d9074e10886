"""The arithmetic of `real plan`: how many bytes one GPU holds while training a judge.

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
  statistics, plus one vocabulary tile, plus an fp32 ``dW`` ``[V, H]``
  accumulator when the LM head is trained.  The naive head runs over every position (``model(...)``
  returns logits for all of them); the fused head over the CoT rows and one
  score row per sequence (what ``real_kernels.hf.judge_outputs`` sends it).
- **rollout KV cache** when generation runs on the same GPU (transformers
  ``generate``): ``2 * layers * kv_heads * head_dim * c`` bytes per token of
  every sequence generated at once, plus the prefill working set of one layer.
  Rollout and training do not overlap in time, so the peak is
  ``persistent + max(training step, rollout)``.
- **FSDP gather buffers** (more than one GPU with FSDP): the unsharded root
  unit (embeddings, LM head, final norm) for the whole step plus two decoder
  layers (the current one and the prefetched next), and one layer's unsharded
  gradients before their reduce-scatter.
- **reserve**: CUDA context and allocator slack, a fixed user-settable amount.

Not counted: rotary tables, position ids and masks other than SDPA's, CPU-side
tensors, NCCL buffers beyond the gather buffers, fragmentation beyond the reserve.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "sgd")
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # per-element state tensors (SGD with momentum)
PARALLEL_MODES = ("fsdp", "ddp")
HEADS = ("fused", "naive")
ATTENTION = ("sdpa", "flash")
LORA_TARGET_SETS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
FUSED_TILE_BYTES = (1 << 22) * 4  # one fp32 tile of 4M logits (real_kernels' torch backend); Triton needs none
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")

# Real config.json numbers of the presets (Hugging Face model cards' config.json).
PRESETS: Dict[str, dict] = {
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, attention_bias=False),
    "qwen3-14b": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=17408,
                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False, attention_bias=False),
    "qwen3-32b": dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                      num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      tie_word_embeddings=False, attention_bias=False),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    # Mistral-7B-Instruct-v0.2 (the base of Prometheus 2 7B): 32k vocabulary, no sliding window.
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       tie_word_embeddings=False),
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformers config that decide memory."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> Dict[str, Tuple[int, int, bool]]:
        """Per decoder layer: module name -> (in_features, out_features, has_bias)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias),
            "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias),
            "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }

    def layer_param_shapes(self) -> List[Tuple[int, ...]]:
        """Shapes of one decoder layer's parameters (weights, biases, norms)."""
        shapes: List[Tuple[int, ...]] = []
        for fan_in, fan_out, bias in self.linears().values():
            shapes.append((fan_out, fan_in))
            if bias:
                shapes.append((fan_out,))
        shapes += [(self.hidden_size,), (self.hidden_size,)]  # input and post-attention RMSNorm
        if self.qk_norm:
            shapes += [(self.head_dim,), (self.head_dim,)]
        return shapes

    def root_param_shapes(self) -> List[Tuple[int, ...]]:
        """Embeddings, final norm and (untied) LM head: the parameters outside the decoder layers."""
        shapes = [(self.vocab_size, self.hidden_size), (self.hidden_size,)]
        if not self.tie_word_embeddings:
            shapes.append((self.vocab_size, self.hidden_size))
        return shapes

    def param_shapes(self) -> List[Tuple[int, ...]]:
        return self.root_param_shapes() + self.layer_param_shapes() * self.num_layers

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes())

    def lora_shapes(self, rank: int, targets: Sequence[str]) -> List[Tuple[int, ...]]:
        """peft LoRA: ``lora_A [r, in]`` and ``lora_B [out, r]`` for every targeted linear of every layer."""
        linears = self.linears()
        per_layer = []
        for name in targets:
            fan_in, fan_out, _ = linears[name]
            per_layer += [(rank, fan_in), (fan_out, rank)]
        return per_layer * self.num_layers


def _require(config: dict, key: str, source: str):
    if key not in config:
        raise ValueError(f"{source}: config has no {key!r}; it is needed to size the model")
    return config[key]


def shape_from_config(config: dict, name: str = "custom") -> ModelShape:
    """A ``ModelShape`` from a transformers ``config.json`` dict (qwen3, qwen2, llama, mistral)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name}: model_type {model_type!r} is not supported by the planner "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    hidden = int(_require(config, "hidden_size", name))
    heads = int(_require(config, "num_attention_heads", name))
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias = bool(config.get("attention_bias", False))
    return ModelShape(
        name=name,
        model_type=model_type,
        vocab_size=int(_require(config, "vocab_size", name)),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "intermediate_size", name)),
        num_layers=int(_require(config, "num_hidden_layers", name)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Qwen3 and Llama follow attention_bias (o_proj too).
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type in ("qwen3", "llama") else False,
        mlp_bias=bool(config.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
    )


def load_shape(model: str) -> ModelShape:
    """A preset name (``qwen3-32b`` ...), a ``config.json`` path, or a folder holding one."""
    key = model.lower()
    if key in PRESETS:
        return shape_from_config(PRESETS[key], name=key)
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(
            f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file or a folder with one"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type")}
    return shape_from_config(config, name=path)


@dataclass
class TrainSetup:
    """What is trained, how, on how many GPUs: the planner's inputs (CLI flags of `real plan`)."""

    gpus: int = 1
    gpu_memory_gib: float = 80.0
    parallel: str = "fsdp"
    dtype: str = "bf16"
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
    score_values: int = 5
    reserve_gib: float = 1.0
    fused_tile_bytes: int = FUSED_TILE_BYTES

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
        choices = {"parallel": PARALLEL_MODES, "dtype": tuple(DTYPE_BYTES), "optimizer": OPTIMIZERS,
                   "head": HEADS, "attention": ATTENTION, "lora_targets": tuple(LORA_TARGET_SETS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.sequence_tokens:
            raise ValueError(
                f"micro_batch_tokens={self.micro_batch_tokens} is smaller than one sequence "
                f"({self.prompt_tokens} prompt + {self.cot_tokens} CoT tokens)"
            )

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
    gathers every parameter of a unit in the compute dtype (``real.distributed``'s MixedPrecisionPolicy)."""
    return DTYPE_BYTES[setup.dtype] if setup.sharded else adapter_bytes_per_element(setup)


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
    c = DTYPE_BYTES[setup.dtype]
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
    c = DTYPE_BYTES[setup.dtype]
    return 4 * shape.hidden_size + 4 + (c * shape.hidden_size if setup.lora_rank == 0 else 0)


def backward_working_bytes_per_token(shape: ModelShape, setup: TrainSetup) -> int:
    """Gradient buffers alive while one layer is differentiated (fitted to measured CPU peaks, conservative)."""
    c = DTYPE_BYTES[setup.dtype]
    g = 4 if (setup.lora_rank or c == 4) else c
    return (2 * shape.hidden_size + 2 * shape.intermediate_size) * g


def attention_mask_bytes_per_layer(setup: TrainSetup) -> int:
    """SDPA turns the boolean padding mask into an additive one of the compute dtype, kept per layer."""
    if setup.attention != "sdpa" or not setup.padded:
        return 0
    t = setup.sequence_tokens
    return setup.sequences_per_micro_batch * t * t * DTYPE_BYTES[setup.dtype]


@dataclass(frozen=True)
class ActivationBytes:
    stash_per_layer: int  # kept from a layer's forward to its backward: its input (checkpointing) or all it saves
    stash: int  # all layers' stash
    final: int  # final norm + the head's input rows
    layer_backward: int  # one layer recomputed (checkpointing) + the backward working set


def activation_bytes(shape: ModelShape, setup: TrainSetup) -> ActivationBytes:
    c = DTYPE_BYTES[setup.dtype]
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
        return setup.tokens_per_micro_batch * shape.vocab_size * DTYPE_BYTES[setup.dtype]
    return 0


def loss_head_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    if setup.head == "naive":
        return naive_head_bytes(setup.tokens_per_micro_batch, shape.vocab_size, setup.dtype)
    return fused_head_bytes(setup.head_rows_fused, shape.hidden_size, shape.vocab_size, setup.dtype,
                            setup.score_values, head_trainable=setup.lora_rank == 0,
                            tile_bytes=setup.fused_tile_bytes)


# ----------------------------------------------------------------------------------------------
# FSDP buffers and rollouts


def fsdp_buffer_bytes(shape: ModelShape, setup: TrainSetup) -> int:
    """Unsharded root unit for the whole step + two unsharded layers + one layer's unsharded gradients."""
    if not setup.sharded:
        return 0
    c = DTYPE_BYTES[setup.dtype]
    root = sum(math.prod(s) for s in shape.root_param_shapes()) * c
    layer = sum(math.prod(s) for s in shape.layer_param_shapes()) * c
    if setup.lora_rank:
        adapters_per_layer = sum(math.prod(s) for s in shape.lora_shapes(setup.lora_rank, lora_targets(setup)))
        adapters_per_layer //= shape.num_layers
        layer += adapters_per_layer * c  # all-gathered in the compute dtype (MixedPrecisionPolicy)
        layer_grads = adapters_per_layer * 4
    else:
        layer_grads = layer
    return root + 2 * layer + layer_grads


@dataclass(frozen=True)
class RolloutBytes:
    kv_cache: int
    prefill: int


def rollout_bytes(shape: ModelShape, setup: TrainSetup) -> RolloutBytes:
    """KV cache of every sequence generated at once, and the prefill working set of one layer."""
    if not setup.rollout_on_gpu:
        return RolloutBytes(0, 0)
    c = DTYPE_BYTES[setup.dtype]
    seqs = setup.generation_batch or setup.rollouts
    kv = seqs * setup.sequence_tokens * 2 * shape.num_layers * shape.kv_dim * c
    prompt_tokens = seqs * setup.prompt_tokens
    prefill = prompt_tokens * (3 * shape.intermediate_size + 2 * shape.hidden_size) * c + seqs * shape.vocab_size * 4
    return RolloutBytes(kv_cache=kv, prefill=prefill)


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Row:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
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


def plan(shape: ModelShape, setup: TrainSetup) -> Plan:
    """Per-GPU bytes of every component, the training and rollout peaks, and whether it fits."""
    setup.validate()
    c = DTYPE_BYTES[setup.dtype]
    params = param_bytes(shape, setup)
    acts = activation_bytes(shape, setup)
    head = loss_head_bytes(shape, setup)
    fsdp = fsdp_buffer_bytes(shape, setup)
    roll = rollout_bytes(shape, setup)
    reserve = int(setup.reserve_gib * GIB)
    n = setup.tokens_per_micro_batch
    seqs = setup.sequences_per_micro_batch
    share = f" / {setup.gpus} GPUs" if setup.sharded else ""

    lora = f"LoRA r={setup.lora_rank} ({setup.lora_targets}), fp32 adapters" if setup.lora_rank else "full fine-tuning"
    if setup.head == "naive":
        head_note = (f"N={n:,} rows x V={shape.vocab_size:,} x {c + 12} B (logits {c} B + fp32 log-softmax 4 B "
                     f"+ gather grad 4 B + logits grad 4 B)")
    else:
        head_note = (f"{setup.head_rows_fused:,} CoT+score rows x "
                     f"{fused_head_bytes_per_row(shape.hidden_size, setup.dtype, setup.score_values):,} B"
                     f" + one {setup.fused_tile_bytes / 2**20:g} MiB tile" + (" + fp32 dW [V, H]" if setup.lora_rank == 0 else ""))
    if setup.gradient_checkpointing:
        stash_label, stash_note = "activations: checkpointed layer inputs", f"{shape.num_layers} layers x N x H x {c} B"
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
        Row("fsdp_buffers", "FSDP all-gather buffers", fsdp,
            "root unit + 2 layers unsharded + 1 layer of unsharded grads" if fsdp else "not sharded"),
        Row("activations_stash", stash_label, acts.stash, stash_note),
        Row("activations_final", "activations: final norm + head input", acts.final, ""),
        Row("activations_layer", layer_label, acts.layer_backward,
            f"+ {backward_working_bytes_per_token(shape, setup):,} B/token working set"),
        Row("loss_head", f"loss head ({setup.head})", head, head_note),
        Row("rollout_kv_cache", "rollout KV cache", roll.kv_cache,
            f"{setup.generation_batch or setup.rollouts} seqs x {setup.sequence_tokens:,} tokens x "
            f"{2 * shape.num_layers * shape.kv_dim * c:,} B" if roll.kv_cache else "generation elsewhere"),
        Row("rollout_prefill", "rollout prefill working set", roll.prefill, "one layer's MLP on the prompts"),
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
    train_peak = persistent + train_step
    rollout_peak = persistent + roll.kv_cache + roll.prefill
    peak = max(train_peak, rollout_peak)
    capacity = int(setup.gpu_memory_gib * GIB)
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
    }
    return Plan(model=shape.name, setup=asdict(setup), rows=rows, train_step=train_step, train_peak=train_peak,
                rollout_peak=rollout_peak, peak=peak, capacity=capacity, fits=peak <= capacity, facts=facts)
