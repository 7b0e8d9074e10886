"""The two gradient GEMMs of a chunk, shared by loss mode and the GPU head's backward.

Given a chunk's ``dlogits`` ``dz [C, V]`` (d loss / d raw logits), the chunk's
rows of ``dh`` are ``dz W`` (one GEMM, written in place: each row of ``dh``
belongs to exactly one chunk) and ``dW`` gains ``dz^T h_c``.  ``dW`` is summed
over chunks in fp32 (docs/design.md, "Numerics"): directly by ``addmm`` for
fp32, and for bf16 / fp16 through ``[DW_TILE_ROWS, H]`` GEMM results, each
accumulated in fp32 by the BLAS and rounded once before it is added.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

DW_TILE_ROWS = 16384


class GradBuffers:
    """``dh`` in the compute dtype and ``dW`` in fp32, filled chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype,
                 need_dh: bool, need_dw: bool):
        self.h = hidden.detach().to(compute_dtype)
        self.w = weight.detach().to(compute_dtype)
        n, hdim = hidden.shape
        self.dh = torch.empty(n, hdim, dtype=compute_dtype, device=hidden.device) if need_dh else None
        self.dw32 = None
        if need_dw:
            # fp32 GEMMs write the first chunk's share with out=, so no zero-fill pass is needed
            alloc = torch.empty if compute_dtype == torch.float32 else torch.zeros
            self.dw32 = alloc(weight.shape[0], hdim, dtype=torch.float32, device=hidden.device)

    def add_chunk(self, dz: torch.Tensor, rows: slice, first: bool) -> None:
        if self.dh is not None:
            torch.mm(dz, self.w, out=self.dh[rows])
        if self.dw32 is None:
            return
        h_c = self.h[rows]
        if dz.dtype == torch.float32:
            if first:
                torch.mm(dz.T, h_c, out=self.dw32)
            else:
                self.dw32.addmm_(dz.T, h_c)
            return
        for v0 in range(0, self.dw32.shape[0], DW_TILE_ROWS):
            v1 = min(self.dw32.shape[0], v0 + DW_TILE_ROWS)
            self.dw32[v0:v1].add_(torch.mm(dz[:, v0:v1].T, h_c))

    def finish(self, hidden_dtype: torch.dtype, weight_dtype: torch.dtype
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        dh = None if self.dh is None else self.dh.to(hidden_dtype)
        dw = None if self.dw32 is None else self.dw32.to(weight_dtype)
        return dh, dw
