"""How many rows of logits one chunk holds, and which rows go together: a pure function of the shapes.

Loss mode (``judge_loss``) and ``judge_head``'s chunked passes write a chunk's
logits over the whole vocabulary into one ``[rows, V]`` buffer.  The size is a
trade: large chunks keep the three GEMMs efficient and the fp32 ``dW``
read-modify-writes few; the buffer must still fit.  The plan:

- at most a quarter of N rows (the buffer stays <= N V / 4 elements), and at
  most ``CPU_CHUNK_BYTES`` / ``GPU_CHUNK_BYTES`` of fp32 logits;
- on CUDA also at most a quarter of the free device memory
  (``torch.cuda.mem_get_info``; the rest is for ``dW``, ``dh`` and the caller);
- then N split into equal chunks whose size is a multiple of 128 rows (what the
  GEMM tiles and the row-per-program kernels fill in whole waves): N = 16,384,
  V = 151,936 gives 4 x 4,096 rows (2.5 GB of fp32 logits each, with >= 10 GB
  free), not 3,456-row chunks plus a tail;
- ``row_groups`` (sizes of consecutive groups of rows, e.g. one sequence's
  score row and CoT rows) are never split: whole groups are packed greedily
  into chunks of up to the planned size, and a group larger than that gets a
  chunk of its own.

This module imports only torch, so ``real_kernels/ops`` and callers that plan
ahead (``real_kernels.plan_chunks``) can both use it.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence

import torch

LOGIT_BYTES = 4  # the chunk buffer holds fp32 logits on every backend (bf16 dlogits go over its rows' first halves)
CPU_CHUNK_BYTES = 1 << 29  # one chunk's logits on the CPU: 512 MiB at most
GPU_CHUNK_BYTES = 1 << 32  # one chunk's logits on CUDA: 4 GiB at most (7,067 rows at V = 151,936)
FREE_MEMORY_SHARE = 4  # the buffer takes at most 1 / FREE_MEMORY_SHARE of the free device memory
ROW_MULTIPLE = 128


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory of a CUDA device that is present, else None (no bound from free memory).

    The driver's free memory plus what PyTorch's caching allocator holds reserved but unused: after a
    training step most of the device is reserved by the allocator and free to it, not to the driver.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


def default_chunk_size(n: int, vocab: int, device: torch.device, dtype: Optional[torch.dtype] = None,
                       free_bytes: Optional[int] = None) -> int:
    """Rows per chunk (see the module docstring); ``free_bytes=None`` asks the device when it is CUDA.

    ``dtype`` (the inputs') does not change the plan today: every backend's buffer holds fp32 logits.
    """
    device = torch.device(device)
    budget = GPU_CHUNK_BYTES if device.type == "cuda" else CPU_CHUNK_BYTES
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
    if free_bytes is not None:
        budget = min(budget, max(0, int(free_bytes)) // FREE_MEMORY_SHARE)
    max_rows = min(max(1, n // 4), max(1, budget // (vocab * LOGIT_BYTES)))
    if max_rows < 2 * ROW_MULTIPLE:
        return max_rows
    max_rows -= max_rows % ROW_MULTIPLE
    chunks = -(-n // max_rows)
    rows = -(-n // chunks)
    return min(max_rows, -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE)


def chunk_buffer_fits(n: int, vocab: int, device, free_bytes: Optional[int] = None) -> bool:
    """Whether a ``[min(n, 128), V]`` fp32 logits buffer fits in the memory share (``judge_head``'s ``memory="auto"``).

    ``free_bytes=None`` asks a CUDA device; without one (the CPU) there is no bound from free memory.
    """
    if free_bytes is None:
        free_bytes = free_device_bytes(torch.device(device))
    if free_bytes is None:
        return True
    return min(n, ROW_MULTIPLE) * vocab * LOGIT_BYTES <= max(0, int(free_bytes)) // FREE_MEMORY_SHARE


def plan_chunks(n: int, vocab: int, device, dtype: Optional[torch.dtype] = None, *,
                row_groups: Optional[Sequence[int]] = None, chunk_size: Optional[int] = None,
                free_bytes: Optional[int] = None) -> List[slice]:
    """The row slices ``judge_loss`` (and ``judge_head``'s chunked passes) run, in order, covering ``[0, n)``.

    ``chunk_size`` rows per chunk, or ``default_chunk_size`` (sized from ``free_bytes``, or from the
    device's free memory on CUDA when it is None).  ``row_groups``: sizes of consecutive row groups
    that no chunk may split (they must sum to ``n``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be an int >= 1, got {vocab!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    groups = _check_row_groups(row_groups, n)
    size = chunk_size or default_chunk_size(n, vocab, torch.device(device), dtype, free_bytes)
    if groups is None:
        return [slice(r0, min(n, r0 + size)) for r0 in range(0, n, size)]
    plan: List[slice] = []
    start = end = 0
    for g in groups:
        if end > start and end + g - start > size:
            plan.append(slice(start, end))
            start = end
        end += g
    if end > start:
        plan.append(slice(start, end))
    return plan


def _check_row_groups(row_groups, n: int) -> Optional[List[int]]:
    if row_groups is None:
        return None
    if isinstance(row_groups, torch.Tensor):
        if row_groups.dim() != 1 or row_groups.dtype.is_floating_point or row_groups.dtype == torch.bool:
            raise ValueError(f"row_groups must be a 1-D integer sequence, got a tensor of shape "
                             f"{tuple(row_groups.shape)} and dtype {row_groups.dtype}")
        row_groups = row_groups.tolist()
    try:
        groups = list(row_groups)
    except TypeError:
        raise TypeError(f"row_groups must be a sequence of ints, got {type(row_groups).__name__}") from None
    for i, g in enumerate(groups):
        try:
            groups[i] = operator.index(g) if not isinstance(g, bool) else -1
        except TypeError:
            groups[i] = -1
        if groups[i] < 1:
            raise ValueError(f"row_groups must hold positive ints (group sizes), got {g!r}")
    if sum(groups) != n:
        raise ValueError(f"row_groups must sum to the number of rows ({n}), got sum {sum(groups)}")
    return groups
