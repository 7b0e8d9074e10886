"""Scratch memory of one head call, from the kernels' own tile constants (for memory planners).

``head_workspace_bytes`` is what a head call allocates besides its inputs, its
per-row outputs and the gradients it returns, so a planner (``real plan``)
need not restate tile sizes:

- ``mode="head"`` (``judge_head`` / ``linear_logprobs``, the recomputing
  design): the chunked torch backend streams ``token_chunk x vocab_chunk``
  fp32 logits through one tile (``torch_backend.tile_chunks``, at most
  ``DEFAULT_TILE_ELEMS`` elements); the Triton kernels keep their tiles in
  registers and shared memory, so this is the larger of the two.
- ``mode="loss"`` (``judge_loss``, gradients formed in the forward,
  docs/design.md section 6; also the Triton head's chunked passes, which
  compute the logits through the same chunks): ``chunk_size`` rows (default
  ``ops.chunk_plan.default_chunk_size``) of fp32 logits over the whole
  vocabulary (on every backend), plus, when the LM head trains
  (``weight_grad``), the fp32 ``dW`` ``[V, H]`` accumulator and, for bf16 /
  fp16, one ``[DW_TILE_ROWS, H]`` GEMM result on its way into it (an upper
  bound: with torch's fp32-output GEMMs on CUDA there is none).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .core.grad_gemms import DW_TILE_ROWS
from .core.sizing import LOGIT_BYTES, default_chunk_size
from .torch_backend import DEFAULT_TILE_ELEMS, tile_chunks

HEAD_MODES = ("head", "loss")
MAX_TILE_BYTES = DEFAULT_TILE_ELEMS * 4  # the torch backend's largest fp32 logits tile
_NAMED_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _element_size(dtype: Union[str, torch.dtype]) -> int:
    if isinstance(dtype, str):
        if dtype not in _NAMED_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_NAMED_DTYPES)} or a torch.dtype, got {dtype!r}")
        dtype = _NAMED_DTYPES[dtype]
    return torch.empty((), dtype=dtype).element_size()


def head_workspace_bytes(n_rows: int, vocab: int, hidden: int, dtype: Union[str, torch.dtype] = torch.float32,
                         mode: str = "head", chunk_size: Optional[int] = None, device_type: str = "cuda",
                         weight_grad: bool = True) -> int:
    """Bytes of scratch memory one head call over ``n_rows`` rows needs (see the module docstring)."""
    if n_rows < 1 or vocab < 1 or hidden < 1:
        raise ValueError(f"n_rows, vocab and hidden must be >= 1, got {n_rows}, {vocab}, {hidden}")
    if mode == "head":
        token_chunk, vocab_chunk = tile_chunks(n_rows, vocab, DEFAULT_TILE_ELEMS)
        return token_chunk * vocab_chunk * 4
    if mode == "loss":
        element = _element_size(dtype) if device_type == "cuda" else 4
        rows = min(n_rows, chunk_size or default_chunk_size(n_rows, vocab, torch.device(device_type)))
        dw = vocab * hidden * 4 if weight_grad else 0
        dw_tile = min(vocab, DW_TILE_ROWS) * hidden * element if weight_grad and element != 4 else 0
        return rows * vocab * LOGIT_BYTES + dw + dw_tile
    raise ValueError(f"mode must be one of {HEAD_MODES}, got {mode!r}")
