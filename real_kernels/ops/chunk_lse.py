"""Statistics of a materialised chunk of logits: log-sum-exp and entropy per row, one read.

Loss mode (docs/design.md, "Loss mode") has cuBLAS write a chunk's logits
``raw = h_c W^T`` ``[C, V]`` in fp32; this kernel streams each row
once (one program per row, ``BLOCK_V`` lanes) with an online max / sum per lane

- ``s = sum exp(z - m)``, ``e = sum exp(z - m) (z - m)``  (``z = raw / tau``)

and merges the lanes at the end: ``lse = M + log S``, ``H = log S - E / S``.
Centring the entropy sum on the running max keeps it free of cancellation at
``|z| ~ 1e4``.  A NaN anywhere in a row makes that row's ``lse`` NaN.
"""
import triton
import triton.language as tl


@triton.jit
def chunk_lse_kernel(
    z_ptr, lse_ptr, ent_ptr,
    V, stride_z, inv_temp,
    BLOCK_V: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    e = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
        new_m = tl.maximum(m, z)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # lanes with nothing yet
        alpha = tl.exp(m - safe_m)
        zc = tl.where(ok, z - safe_m, 0.0)
        ez = tl.where(ok, tl.exp(zc), 0.0)
        if RETURN_ENTROPY:
            shift = tl.where(s > 0, m - safe_m, 0.0)
            e = alpha * (e + shift * s) + ez * zc
        s = alpha * s + ez
        m = new_m
    big_m = tl.max(m, axis=0)
    lane_shift = tl.where(s > 0, m - big_m, 0.0)
    lane_scale = tl.where(s > 0, tl.exp(lane_shift), 0.0)
    big_s = tl.sum(s * lane_scale, axis=0)
    log_s = tl.log(big_s)
    tl.store(lse_ptr + row, big_m + log_s)
    if RETURN_ENTROPY:
        big_e = tl.sum(lane_scale * (e + lane_shift * s), axis=0)
        tl.store(ent_ptr + row, log_s - big_e / big_s)
