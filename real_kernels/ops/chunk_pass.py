"""Loss mode on the GPU: cuBLAS for the GEMMs, two Triton kernels for the pass over a chunk.

Same interface as ``real_kernels.loss_torch.TorchChunkPass`` (``logits`` ->
``stats`` -> ``dlogits_``).  The chunk's logits are written in fp32
(``grad_gemms.logits_fp32``: a bf16 GEMM with an fp32 output; a bf16 logit near
8 would be off by up to 0.03, and a peaked row's log-sum-exp and picked
log-probs with it), the statistics are read from them in fp32, and dlogits
are written in the inputs' dtype over the first half of each fp32 row
(``dlogits_view``), ready for the bf16 gradient GEMMs: one ``[chunk, V]`` fp32
buffer, no second one (docs/design.md, "Numerics").
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..core.grad_gemms import logits_fp32
from ..core.loss_rows import ChunkStats, RowCoefficients, special_values
from .chunk_dlogits import chunk_dlogits_kernel
from .chunk_lse import chunk_lse_kernel
from .head_config import interpreting
from .launch import Launch

GPU_BLOCK_V = 4096  # one row streamed by 8 warps, 16 elements per thread per step
GPU_NUM_WARPS = 8


def block_v_for(vocab: int) -> int:
    if interpreting():
        return min(1024, triton.next_power_of_2(vocab))  # numpy per step: few wide steps are fastest
    return min(GPU_BLOCK_V, triton.next_power_of_2(vocab))


def dlogits_view(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[C, V]`` in ``dtype`` over the first ``V * itemsize`` bytes of each fp32 row of ``z`` (``z`` itself for fp32)."""
    if dtype == torch.float32:
        return z
    return z.view(dtype)[:, : z.shape[1]]


class TritonChunkPass:
    """Owns the fp32 ``[chunk, V]`` logits buffer; dlogits come out in ``compute_dtype`` (the inputs')."""

    def __init__(self, chunk: int, vocab: int, device: torch.device, entropy: bool, dtype: torch.dtype):
        self.compute_dtype = dtype
        self.buf = torch.empty(chunk * vocab, dtype=torch.float32, device=device)
        self.vocab = vocab
        self.block_v = block_v_for(vocab)

    def logits(self, h_c: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        z = self.buf[: h_c.shape[0] * self.vocab].view(h_c.shape[0], self.vocab)
        return logits_fp32(h_c, weight_t, z)

    def stats(self, z: torch.Tensor, cols: torch.Tensor, inv_temp: float, entropy: bool) -> ChunkStats:
        special = z.gather(1, cols) * inv_temp
        launch, lse, ent = lse_launch(z, inv_temp, entropy, self.block_v)
        launch()
        return ChunkStats(lse=lse, special=special, entropy=ent)

    def dlogits_(self, z: torch.Tensor, stats: ChunkStats, coefs: RowCoefficients, cols: torch.Tensor,
                 inv_temp: float) -> torch.Tensor:
        """d loss / d raw in ``compute_dtype``, written over ``z``'s rows (``dlogits_view``); returns that view."""
        dz = dlogits_view(z, self.compute_dtype)
        dlogits_launch(z, dz, stats.lse, coefs.dense, coefs.ent, inv_temp, self.block_v)()
        dz.scatter_(1, cols, special_values(stats.special, cols, stats.lse, coefs).to(dz.dtype))
        return dz


def lse_launch(z: torch.Tensor, inv_temp: float, entropy: bool, block_v: int):
    """(launch, lse [C], entropy [C] or None) for a chunk of logits ``z`` ``[C, V]``."""
    c, vocab = z.shape
    lse = torch.empty(c, dtype=torch.float32, device=z.device)
    ent: Optional[torch.Tensor] = torch.empty_like(lse) if entropy else None
    launch = Launch("chunk_lse", chunk_lse_kernel, (c,),
                    dict(z_ptr=z, lse_ptr=lse, ent_ptr=ent if entropy else lse, V=vocab, stride_z=z.stride(0),
                         inv_temp=inv_temp),
                    dict(BLOCK_V=block_v, RETURN_ENTROPY=entropy), num_warps=GPU_NUM_WARPS)
    return launch, lse, ent


def _overlaps(z: torch.Tensor, dz: torch.Tensor) -> bool:
    """Whether ``dz`` is a narrower dtype written over ``z``'s own storage (``dlogits_view``): then a thread's store
    reaches columns other threads read, and the kernel orders each step's loads before its stores.  fp32 ``dz`` that
    is ``z`` itself needs no order: each thread overwrites only what it read."""
    return dz.dtype != z.dtype and z.untyped_storage().data_ptr() == dz.untyped_storage().data_ptr()


def dlogits_launch(z: torch.Tensor, dz: torch.Tensor, lse: torch.Tensor, dense: torch.Tensor,
                   ent: Optional[torch.Tensor], inv_temp: float, block_v: int) -> Launch:
    """The launch that writes ``dz`` (``[C, V]``, possibly over ``z``'s own rows) from the fp32 logits ``z``."""
    dense = dense.float().contiguous()
    c, vocab = z.shape
    return Launch("chunk_dlogits", chunk_dlogits_kernel, (c,),
                  dict(z_ptr=z, dz_ptr=dz, lse_ptr=lse, dense_ptr=dense,
                       ent_ptr=ent.float().contiguous() if ent is not None else dense,
                       V=vocab, stride_z=z.stride(0), stride_dz=dz.stride(0), inv_temp=inv_temp),
                  dict(BLOCK_V=block_v, HAS_ENT=ent is not None, IN_PLACE=_overlaps(z, dz)),
                  num_warps=GPU_NUM_WARPS)
