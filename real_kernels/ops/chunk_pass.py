"""Loss mode on the GPU: cuBLAS for the GEMMs, two Triton kernels for the pass over a chunk.

Same interface as ``real_kernels.loss_torch.TorchChunkPass`` (``logits`` ->
``stats`` -> ``dlogits_``), but the chunk's logits live in the input dtype
(bf16 on the GPU: cuBLAS accumulates in fp32 and rounds once, as a naive
``hidden @ weight.T`` does), the statistics and dlogits are computed in fp32
inside the kernels, and dlogits are written back in place in the input dtype.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from ..loss_rows import ChunkStats, RowCoefficients, special_values
from .chunk_dlogits import chunk_dlogits_kernel
from .chunk_lse import chunk_lse_kernel

GPU_BLOCK_V = 4096  # one row streamed by 8 warps, 16 elements per thread per step
GPU_NUM_WARPS = 8


def _block_v(vocab: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(1024, triton.next_power_of_2(vocab))  # numpy per step: few wide steps are fastest
    return min(GPU_BLOCK_V, triton.next_power_of_2(vocab))


class TritonChunkPass:
    """Owns the ``[chunk, V]`` logits buffer in the input dtype."""

    def __init__(self, chunk: int, vocab: int, device: torch.device, entropy: bool, dtype: torch.dtype):
        self.compute_dtype = dtype
        self.buf = torch.empty(chunk * vocab, dtype=dtype, device=device)
        self.vocab = vocab
        self.block_v = _block_v(vocab)

    def logits(self, h_c: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        z = self.buf[: h_c.shape[0] * self.vocab].view(h_c.shape[0], self.vocab)
        return torch.mm(h_c, weight_t, out=z)

    def stats(self, z: torch.Tensor, cols: torch.Tensor, inv_temp: float, entropy: bool) -> ChunkStats:
        c = z.shape[0]
        special = z.gather(1, cols).float() * inv_temp
        lse = torch.empty(c, dtype=torch.float32, device=z.device)
        ent: Optional[torch.Tensor] = torch.empty_like(lse) if entropy else None
        chunk_lse_kernel[(c,)](
            z, lse, ent if entropy else lse, self.vocab, z.stride(0), inv_temp,
            BLOCK_V=self.block_v, RETURN_ENTROPY=entropy, num_warps=GPU_NUM_WARPS,
        )
        return ChunkStats(lse=lse, special=special, entropy=ent)

    def dlogits_(self, z: torch.Tensor, stats: ChunkStats, coefs: RowCoefficients, cols: torch.Tensor,
                 inv_temp: float) -> torch.Tensor:
        """Overwrite ``z`` (raw logits) with d loss / d raw."""
        special = z.gather(1, cols).float() * inv_temp
        dense = coefs.dense.float().contiguous()
        ent = coefs.ent.float().contiguous() if coefs.ent is not None else dense
        chunk_dlogits_kernel[(z.shape[0],)](
            z, stats.lse, dense, ent, self.vocab, z.stride(0), inv_temp,
            BLOCK_V=self.block_v, HAS_ENT=coefs.ent is not None, num_warps=GPU_NUM_WARPS,
        )
        z.scatter_(1, cols, special_values(special, cols, stats.lse, coefs).to(z.dtype))
        return z
