"""dlogits of a chunk, written over its logits: the dense term of loss mode.

With per-row coefficients from the caller's loss (``loss_rows.RowCoefficients``,
already divided by ``tau``), every column of a row gets

    d loss / d raw_v = p_v (dense - ent * log p_v),   p_v = exp(raw_v / tau - lse)

in fp32 from the fp32 logits ``z``, stored in the inputs' dtype at ``dz`` (bf16
on the GPU, ready for the two cuBLAS GEMMs ``dh = dz W`` and ``dW += dz^T h``).
``dz`` may be the first half of each fp32 row of ``z`` itself (row stride 2V in
bf16 elements, ``IN_PLACE``): a row's bf16 store of columns [v0, v0 + B)
overwrites the bytes of its fp32 columns [v0 / 2, (v0 + B) / 2), which lie in
this step's block or earlier ones and never in a later one.  Those columns were
read by *other threads* of the program, so the store must wait for every
thread's load of the step: ``tl.debug_barrier()`` (a CTA barrier) between them.
Without it the first step raced (a thread overwrote half of an fp32 logit that a
slower warp had yet to read) and an H200 gave gradients that differed between
two identical calls (``benchmarks/determinism.py``, 2026-12-04); the CPU
interpreter, which runs a step's load before its store, cannot show it.
Prefetched loads of later steps are safe: a step's stores never reach a later
block.  The few columns that also carry a delta (the target, the score tokens)
are overwritten afterwards in fp32 by ``loss_rows.special_values``.  One
program per row; one read, one write.
"""
import triton
import triton.language as tl


@triton.jit
def chunk_dlogits_kernel(
    z_ptr, dz_ptr, lse_ptr, dense_ptr, ent_ptr,
    V, stride_z, stride_dz, inv_temp,
    BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr, IN_PLACE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    out = dz_ptr + row * stride_dz
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    dense = tl.load(dense_ptr + row)
    if HAS_ENT:
        ent = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
        logp = z * inv_temp - lse
        if HAS_ENT:
            dz = tl.exp(logp) * (dense - ent * logp)
        else:
            dz = tl.exp(logp) * dense
        if IN_PLACE:
            tl.debug_barrier()  # every thread has read this block before any thread overwrites part of it
        tl.store(out + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)
