"""The GEMMs of a chunk, shared by loss mode and the GPU head's chunked passes.

``logits_fp32`` writes a chunk's logits ``h_c W^T`` in fp32 whatever the
inputs' dtype (docs/design.md, "Numerics"): on CUDA one bf16 / fp16 GEMM with
an fp32 output (``torch.mm(..., out_dtype=float32)``, the same tensor-core
work as a bf16 output, twice the bytes written); elsewhere the products of the
upcast inputs, which is the same arithmetic.  A bf16 logit near 8 would be off
by up to 0.03, and the log-sum-exp of a peaked row inherits that in full.

Given a chunk's ``dlogits`` ``dz [C, V]`` (d loss / d raw logits), the chunk's
rows of ``dh`` are ``dz W`` (one GEMM, written in place: each row of ``dh``
belongs to exactly one chunk) and ``dW`` gains ``dz^T h_c``.  ``dW`` is summed
over chunks in fp32 (docs/design.md, "Numerics"), by one GEMM per chunk that
reads the fp32 accumulator and writes it back:

- fp32 inputs: ``addmm_``;
- bf16 / fp16 on CUDA: ``torch.addmm(dw32, dz^T, h_c, out_dtype=float32, out=dw32)``
  (torch >= 2.10: cuBLAS accumulates in fp32 and adds into fp32, no bf16
  temporary, no rounding per chunk);
- elsewhere (the CPU, an older torch): ``[DW_TILE_ROWS, H]`` GEMM results in
  the input dtype, each accumulated in fp32 by the BLAS and rounded once
  before it is added.

Whether the ``out_dtype`` GEMMs exist and are right is checked once per device
and dtype on a small product (``fp32_out_gemm_ok``); where they are not, the
logits are rounded to the input dtype as before (an older torch on CUDA).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

DW_TILE_ROWS = 16384
_FP32_OUT_OK: Dict[Tuple[str, torch.dtype], bool] = {}


def fp32_out_gemm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` / ``torch.addmm`` with ``out_dtype=float32, out=c32`` work for ``dtype`` inputs on ``device``.

    Tried once per (device, dtype) against an fp32 product of the same inputs: the overload is CUDA-only
    (torch 2.8+), and before torch 2.10 an fp32 ``self`` / ``out`` next to bf16 operands was mishandled.
    """
    key = (str(device), dtype)
    if key not in _FP32_OUT_OK:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(24, 40, generator=gen).to(device=device, dtype=dtype).T  # transposed, as dz^T is
        b = torch.randn(24, 72, generator=gen).to(device=device, dtype=dtype)
        c = torch.randn(40, 72, generator=gen).to(device=device)
        product = a.float() @ b.float()
        want = c + product
        try:
            torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
            fresh = torch.full_like(c, float("nan"))  # beta = 0 must ignore what the output held
            torch.addmm(fresh, a, b, beta=0, out_dtype=torch.float32, out=fresh)
            plain = torch.full_like(c, float("nan"))
            torch.mm(a, b, out_dtype=torch.float32, out=plain)
            _FP32_OUT_OK[key] = all(torch.allclose(x, y, rtol=1e-4, atol=1e-4)
                                    for x, y in ((c, want), (fresh, product), (plain, product)))
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_OK[key] = False
    return _FP32_OUT_OK[key]


def logits_fp32(h_c: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = h_c @ weight_t`` in fp32 (``out`` is fp32 ``[C, V]``); see the module docstring."""
    if h_c.dtype == torch.float32:
        return torch.mm(h_c, weight_t, out=out)
    if not h_c.is_cuda:
        return torch.mm(h_c.float(), weight_t.float(), out=out)
    if fp32_out_gemm_ok(h_c.device, h_c.dtype):
        return torch.mm(h_c, weight_t, out_dtype=torch.float32, out=out)
    return out.copy_(torch.mm(h_c, weight_t))  # an older torch: logits rounded to the input dtype


class GradBuffers:
    """``dh`` in the compute dtype and ``dW`` in fp32, filled chunk by chunk."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype,
                 need_dh: bool, need_dw: bool):
        self.h = hidden.detach().to(compute_dtype)
        self.w = weight.detach().to(compute_dtype)
        n, hdim = hidden.shape
        self.dh = torch.empty(n, hdim, dtype=compute_dtype, device=hidden.device) if need_dh else None
        self.dw32 = None
        # bf16 / fp16 shares added into dW by one fp32-output GEMM each, where torch has it (CUDA)
        self.fp32_out = (need_dw and compute_dtype != torch.float32 and hidden.is_cuda
                         and fp32_out_gemm_ok(hidden.device, compute_dtype))
        if need_dw:
            # fp32 GEMMs write the first chunk's share with out= (fp32-output ones with beta = 0), so no
            # zero-fill pass is needed; only the tiled fallback adds into a zeroed accumulator
            alloc = torch.empty if compute_dtype == torch.float32 or self.fp32_out else torch.zeros
            self.dw32 = alloc(weight.shape[0], hdim, dtype=torch.float32, device=hidden.device)

    def add_chunk(self, dz: torch.Tensor, rows: slice, first: bool) -> None:
        self.add_dh(dz, rows)
        self.add_dw(dz, rows, first)

    def add_dh(self, dz: torch.Tensor, rows: slice) -> None:
        if self.dh is not None:
            torch.mm(dz, self.w, out=self.dh[rows])

    def add_dw(self, dz: torch.Tensor, rows: slice, first: bool) -> None:
        if self.dw32 is None:
            return
        h_c = self.h[rows]
        if dz.dtype == torch.float32:
            if first:
                torch.mm(dz.T, h_c, out=self.dw32)
            else:
                self.dw32.addmm_(dz.T, h_c)
        elif self.fp32_out:
            # beta = 0 on the first chunk: the accumulator starts as that chunk's share, no zero-fill pass
            torch.addmm(self.dw32, dz.T, h_c, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=self.dw32)
        else:
            for v0 in range(0, self.dw32.shape[0], DW_TILE_ROWS):
                v1 = min(self.dw32.shape[0], v0 + DW_TILE_ROWS)
                self.dw32[v0:v1].add_(torch.mm(dz[:, v0:v1].T, h_c))

    def finish(self, hidden_dtype: torch.dtype, weight_dtype: torch.dtype
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        dh = None if self.dh is None else self.dh.to(hidden_dtype)
        dw = None if self.dw32 is None else self.dw32.to(weight_dtype)
        return dh, dw
