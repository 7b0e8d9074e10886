"""``judge_head``'s backward on the GPU: recompute the logits in chunks, no atomics.

The forward kept O(N) state (the entropy, the score log-probs); the
upstream gradients arrive only now, so the logits must be computed again.
Rather than a Triton kernel that recomputes a tile and adds its ``dh`` / ``dW``
shares with atomics (a GPU-wide fence around every add, and a sum whose order
changes run to run), each chunk of rows goes through loss mode's machinery:
cuBLAS writes the chunk's fp32 logits, ``chunk_lse_kernel`` reads their row
statistics, ``chunk_dlogits_kernel`` turns them into dlogits in the input
dtype over the same rows, and cuBLAS forms ``dh = dz W`` and ``dW += dz^T h``.
Three GEMMs in backward, one pass over the logits in forward (fused, or
chunked: ``chunked_forward.py``): 8NHV, deterministic, extra memory one fp32
``[chunk, V]`` buffer plus the fp32 ``dW``.

With ``coef = g_t + sum_j g_raw_j`` from ``score_grad.py``, the gradient on the
logits is (docs/design.md, "The head's backward")

    dz_v = g_t 1[v = y] + sum_j g_raw_j 1[v = k_j] - coef p_v - g_H p_v (log p_v + H)

which is ``loss_rows.RowCoefficients`` with ``dense = -coef - g_H H``, ``ent = g_H``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.grad_gemms import GradBuffers
from ..core.loss_rows import RowCoefficients, special_columns
from .chunk_pass import TritonChunkPass


def recompute_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, score_ids: torch.Tensor,
                       entropy: Optional[torch.Tensor], coef: torch.Tensor,
                       g_raw: torch.Tensor, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor],
                       temperature: float, ignore_index: int, need_dh: bool, need_dw: bool, chunk: int
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    n = hidden.shape[0]
    vocab = weight.shape[0]
    inv_temp = 1.0 / temperature
    chunk_pass = TritonChunkPass(chunk, vocab, hidden.device, False, hidden.dtype)
    grads = GradBuffers(hidden, weight, hidden.dtype, need_dh, need_dw)
    valid = targets != ignore_index
    g_t = torch.zeros_like(coef) if g_logp is None else torch.where(valid, g_logp.float(), 0.0)
    dense = -coef if g_ent is None else -coef - g_ent.float() * entropy
    for r0 in range(0, n, chunk):
        rows = slice(r0, min(n, r0 + chunk))
        h_c = grads.h[rows]
        z = chunk_pass.logits(h_c, grads.w.T)
        cols = special_columns(targets[rows], score_ids, ignore_index)
        coefs = RowCoefficients(
            dense=dense[rows] * inv_temp,
            ent=None if g_ent is None else g_ent[rows].float() * inv_temp,
            target=g_t[rows] * inv_temp,
            score=g_raw[rows] * inv_temp,
        )
        # lse again, from the logits as recomputed here (not the forward's): at |z| ~ 1e4 a different
        # summation order moves z by ~1e-3, and p = exp(z - lse) must sum to 1 over *these* logits
        stats = chunk_pass.stats(z, cols, inv_temp, entropy=False)
        dz = chunk_pass.dlogits_(z, stats, coefs, cols, inv_temp)
        grads.add_chunk(dz, rows, first=r0 == 0)
    return grads.finish(hidden.dtype, weight.dtype)
