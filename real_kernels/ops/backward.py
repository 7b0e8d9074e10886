"""Backward kernel: recompute a logits tile, form dlogits, accumulate dh and dW.

One program per (row block, vocabulary tile).  With ``p = softmax(z)`` recomputed
from the saved ``lse``, the gradient of every output w.r.t. the tile's logits is
(DESIGN.md section 2)

    dz_v = g_t 1[v = y] + sum_j g_raw_j 1[v = k_j] - coef p_v - g_e p_v (log p_v + H)

with ``coef = g_t + sum_j g_raw_j`` from ``score_grad.py``.  Since
``z = h W^T / tau``, ``dh += (dz / tau) W_tile`` and ``dW_tile += (dz / tau)^T h``
are added atomically into fp32 buffers (DESIGN.md section 5: never accumulate
them in bf16).
"""
import triton
import triton.language as tl


@triton.jit
def head_backward_kernel(
    h_ptr, w_ptr, tgt_ptr, sid_ptr, lse_ptr, ent_ptr,
    glogp_ptr, graw_ptr, coef_ptr, gent_ptr,
    dh_ptr, dw_ptr,
    N, V, D, M,
    stride_hn, stride_wv,
    inv_temp, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SCORES: tl.constexpr, HAS_GLOGP: tl.constexpr, HAS_GENT: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    v0 = pid_v * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        h = tl.load(h_ptr + rows64[:, None] * stride_hn + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_wv + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)

    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    log_p = acc * inv_temp - lse[:, None]
    valid = row_ok[:, None] & col_ok[None, :]
    p = tl.where(valid, tl.exp(log_p), 0.0)
    coef = tl.load(coef_ptr + rows64, mask=row_ok, other=0.0)
    if HAS_GENT:
        g_e = tl.load(gent_ptr + rows64, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows64, mask=row_ok, other=0.0)
        dz = tl.where(valid, p * (-coef[:, None] - g_e[:, None] * (log_p + ent[:, None])), 0.0)
    else:
        dz = -coef[:, None] * p
    if HAS_GLOGP:
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index)
        g_t = tl.load(glogp_ptr + rows64, mask=row_ok, other=0.0)
        g_t = tl.where(tgt != ignore_index, g_t, 0.0)
        dz += tl.where(cols[None, :] == tgt[:, None], g_t[:, None], 0.0)
    if HAS_SCORES:
        for j in range(0, M):
            k = tl.load(sid_ptr + j)
            if (k >= v0) & (k < v0 + BLOCK_V):
                g_j = tl.load(graw_ptr + rows64 * M + j, mask=row_ok, other=0.0)
                dz += tl.where(cols[None, :] == k, g_j[:, None], 0.0)
    dz = tl.where(valid, dz * inv_temp, 0.0)

    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + cols64[:, None] * stride_wv + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh_part = tl.dot(dz.to(w.dtype), w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_ptr + rows64[:, None] * D + d[None, :], dh_part, mask=row_ok[:, None] & d_ok[None, :])
        if COMPUTE_DW:
            h = tl.load(h_ptr + rows64[:, None] * stride_hn + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw_part = tl.dot(tl.trans(dz.to(h.dtype)), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + cols64[:, None] * D + d[None, :], dw_part, mask=col_ok[:, None] & d_ok[None, :])
