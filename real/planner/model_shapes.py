"""Model shapes for `real plan`: the numbers of a decoder-only transformers config that decide memory.

``ModelShape`` holds them (and derives every parameter's shape from them),
``shape_from_config`` reads a ``config.json`` dict (qwen3, qwen2, llama,
mistral), ``load_shape`` a preset name, a ``config.json`` file or a folder
holding one; ``PRESETS`` are the real configs of the models the planner knows
by name.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

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
