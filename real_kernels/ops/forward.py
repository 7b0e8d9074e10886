"""Forward kernels: stream the vocabulary once, never store ``[N, V]`` logits.

``head_forward_partial_kernel`` runs one program per (row block, vocabulary
split), in grouped order (as in Triton's matmul tutorial): consecutive
programs take ``GROUP_N`` row blocks across every split, so the programs that
run side by side share a few ``h`` blocks (L2-resident, instead of re-read from
HBM for every vocabulary tile) and each stream their own vocabulary range.
Each program owns ``BLOCK_N`` rows and a contiguous range of the vocabulary, loops over ``BLOCK_V`` tiles of it (``logits = h @ W_tile^T`` by
``tl.dot`` over ``BLOCK_D`` slices of the hidden size), and keeps per row

- ``run_max``, ``run_sum = sum exp(z - run_max)``                 (online logsumexp)
- ``run_ent = sum exp(z - run_max) * (z - run_max)``              (entropy, no cancellation)
- the target logit and the m score-token logits, picked out of the tile.

Splitting the vocabulary gives the GPU enough programs when N is small; the
partials (O(splits * N * m)) are merged by ``head_forward_combine_kernel``,
which also runs the score epilogue.
"""
import triton
import triton.language as tl


@triton.jit
def head_forward_partial_kernel(
    h_ptr, w_ptr, tgt_ptr, sid_ptr,
    part_max_ptr, part_sum_ptr, part_ent_ptr, part_tgt_ptr, part_score_ptr,
    N, V, D, M, tiles_per_split, row_blocks, n_splits,
    stride_hn, stride_wv,
    inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, M_PAD: tl.constexpr,
    GROUP_N: tl.constexpr,
    HAS_SCORES: tl.constexpr, RETURN_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    per_group = GROUP_N * n_splits
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(row_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_s = (pid % per_group) // group_rows
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    jj = tl.arange(0, M_PAD)

    # a fixed tile count per split (a loop bound derived from program_id breaks triton 3.6's
    # interpreter); only the last split can run past V, by fewer tiles than there are splits,
    # and those all-masked tiles leave the accumulators unchanged (the first tile never is)
    v_begin = pid_s * tiles_per_split * BLOCK_V

    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    run_ent = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    score_logit = tl.zeros([BLOCK_N, M_PAD], tl.float32)

    for t in range(0, tiles_per_split):
        v0 = v_begin + t * BLOCK_V
        cols = v0 + offs_v
        col_ok = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_ok = d < D
            h = tl.load(h_ptr + rows64[:, None] * stride_hn + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[:, None] * stride_wv + d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        z = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))

        tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        if HAS_SCORES:
            for j in range(0, M):
                k = tl.load(sid_ptr + j)
                if (k >= v0) & (k < v0 + BLOCK_V):
                    picked = tl.sum(tl.where(cols[None, :] == k, z, 0.0), axis=1)
                    score_logit = tl.where(jj[None, :] == j, picked[:, None], score_logit)

        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)  # 0 on the first tile (run_max = -inf)
        zc = tl.where(col_ok[None, :], z - new_max[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
        if RETURN_ENTROPY:
            # re-centre the old sum on the new max: sum e^(z-m1)(z-m1) = alpha (sum e^(z-m0)(z-m0) + shift sum e^(z-m0))
            shift = tl.where(run_sum > 0, run_max - new_max, 0.0)
            run_ent = alpha * (run_ent + shift * run_sum) + tl.sum(e * zc, axis=1)
        run_sum = alpha * run_sum + tl.sum(e, axis=1)
        run_max = new_max

    part = pid_s.to(tl.int64) * N + rows64
    tl.store(part_max_ptr + part, run_max, mask=row_ok)
    tl.store(part_sum_ptr + part, run_sum, mask=row_ok)
    tl.store(part_tgt_ptr + part, tgt_logit, mask=row_ok)
    if RETURN_ENTROPY:
        tl.store(part_ent_ptr + part, run_ent, mask=row_ok)
    if HAS_SCORES:
        tl.store(part_score_ptr + part[:, None] * M + jj[None, :], score_logit,
                 mask=row_ok[:, None] & (jj[None, :] < M))


# n_splits is not specialised: a single split (judge_head's chunked forward) would otherwise compile a
# separate, unrolled variant, which spills registers on sm_90 (compile_check)
@triton.jit(do_not_specialize=["n_splits"])
def head_forward_combine_kernel(
    part_max_ptr, part_sum_ptr, part_ent_ptr, part_tgt_ptr, part_score_ptr,
    tgt_ptr, sval_ptr, ytgt_ptr, ymask_ptr,
    lse_ptr, logp_ptr, ent_ptr, slogp_ptr, yhat_ptr, sq_ptr,
    N, M, n_splits, ignore_index,
    BLOCK_N: tl.constexpr, M_PAD: tl.constexpr,
    HAS_SCORES: tl.constexpr, RETURN_ENTROPY: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_YTGT: tl.constexpr, HAS_YMASK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    jj = tl.arange(0, M_PAD)
    j_ok = jj < M

    # merge the splits' (max, sum, ent); every split holds at least one finite logit
    g_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for s in range(0, n_splits):
        g_max = tl.maximum(g_max, tl.load(part_max_ptr + s * N + rows64, mask=row_ok, other=0.0))
    g_sum = tl.zeros([BLOCK_N], tl.float32)
    g_ent = tl.zeros([BLOCK_N], tl.float32)
    tgt_logit = tl.zeros([BLOCK_N], tl.float32)
    score_logit = tl.zeros([BLOCK_N, M_PAD], tl.float32)
    for s in range(0, n_splits):
        part = s * N + rows64
        shift = tl.load(part_max_ptr + part, mask=row_ok, other=0.0) - g_max
        p_sum = tl.load(part_sum_ptr + part, mask=row_ok, other=1.0)
        alpha = tl.exp(shift)
        if RETURN_ENTROPY:
            p_ent = tl.load(part_ent_ptr + part, mask=row_ok, other=0.0)
            g_ent += alpha * (p_ent + shift * p_sum)
        g_sum += alpha * p_sum
        tgt_logit += tl.load(part_tgt_ptr + part, mask=row_ok, other=0.0)
        if HAS_SCORES:
            score_logit += tl.load(part_score_ptr + part[:, None] * M + jj[None, :],
                                   mask=row_ok[:, None] & j_ok[None, :], other=0.0)

    log_sum = tl.log(g_sum)
    lse = g_max + log_sum
    tl.store(lse_ptr + rows64, lse, mask=row_ok)
    tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=ignore_index)
    # rounding clamps are where()s, not tl.minimum / tl.maximum, which drop a NaN: a non-finite
    # row must come out non-finite, not as log-prob 0 and entropy 0
    logp = tgt_logit - lse
    logp = tl.where(tgt != ignore_index, tl.where(logp > 0.0, 0.0, logp), 0.0)
    tl.store(logp_ptr + rows64, logp, mask=row_ok)
    if RETURN_ENTROPY:
        ent = log_sum - g_ent / g_sum
        tl.store(ent_ptr + rows64, tl.where(ent < 0.0, 0.0, ent), mask=row_ok)

    if HAS_SCORES:
        s_logp = score_logit - lse[:, None]
        s_logp = tl.where(s_logp > 0.0, 0.0, s_logp)
        if NORMALIZE:
            s_valid = tl.where(j_ok[None, :], s_logp, float("-inf"))
            s_max = tl.max(s_valid, axis=1)
            s_lse = s_max + tl.log(tl.sum(tl.exp(s_valid - s_max[:, None]), axis=1))
            s_logp = s_logp - s_lse[:, None]
            s_logp = tl.where(s_logp > 0.0, 0.0, s_logp)
        p = tl.where(j_ok[None, :], tl.exp(s_logp), 0.0)
        vals = tl.load(sval_ptr + jj, mask=j_ok, other=0.0)
        yhat = tl.sum(p * vals[None, :], axis=1)
        tl.store(slogp_ptr + rows64[:, None] * M + jj[None, :], s_logp, mask=row_ok[:, None] & j_ok[None, :])
        tl.store(yhat_ptr + rows64, yhat, mask=row_ok)
        sq = tl.zeros([BLOCK_N], tl.float32)
        if HAS_YTGT:
            y = tl.load(ytgt_ptr + rows64, mask=row_ok, other=0.0)
            sq = (yhat - y) * (yhat - y)
            if HAS_YMASK:
                keep = tl.load(ymask_ptr + rows64, mask=row_ok, other=0)
                sq = tl.where(keep != 0, sq, 0.0)
        tl.store(sq_ptr + rows64, sq, mask=row_ok)
