"""``judge_head``'s forward through loss mode's chunks: cuBLAS logits, one statistics pass, the combine kernel.

The fused forward (``forward.py``) never holds more than a tile of logits, but
its ``tl.dot`` loop runs below cuBLAS's speed.  When one ``[chunk, V]`` fp32
buffer fits (the backward needs the same buffer anyway), each chunk of rows goes
through the pass ``judge_loss`` runs (``chunk_pass.py``): cuBLAS writes the
chunk's fp32 logits, ``chunk_lse_kernel`` reads ``lse`` and the entropy, and
the target and score logits are picked from the buffer.  The results fill the
forward's partials as a single vocabulary split (max = lse, sum = 1,
entropy sum = -H, so that the merge gives back lse and H exactly), and the
forward's own combine kernel runs the O(N m) score epilogue: same outputs, same
saved tensors, same backward.
"""
from __future__ import annotations

from typing import List

import torch

from ..core.loss_rows import special_columns
from .chunk_pass import TritonChunkPass
from .head_launches import ForwardOutputs, combine_launch, forward_partials


def chunked_forward(hidden, weight, targets, score_ids, score_values, score_targets, score_mask,
                    normalize: bool, temperature: float, ignore_index: int, return_entropy: bool,
                    plan: List[slice]) -> ForwardOutputs:
    n, m = hidden.shape[0], score_ids.numel()
    inv_temp = 1.0 / temperature
    parts = forward_partials(1, n, m, return_entropy, hidden.device)
    parts.sum.fill_(1.0)
    chunk_pass = TritonChunkPass(max(r.stop - r.start for r in plan), weight.shape[0], hidden.device,
                                 return_entropy, hidden.dtype)
    w_t = weight.T
    for rows in plan:
        z = chunk_pass.logits(hidden[rows], w_t)
        stats = chunk_pass.stats(z, special_columns(targets[rows], score_ids, ignore_index), inv_temp,
                                 return_entropy)
        parts.max[0, rows] = stats.lse
        if return_entropy:
            parts.ent[0, rows] = -stats.entropy
        parts.tgt[0, rows] = stats.target_logit
        parts.score[0, rows, :m] = stats.score_logit
    combine, out = combine_launch(parts, targets, score_values, score_targets, score_mask, normalize,
                                  ignore_index, return_entropy)
    combine()
    return out
