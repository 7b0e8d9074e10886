"""Loss mode in plain PyTorch: the fused pass over a chunk's logits, for the CPU.

One chunk of C rows: ``raw = h_c W^T`` into a reused fp32 ``[C, V]`` buffer
(one GEMM); then, in place over that buffer, ``e = exp(z - max)`` and its row
sums (the log-sum-exp without ``torch.logsumexp``'s temporaries, a third of
its time here); the caller's loss on the per-row statistics
(``loss_rows.chunk_loss``); and ``dlogits = p (dense - ent log p)`` as one
scaling of ``e``.  The caller hands the buffer to the two other GEMMs.
Everything is fp32 (bf16 and fp16 inputs are upcast), which is what oneDNN /
MKL run fastest on a CPU anyway.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .core.loss_rows import ChunkStats, RowCoefficients, special_values


_WORKSPACES: Dict[Tuple[int, str], torch.Tensor] = {}


def _workspace(slot: int, elems: int, device: torch.device) -> torch.Tensor:
    """A reused fp32 buffer of at least ``elems`` elements (per slot and device).

    A training loop calls the head with the same shapes step after step; on the CPU, where there is
    no caching allocator, a fresh 100s-of-MiB buffer per call costs its page faults every time
    (~5% of a call at N = 2048, V = 151,936).  One buffer per slot is kept between calls and
    replaced when a larger one is needed; on CUDA the caching allocator already does this.
    """
    if device.type != "cpu":
        return torch.empty(elems, dtype=torch.float32, device=device)
    key = (slot, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < elems:
        _WORKSPACES.pop(key, None)  # free the old one before allocating the new one
        buf = _WORKSPACES[key] = torch.empty(elems, dtype=torch.float32, device=device)
    return buf[:elems]


def release_workspaces() -> None:
    """Drop the buffers kept between calls (``real_kernels.loss_torch``), e.g. before a memory-hungry phase."""
    _WORKSPACES.clear()


class TorchChunkPass:
    """Owns the chunk buffers; ``logits`` -> ``stats`` -> ``dlogits_`` per chunk."""

    compute_dtype = torch.float32

    def __init__(self, chunk: int, vocab: int, device: torch.device, entropy: bool):
        self.buf = _workspace(0, chunk * vocab, device)
        # with the entropy, z - max must outlive exp(z - max): a second buffer holds the exponentials
        self.ebuf = _workspace(1, chunk * vocab, device) if entropy else None
        self.vocab = vocab
        self._row_sum: Optional[torch.Tensor] = None
        self._log_sum: Optional[torch.Tensor] = None

    def logits(self, h_c: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        z = self.buf[: h_c.shape[0] * self.vocab].view(h_c.shape[0], self.vocab)
        return torch.mm(h_c, weight_t, out=z)

    def stats(self, z: torch.Tensor, cols: torch.Tensor, inv_temp: float, entropy: bool) -> ChunkStats:
        """Leaves ``z - max`` in ``z`` and ``exp(z - max)`` in ``z`` (or, with the entropy, in ``ebuf``)."""
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        special = z.gather(1, cols)
        row_max = z.amax(dim=1)
        z.sub_(row_max[:, None])
        ent: Optional[torch.Tensor] = None
        if entropy:
            e = torch.exp(z, out=self.ebuf[: z.numel()].view_as(z))
            row_sum = e.sum(dim=1)
            # sum_v e_v (z_v - max), a row-wise dot product without a [C, V] temporary
            e_zc = torch.bmm(e[:, None, :], z[:, :, None]).view(-1)
            log_sum = row_sum.log()
            ent = log_sum - e_zc / row_sum
        else:
            row_sum = z.exp_().sum(dim=1)
            log_sum = row_sum.log()
        self._row_sum, self._log_sum = row_sum, log_sum
        return ChunkStats(lse=row_max + log_sum, special=special, entropy=ent)

    def dlogits_(self, z: torch.Tensor, stats: ChunkStats, coefs: RowCoefficients, cols: torch.Tensor,
                 inv_temp: float) -> torch.Tensor:
        """Overwrite ``z`` with d loss / d raw: ``p (dense - ent log p)`` with ``p = e / S``, ``log p = zc - log S``."""
        inv_sum = 1.0 / self._row_sum
        if stats.entropy is None:
            z.mul_((coefs.dense * inv_sum)[:, None])  # z holds e
        else:
            e = self.ebuf[: z.numel()].view_as(z)  # z holds zc = z - max
            if coefs.ent is None:
                torch.mul(e, (coefs.dense * inv_sum)[:, None], out=z)
            else:
                # e/S (dense - ent (zc - log S)) = e ((dense + ent log S)/S - (ent/S) zc)
                offset = (coefs.dense + coefs.ent * self._log_sum) * inv_sum
                z.mul_((-coefs.ent * inv_sum)[:, None]).add_(offset[:, None]).mul_(e)
        z.scatter_(1, cols, special_values(stats.special, cols, stats.lse, coefs))
        return z
