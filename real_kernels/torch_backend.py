"""Chunked PyTorch backend: the fused algorithm without Triton, fast on the CPU.

Same algorithm as the Triton kernels (docs/design.md section 2): stream tiles of
``[tokens x vocab]`` logits through one reusable buffer, keep an online
log-sum-exp per row, pick out the target and score-token logits, and in
backward recompute each tile to form ``dlogits`` and accumulate ``dh`` and
``dW`` in fp32.  No tensor of ``N * V`` elements (nor a quarter of that) is ever
allocated.  The O(N m) score epilogue is plain autograd (``reference.score_epilogue``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .core.reference import score_epilogue
from .core.validation import HeadArgs, first_order_only

# Elements in one logits tile (fp32): 4M = 16 MiB, large enough for efficient
# GEMMs, small enough to stay far below N*V/4 at any realistic vocabulary.
DEFAULT_TILE_ELEMS = 1 << 22
MAX_TOKEN_CHUNK = 4096


def tile_chunks(n: int, v: int, tile_elems: int) -> Tuple[int, int]:
    token_chunk = max(1, min(n, MAX_TOKEN_CHUNK))
    # at most an eighth of the vocabulary per tile, so a tile stays under N*V/4 even for tiny N
    vocab_chunk = max(1, min(-(-v // 8), tile_elems // token_chunk))
    return token_chunk, vocab_chunk


def _score_cols(score_ids: List[int], v0: int, v1: int) -> List[Tuple[int, int]]:
    return [(j, k - v0) for j, k in enumerate(score_ids) if v0 <= k < v1]


class ChunkedHead(torch.autograd.Function):
    """(hidden, weight) -> (log p(target) [N], log pi(k_j) [N, m], entropy [N] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, score_ids, temperature, ignore_index, return_entropy, tile_elems):
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        inv_temp = 1.0 / temperature
        ids = [int(k) for k in score_ids.tolist()]
        hs = hidden.float() * inv_temp
        tn, vc = tile_chunks(n, v, tile_elems)
        buf = torch.empty(tn * vc, dtype=torch.float32, device=dev)
        ebuf = torch.empty(tn * vc, dtype=torch.float32, device=dev) if return_entropy else None

        lse = torch.empty(n, dtype=torch.float32, device=dev)
        target_logit = torch.zeros(n, dtype=torch.float32, device=dev)
        score_logit = torch.zeros(n, len(ids), dtype=torch.float32, device=dev)
        entropy = torch.empty(n if return_entropy else 0, dtype=torch.float32, device=dev)

        for t0 in range(0, n, tn):
            t1 = min(n, t0 + tn)
            h_c = hs[t0:t1]
            local_t = targets[t0:t1] - 0  # copy; shifted per vocab tile below
            run_max = run_sum = run_ent = None
            for v0 in range(0, v, vc):
                v1 = min(v, v0 + vc)
                z = torch.mm(h_c, weight[v0:v1].float().T, out=buf[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0))
                _pick_target(z, local_t - v0, target_logit[t0:t1])
                for j, col in _score_cols(ids, v0, v1):
                    score_logit[t0:t1, j] = z[:, col]
                tile_max = z.amax(dim=1)
                new_max = tile_max if run_max is None else torch.maximum(run_max, tile_max)
                z.sub_(new_max[:, None])  # z - m_new, <= 0
                if return_entropy:
                    e = torch.exp(z, out=ebuf[: z.numel()].view_as(z))
                    tile_sum = e.sum(dim=1)
                    tile_ent = e.mul_(z).sum(dim=1)  # sum e^(z-m) (z-m)
                else:
                    tile_sum = z.exp_().sum(dim=1)
                if run_max is None:
                    run_sum, run_ent = tile_sum, (tile_ent if return_entropy else None)
                else:
                    shift = run_max - new_max  # <= 0
                    alpha = shift.exp()
                    if return_entropy:
                        # sum e^(z-m_new)(z-m_new) = alpha * (sum e^(z-m_old)(z-m_old) + shift * sum e^(z-m_old))
                        run_ent = alpha * (run_ent + shift * run_sum) + tile_ent
                    run_sum = alpha * run_sum + tile_sum
                run_max = new_max
            log_sum = run_sum.log()
            lse[t0:t1] = run_max + log_sum
            if return_entropy:
                entropy[t0:t1] = (log_sum - run_ent / run_sum).clamp_min_(0.0)

        valid = targets != ignore_index
        logprobs = torch.where(valid, (target_logit - lse).clamp_max_(0.0), torch.zeros_like(lse))
        score_logp = (score_logit - lse[:, None]).clamp_max_(0.0)

        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.ids, ctx.temperature, ctx.ignore_index = ids, temperature, ignore_index
        ctx.return_entropy, ctx.tile_elems = return_entropy, tile_elems
        ctx.mark_non_differentiable(*(() if return_entropy else (entropy,)))
        return logprobs, score_logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_score, g_entropy):
        first_order_only("torch")
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        inv_temp = 1.0 / ctx.temperature
        ids = ctx.ids
        use_entropy = ctx.return_entropy and g_entropy is not None

        valid = targets != ctx.ignore_index
        g_t = torch.zeros(n, dtype=torch.float32, device=dev) if g_logp is None else torch.where(valid, g_logp.float(), 0.0)
        g_s = None if (g_score is None or not ids) else g_score.float()
        # every "1[v = k] - p_v" term contributes -g p_v: their sum is one dense coefficient per row
        coef = g_t if g_s is None else g_t + g_s.sum(dim=1)
        g_e = g_entropy.float() if use_entropy else None

        hs = hidden.float() * inv_temp
        d_hs = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=dev) if need_dh else None
        # empty, not zeros: the first token chunk writes each dW tile with mm(out=), saving a full pass
        d_w = torch.empty(v, weight.shape[1], dtype=torch.float32, device=dev) if need_dw else None
        tn, vc = tile_chunks(n, v, ctx.tile_elems)
        buf = torch.empty(tn * vc, dtype=torch.float32, device=dev)
        pbuf = torch.empty(tn * vc, dtype=torch.float32, device=dev) if use_entropy else None

        for t0 in range(0, n, tn):
            t1 = min(n, t0 + tn)
            h_c = hs[t0:t1]
            for v0 in range(0, v, vc):
                v1 = min(v, v0 + vc)
                w_c = weight[v0:v1].float()
                dz = torch.mm(h_c, w_c.T, out=buf[: (t1 - t0) * (v1 - v0)].view(t1 - t0, v1 - v0))
                dz.sub_(lse[t0:t1, None])  # log p
                if use_entropy:
                    # d H / d z_v = -p_v (log p_v + H)
                    p = torch.exp(dz, out=pbuf[: dz.numel()].view_as(dz))
                    dz.add_(entropy[t0:t1, None]).mul_(-g_e[t0:t1, None]).sub_(coef[t0:t1, None]).mul_(p)
                else:
                    dz.exp_().mul_(-coef[t0:t1, None])
                _add_at_target(dz, targets[t0:t1] - v0, g_t[t0:t1])
                for j, col in _score_cols(ids, v0, v1):
                    dz[:, col] += g_s[t0:t1, j]
                if need_dw and t0 == 0:
                    torch.mm(dz.T, h_c, out=d_w[v0:v1])
                elif need_dw:
                    d_w[v0:v1].addmm_(dz.T, h_c)
                if need_dh:
                    d_hs[t0:t1].addmm_(dz, w_c)

        dh = (d_hs.mul_(inv_temp)).to(hidden.dtype) if need_dh else None
        dw = d_w.to(weight.dtype) if need_dw else None
        return dh, dw, None, None, None, None, None, None


def _pick_target(z: torch.Tensor, local: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = z[i, local[i]] where 0 <= local[i] < tile width."""
    inside = (local >= 0) & (local < z.shape[1])
    picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    out.copy_(torch.where(inside, picked, out))


def _add_at_target(dz: torch.Tensor, local: torch.Tensor, g: torch.Tensor) -> None:
    """dz[i, local[i]] += g[i] where 0 <= local[i] < tile width."""
    inside = (local >= 0) & (local < dz.shape[1])
    dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1)[:, None], torch.where(inside, g, 0.0)[:, None])


def judge_head(args: HeadArgs, tile_elems: int = DEFAULT_TILE_ELEMS):
    logprobs, score_logp, entropy = ChunkedHead.apply(
        args.hidden, args.weight, args.targets, args.score_ids, args.temperature,
        args.ignore_index, args.return_entropy, tile_elems,
    )
    score_logp, expected, sq_error = score_epilogue(
        score_logp, args.score_values, args.score_targets, args.score_mask, args.normalize
    )
    return logprobs, score_logp, expected, sq_error, (entropy if args.return_entropy else None)
