"""Backward of the O(N m) score epilogue, before the vocabulary pass.

Given upstream gradients on the outputs (``score_logprobs`` l, ``expected_score``
yhat, ``sq_error``), produce per row the gradient ``g_raw_j`` on the raw
full-vocabulary score log-probs ``s_j = z_{k_j} - lse`` and the dense
coefficient ``coef = g_t + sum_j g_raw_j`` that multiplies ``-p_v`` in every
vocabulary column (docs/design.md section 2):

    gy      = g_yhat + g_sq * 2 (yhat - y*)        (on score_mask rows)
    a_j     = g_l_j + gy * p_j * v_j               (d yhat / d l_j = p_j v_j)
    g_raw_j = a_j - p_j * sum_i a_i   if normalize (l = s - logsumexp_K s)
            = a_j                     otherwise
"""
import triton
import triton.language as tl


@triton.jit
def score_grad_kernel(
    tgt_ptr, glogp_ptr, slogp_ptr, yhat_ptr, sval_ptr, ytgt_ptr, ymask_ptr,
    gslogp_ptr, gyhat_ptr, gsq_ptr,
    graw_ptr, coef_ptr,
    N, M, ignore_index,
    BLOCK_N: tl.constexpr, M_PAD: tl.constexpr,
    HAS_SCORES: tl.constexpr, NORMALIZE: tl.constexpr, HAS_YTGT: tl.constexpr, HAS_YMASK: tl.constexpr,
    HAS_GLOGP: tl.constexpr, HAS_GSLOGP: tl.constexpr, HAS_GYHAT: tl.constexpr, HAS_GSQ: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index)
    coef = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GLOGP:
        g_t = tl.load(glogp_ptr + rows64, mask=row_ok, other=0.0)
        coef = tl.where(tgt != ignore_index, g_t, 0.0)
    if HAS_SCORES:
        jj = tl.arange(0, M_PAD)
        j_ok = jj < M
        m2 = row_ok[:, None] & j_ok[None, :]
        offs = rows64[:, None] * M + jj[None, :]
        p = tl.where(m2, tl.exp(tl.load(slogp_ptr + offs, mask=m2, other=0.0)), 0.0)
        gy = tl.zeros([BLOCK_N], tl.float32)
        if HAS_GYHAT:
            gy += tl.load(gyhat_ptr + rows64, mask=row_ok, other=0.0)
        if HAS_GSQ:
            if HAS_YTGT:
                yhat = tl.load(yhat_ptr + rows64, mask=row_ok, other=0.0)
                y = tl.load(ytgt_ptr + rows64, mask=row_ok, other=0.0)
                g_sq = tl.load(gsq_ptr + rows64, mask=row_ok, other=0.0) * 2.0 * (yhat - y)
                if HAS_YMASK:
                    keep = tl.load(ymask_ptr + rows64, mask=row_ok, other=0)
                    g_sq = tl.where(keep != 0, g_sq, 0.0)
                gy += g_sq
        vals = tl.load(sval_ptr + jj, mask=j_ok, other=0.0)
        a = gy[:, None] * p * vals[None, :]
        if HAS_GSLOGP:
            a += tl.load(gslogp_ptr + offs, mask=m2, other=0.0)
        if NORMALIZE:
            a = a - p * tl.sum(a, axis=1)[:, None]
        a = tl.where(m2, a, 0.0)
        tl.store(graw_ptr + offs, a, mask=m2)
        coef += tl.sum(a, axis=1)
    tl.store(coef_ptr + rows64, coef, mask=row_ok)
