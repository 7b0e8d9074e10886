"""Loss mode on the GPU: cuBLAS for the GEMMs, two Triton kernels for the pass over a chunk.

Same interface as ``real_kernels.loss_torch.TorchChunkPass`` (``logits`` ->
``stats`` -> ``dlogits_``), but the chunk's logits live in the input dtype
(bf16 on the GPU: cuBLAS accumulates in fp32 and rounds once, as a naive
``hidden @ weight.T`` does), the statistics and dlogits are computed in fp32
inside the kernels, and dlogits are written back in place in the input dtype.

The 1 + m logits that the outputs read directly (the target's, the score
tokens') are not taken from a rounded bf16 / fp16 buffer: a bf16 logit near 8 is off
by up to 0.03, which would go straight into the log-probs.  They are computed
again in fp32 from ``h`` and ``W`` (``picked_logits``: (1 + m) C H
multiply-adds, nothing next to the C V H of the GEMM); the log-sum-exp and
the entropy average the rounding over the whole vocabulary and are read from
the buffer (docs/design.md, "Numerics").
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..loss_rows import ChunkStats, RowCoefficients, special_values
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


class TritonChunkPass:
    """Owns the ``[chunk, V]`` logits buffer in the input dtype."""

    def __init__(self, chunk: int, vocab: int, device: torch.device, entropy: bool, dtype: torch.dtype):
        self.compute_dtype = dtype
        self.buf = torch.empty(chunk * vocab, dtype=dtype, device=device)
        self.vocab = vocab
        self.block_v = block_v_for(vocab)

    def logits(self, h_c: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        z = self.buf[: h_c.shape[0] * self.vocab].view(h_c.shape[0], self.vocab)
        return torch.mm(h_c, weight_t, out=z)

    def stats(self, z: torch.Tensor, cols: torch.Tensor, inv_temp: float, entropy: bool,
              h_c: torch.Tensor, weight: torch.Tensor) -> ChunkStats:
        """lse and entropy from the buffer ``z``; the picked logits in fp32 from ``h_c`` and ``weight``.

        An fp32 buffer is read as it is: its picked logits are already fp32, and at ``|z| ~ 1e4`` a
        second product in another summation order would differ from the ones the lse summed by ~1e-3.
        """
        if z.dtype == torch.float32:
            special = z.gather(1, cols) * inv_temp
        else:
            special = picked_logits(h_c, weight, cols) * inv_temp
        launch, lse, ent = lse_launch(z, inv_temp, entropy, self.block_v)
        launch()
        return ChunkStats(lse=lse, special=special, entropy=ent)

    def dlogits_(self, z: torch.Tensor, stats: ChunkStats, coefs: RowCoefficients, cols: torch.Tensor,
                 inv_temp: float) -> torch.Tensor:
        """Overwrite ``z`` (raw logits) with d loss / d raw; the special columns from the fp32 picked logits."""
        dlogits_launch(z, stats.lse, coefs.dense, coefs.ent, inv_temp, self.block_v)()
        z.scatter_(1, cols, special_values(stats.special, cols, stats.lse, coefs).to(z.dtype))
        return z


def picked_logits(h_c: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[C, 1 + m]`` raw logits ``h_c . W[cols]`` in fp32: the target column per row, then the score ids.

    ``cols`` is ``loss_rows.special_columns``: column 0 varies by row, the others are the same in every row.
    """
    h32 = h_c.float()
    target = torch.bmm(h32[:, None, :], weight[cols[:, 0]].float()[:, :, None]).view(-1, 1)
    if cols.shape[1] == 1:
        return target
    return torch.cat([target, h32 @ weight[cols[0, 1:]].float().T], dim=1)


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


def dlogits_launch(z: torch.Tensor, lse: torch.Tensor, dense: torch.Tensor, ent: Optional[torch.Tensor],
                   inv_temp: float, block_v: int) -> Launch:
    dense = dense.float().contiguous()
    c, vocab = z.shape
    return Launch("chunk_dlogits", chunk_dlogits_kernel, (c,),
                  dict(z_ptr=z, lse_ptr=lse, dense_ptr=dense,
                       ent_ptr=ent.float().contiguous() if ent is not None else dense,
                       V=vocab, stride_z=z.stride(0), inv_temp=inv_temp),
                  dict(BLOCK_V=block_v, HAS_ENT=ent is not None), num_warps=GPU_NUM_WARPS)
