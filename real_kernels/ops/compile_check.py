"""Compile every kernel for a CUDA target without a GPU: ``python -m real_kernels.ops.compile_check``.

The CPU interpreter runs the kernels' arithmetic but not Triton's compiler, so
code that is fine under ``TRITON_INTERPRET=1`` can still fail to lower for a
GPU (a type mix in ``tl.dot``, a loop-carried value changing type, too much
shared memory).  This lowers each kernel, for each input dtype and for the
constexpr branches on and off, to a cubin for Hopper (sm_90) with the ptxas
that ships in the triton wheel.  Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

PTR_F32, I32, I64 = "*fp32", "i32", "*i64"
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _signature(args, constexprs):
    sig = dict(args)
    sig.update({k: "constexpr" for k in constexprs})
    return sig


def _cases():
    from .backward import head_backward_kernel
    from .forward import head_forward_combine_kernel, head_forward_partial_kernel
    from .score_grad import score_grad_kernel

    for dtype, flag in itertools.product(DTYPES, (True, False)):
        ptr = DTYPES[dtype]
        precision = "ieee" if dtype == "fp32" else "tf32"
        upcast = dtype == "fp32"
        fwd_args = [("h_ptr", ptr), ("w_ptr", ptr), ("tgt_ptr", I64), ("sid_ptr", I64)]
        fwd_args += [(n, PTR_F32) for n in ("part_max_ptr", "part_sum_ptr", "part_ent_ptr", "part_tgt_ptr", "part_score_ptr")]
        fwd_args += [(n, I32) for n in ("N", "V", "D", "M", "tiles_per_split", "stride_hn", "stride_wv")] + [("inv_temp", "fp32")]
        consts = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, M_PAD=16, HAS_SCORES=flag, RETURN_ENTROPY=flag,
                      UPCAST=upcast, DOT_PRECISION=precision)
        yield f"forward_partial[{dtype}, flags={flag}]", head_forward_partial_kernel, _signature(fwd_args, consts), consts

        bwd_args = [("h_ptr", ptr), ("w_ptr", ptr), ("tgt_ptr", I64), ("sid_ptr", I64)]
        bwd_args += [(n, PTR_F32) for n in ("lse_ptr", "ent_ptr", "glogp_ptr", "graw_ptr", "coef_ptr", "gent_ptr", "dh_ptr", "dw_ptr")]
        bwd_args += [(n, I32) for n in ("N", "V", "D", "M", "stride_hn", "stride_wv")] + [("inv_temp", "fp32"), ("ignore_index", I32)]
        consts = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, HAS_SCORES=flag, HAS_GLOGP=flag, HAS_GENT=flag,
                      COMPUTE_DH=True, COMPUTE_DW=True, UPCAST=upcast, DOT_PRECISION=precision)
        yield f"backward[{dtype}, flags={flag}]", head_backward_kernel, _signature(bwd_args, consts), consts

    for flag in (True, False):
        comb_args = [(n, PTR_F32) for n in ("part_max_ptr", "part_sum_ptr", "part_ent_ptr", "part_tgt_ptr", "part_score_ptr")]
        comb_args += [("tgt_ptr", I64), ("sval_ptr", PTR_F32), ("ytgt_ptr", PTR_F32), ("ymask_ptr", "*u8")]
        comb_args += [(n, PTR_F32) for n in ("lse_ptr", "logp_ptr", "ent_ptr", "slogp_ptr", "yhat_ptr", "sq_ptr")]
        comb_args += [(n, I32) for n in ("N", "M", "n_splits", "ignore_index")]
        consts = dict(BLOCK_N=64, M_PAD=16, HAS_SCORES=flag, RETURN_ENTROPY=flag, NORMALIZE=flag,
                      HAS_YTGT=flag, HAS_YMASK=flag)
        yield f"forward_combine[flags={flag}]", head_forward_combine_kernel, _signature(comb_args, consts), consts

        sg_args = [("tgt_ptr", I64)] + [(n, PTR_F32) for n in ("glogp_ptr", "slogp_ptr", "yhat_ptr", "sval_ptr", "ytgt_ptr")]
        sg_args += [("ymask_ptr", "*u8")] + [(n, PTR_F32) for n in ("gslogp_ptr", "gyhat_ptr", "gsq_ptr", "graw_ptr", "coef_ptr")]
        sg_args += [(n, I32) for n in ("N", "M", "ignore_index")]
        consts = dict(BLOCK_N=64, M_PAD=16, HAS_SCORES=flag, NORMALIZE=flag, HAS_YTGT=flag, HAS_YMASK=flag,
                      HAS_GLOGP=flag, HAS_GSLOGP=flag, HAS_GYHAT=flag, HAS_GSQ=flag)
        yield f"score_grad[flags={flag}]", score_grad_kernel, _signature(sg_args, consts), consts


def compile_all(arch: int = 90, verbose: bool = True) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    count = 0
    for name, fn, signature, constexprs in _cases():
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=target, options={"num_warps": 8, "num_stages": 2})
        count += 1
        if verbose:
            print(f"{name:<40} sm_{arch} ok, shared memory {kernel.metadata.shared} B")
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90, Hopper)")
    args = parser.parse_args(argv)
    n = compile_all(args.arch)
    print(f"{n} kernel variants compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
