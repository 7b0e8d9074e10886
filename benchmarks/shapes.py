"""Benchmark shapes and the named presets (``--preset``).

A shape is one LM-head problem: ``N`` token rows, hidden size ``H``, vocabulary
``V`` and the input dtype.  A preset is a sweep over ``N`` at one ``(H, V,
dtype)`` plus the operations, providers and repetitions that make it finish in
the time its description promises.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

QWEN3_VOCAB = 151_936

ALL_PROVIDERS = ("naive", "torch", "triton", "loss", "liger", "cce")
# variants of two of them, timed by gpu_check's forward/backward section only: judge_head with memory="low",
# Liger with accum_dtype=torch.float32
VARIANT_PROVIDERS = ("triton-low", "liger-fp32")
ALL_OPS = ("logprobs-fwd", "logprobs-fwdbwd", "judge-fwdbwd")


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; ValueError naming --dtype for anything unknown."""
    key = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {name!r}")
    return key


@dataclass(frozen=True)
class Shape:
    """One problem size: ``hidden [n, hidden]`` against ``weight [vocab, hidden]``."""

    n: int
    hidden: int
    vocab: int
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("n", "hidden", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shape {name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"shape dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config_key(self) -> Tuple[int, int, str]:
        """What stays fixed along one N sweep (one table, one plot)."""
        return (self.hidden, self.vocab, self.dtype)

    def label(self) -> str:
        return f"N={self.n} H={self.hidden} V={self.vocab} {self.dtype}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    device: str  # "cpu" or "cuda": where the preset is meant to run
    n_values: Tuple[int, ...]
    hidden: int
    vocab: int
    dtype: str
    repeats: int
    warmup: int = 1
    providers: Tuple[str, ...] = ALL_PROVIDERS
    ops: Tuple[str, ...] = ALL_OPS
    extra: Dict[str, str] = field(default_factory=dict)

    def shapes(self) -> List[Shape]:
        return [Shape(n, self.hidden, self.vocab, self.dtype) for n in self.n_values]

    def with_overrides(self, *, n_values: Sequence[int] | None = None, hidden: int | None = None,
                       vocab: int | None = None, dtype: str | None = None) -> "Preset":
        changes = {}
        if n_values is not None:
            changes["n_values"] = tuple(n_values)
        if hidden is not None:
            changes["hidden"] = hidden
        if vocab is not None:
            changes["vocab"] = vocab
        if dtype is not None:
            changes["dtype"] = canonical_dtype(dtype)
        if not changes:
            return self
        return replace(self, name="custom", description=f"{self.name} with overrides", **changes)


_GPU_N_SWEEP = (2048, 4096, 8192, 16384, 32768, 65536)

PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "cpu-quick", "smoke sweep, about a minute on 2 CPU cores", "cpu",
            n_values=(128, 512), hidden=256, vocab=32_000, dtype="float32", repeats=5,
        ),
        Preset(
            "cpu", "the CPU table of the README: Qwen3 vocabulary, small hidden size", "cpu",
            n_values=(512, 1024, 2048), hidden=512, vocab=QWEN3_VOCAB, dtype="float32", repeats=3,
        ),
        Preset(
            "gpu-8b", "Qwen3-8B head (H=4096), bf16, N sweep to 65,536", "cuda",
            n_values=_GPU_N_SWEEP, hidden=4096, vocab=QWEN3_VOCAB, dtype="bfloat16", repeats=5,
        ),
        Preset(
            "gpu-32b", "Qwen3-32B head (H=5120), bf16, N sweep to 65,536", "cuda",
            n_values=_GPU_N_SWEEP, hidden=5120, vocab=QWEN3_VOCAB, dtype="bfloat16", repeats=5,
        ),
    )
}


def default_preset_name(cuda_available: bool) -> str:
    return "gpu-8b" if cuda_available else "cpu-quick"


def parse_int_list(text: str, flag: str) -> List[int]:
    """'512,1024' -> [512, 1024]; ValueError naming the flag on anything else."""
    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{flag} must be a comma-separated list of positive integers, got {text!r}")
    return values


def parse_choice_list(text: str, flag: str, choices: Sequence[str]) -> List[str]:
    """'naive,torch' -> ['naive', 'torch'] in the given order; 'all' -> every choice."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(choices)
    unknown = [n for n in names if n not in choices]
    if not names or unknown:
        raise ValueError(f"{flag} must be a comma-separated subset of {list(choices)} (or 'all'), got {text!r}")
    return list(dict.fromkeys(names))
