"""Block sizes of the Triton head's forward, and how they are chosen.

Under the CPU interpreter programs run one after another on numpy, so one
large configuration is fastest.  On CUDA the forward's tile configuration is
autotuned once per (row bucket, hidden size, vocabulary, dtype) over
``SM90_CONFIGS`` (``SM90_FP32_CONFIGS`` for fp32) (timed with CUDA events on the first call, then cached); the
compile check lowers every entry of that list at the benchmark shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import triton
from triton.runtime.errors import OutOfResources


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class BlockConfig:
    block_n: int
    block_v: int
    block_d: int
    vocab_splits: Optional[int] = None  # None: enough splits to fill the device
    num_warps: int = 8
    num_stages: int = 2
    group_n: int = 8  # row blocks whose programs run side by side (they share the L2-resident h blocks)
    chunk_rows: Optional[int] = None  # backward: rows of logits recomputed at a time (None: default_chunk_size)


# Hopper, bf16 / fp16: 64x128 or 128x64 accumulator tiles for wgmma, 64-wide K slices, 3-4 stages of
# (h, W) slices in shared memory (72-96 KiB < 227 KiB).  Larger tiles (128x128, 64x256) spill registers
# once the online softmax and entropy state sit beside the accumulator (real_kernels.ops.compile_check).
SM90_CONFIGS = (
    BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    BlockConfig(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=4),
    BlockConfig(block_n=128, block_v=64, block_d=64, num_warps=8, num_stages=3),
    BlockConfig(block_n=128, block_v=64, block_d=64, num_warps=8, num_stages=4),
)
# fp32 inputs on the GPU: tf32x3 products (three tf32 wgmmas, fp32-accurate) on 32-wide K slices
SM90_FP32_CONFIGS = (
    BlockConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3),
    BlockConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=3),
)
SM_COUNT_H200 = 132
_TUNED: Dict[Tuple, BlockConfig] = {}


def interpreter_config(d: int) -> BlockConfig:
    return BlockConfig(block_n=64, block_v=256, block_d=min(128, max(16, triton.next_power_of_2(d))), vocab_splits=1)


def gpu_configs(dtype: torch.dtype):
    return SM90_FP32_CONFIGS if dtype == torch.float32 else SM90_CONFIGS


def default_config(n: int, d: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> BlockConfig:
    """The untuned choice (also what the autotuner falls back to)."""
    if interpreting() or device.type not in ("cuda", "meta"):
        return interpreter_config(d)
    return gpu_configs(dtype)[0]


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT_H200 if device.type == "meta" else 1


def vocab_split(n: int, v: int, cfg: BlockConfig, sms: int) -> Tuple[int, int]:
    """(tiles per split, number of splits): every split starts inside the vocabulary.

    Enough splits that one group of ``group_n`` row blocks alone keeps every SM busy twice over.
    """
    tiles = triton.cdiv(v, cfg.block_v)
    if cfg.vocab_splits is not None:
        splits = max(1, min(cfg.vocab_splits, tiles))
    else:
        group = min(cfg.group_n, triton.cdiv(n, cfg.block_n))
        splits = max(1, min(tiles, triton.cdiv(2 * sms, group)))
    per_split = triton.cdiv(tiles, splits)
    return per_split, triton.cdiv(tiles, per_split)


def tuned_config(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device,
                 run: Callable[[BlockConfig], None]) -> BlockConfig:
    """Fastest of ``gpu_configs(dtype)`` for this problem (``run(cfg)`` launches the forward once); cached."""
    if interpreting() or device.type != "cuda":
        return default_config(n, d, device, dtype)
    key = (triton.next_power_of_2(n), d, v, dtype, device.index)
    if key not in _TUNED:
        best, best_ms = None, float("inf")
        for cfg in gpu_configs(dtype):
            try:
                run(cfg)  # compile and warm up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(3):
                    run(cfg)
                end.record()
                torch.cuda.synchronize(device)
                ms = start.elapsed_time(end) / 3
            except OutOfResources:  # a configuration this GPU cannot hold
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _TUNED[key] = best or default_config(n, d, device, dtype)
    return _TUNED[key]


def with_chunk(cfg: BlockConfig, chunk_rows: Optional[int]) -> BlockConfig:
    return cfg if chunk_rows is None else replace(cfg, chunk_rows=chunk_rows)
