"""Lower every kernel exactly as it is launched, for Hopper, without a GPU: ``python -m real_kernels.ops.compile_check``.

The CPU interpreter runs the kernels' arithmetic but never Triton's compiler.
This builds the real launches (``head_launches.py``, ``chunk_pass.py``; the
chunked forward's combine over one split too) from
meta tensors at the benchmark shapes (N = 16,384 and 16,400, H = 4,096 and
5,120, V = 151,936; bf16, and fp32), for every block configuration the
autotuner may pick and every constexpr branch, derives the argument
specialisations Triton's JIT would (16-byte aligned pointers and integers
divisible by 16 are marked so; an integer equal to 1 becomes a constant,
unless the kernel says ``do_not_specialize``),
compiles each distinct launch to PTX and a cubin for sm_90 with the ptxas
bundled in the triton wheel, and fails when a kernel

- needs more than 227 KiB of shared memory (an H100/H200 block's limit),
- spills registers (ptxas -v),
- lowers a bf16 / fp16 (or fp32 as tf32x3) ``tl.dot`` to anything but ``wgmma`` (Hopper's tensor-core MMA),
- keeps a GPU- or system-wide fence inside a loop: ``membar.gl``, ``fence.sc|acq_rel.gpu|sys``, or an
  atomic with acquire / release semantics (``tl.atomic_add``'s default), which ptxas fences;
- writes over its own input (``IN_PLACE``, the bf16 dlogits over the fp32 logits) without a CTA barrier
  (``bar.sync`` / ``barrier.sync``) inside its loop: the ordering that keeps one thread's store from reaching
  a column another thread has yet to read (``chunk_dlogits.py``).

One line per kernel with those figures.  Must run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

SMEM_LIMIT = 227 * 1024
SHAPES = ((16_384, 5_120, 151_936), (16_400, 5_120, 151_936), (16_384, 4_096, 151_936))
FREE_BYTES = 120 << 30  # the chunk plan as on an H200 with a model loaded (the plan's cap decides there)
# an explicit fence, or an atomic with ordering semantics (ptxas wraps it in MEMBAR.*.GPU, as for tl.atomic_add's
# default acq_rel); relaxed atomics carry no fence
FENCE = re.compile(r"\b(membar\.(gl|sys)|fence\.(sc|acq_rel)\.(gpu|sys)|(atom|red)\.[\w.]*\.(acq_rel|acquire|release|sc)\b)")
LABEL = re.compile(r"^\s*(\$\w+):")
BRANCH = re.compile(r"\bbra(\.uni)?\s+(\$\w+);")
BARRIER = re.compile(r"\b(bar|barrier)\.sync\b")


@dataclass
class Report:
    name: str
    shared: int
    registers: int
    spill_bytes: int
    dot: str  # "wgmma", "mma", "fma" or "-" when the kernel has no tl.dot
    fences_in_loops: int
    barriers_in_loops: int
    problems: List[str]


def launches() -> Iterator[Tuple[str, object]]:
    """(label, Launch) for every launch the library makes at the benchmark shapes."""
    # here, not at the top: torch and triton (which the launch modules import) load only when the check runs
    import torch

    from ..core.sizing import default_chunk_size
    from .chunk_pass import block_v_for, dlogits_launch, dlogits_view, lse_launch
    from .head_config import gpu_configs
    from .head_launches import combine_launch, forward_launches, forward_partials, score_grad_launch

    meta = dict(device="meta")
    for (n, d, v), dtype in ((s, dt) for s in SHAPES for dt in (torch.bfloat16, torch.float32)):
        dname = str(dtype).replace("torch.", "")
        hidden = torch.empty(n, d, dtype=dtype, **meta)
        weight = torch.empty(v, d, dtype=dtype, **meta)
        targets = torch.empty(n, dtype=torch.long, **meta)
        ids = torch.empty(5, dtype=torch.long, **meta)
        values = torch.empty(5, dtype=torch.float32, **meta)
        for flags in (True, False):
            y = torch.empty(n, dtype=torch.float32, **meta) if flags else None
            mask = torch.empty(n, dtype=torch.bool, **meta) if flags else None
            score_ids = ids if flags else ids[:0]
            for i, cfg in enumerate(gpu_configs(dtype)):
                partial, combine, out = forward_launches(hidden, weight, targets, score_ids, values if flags else
                                                         values[:0], y, mask, flags, 0.7, -100, flags, cfg)
                yield f"forward_partial[{dname}, cfg{i}, scores+entropy={flags}]", partial
            yield f"forward_combine[flags={flags}]", combine
            # judge_head(memory="high"): the same combine over one split filled by the chunked pass
            one_split, _ = combine_launch(forward_partials(1, n, score_ids.numel(), flags, "meta"), targets,
                                          values if flags else values[:0], y, mask, flags, -100, flags)
            yield f"forward_combine[one split, flags={flags}]", one_split
            g = torch.empty(n, dtype=torch.float32, **meta) if flags else None
            g_s = torch.empty(n, score_ids.numel(), dtype=torch.float32, **meta) if flags else None
            launch, _, _ = score_grad_launch(targets, g, out.slogp, out.yhat, values if flags else values[:0], y,
                                             out.mask_u8, g_s, g, g, flags, -100)
            yield f"score_grad[flags={flags}]", launch
            chunk = default_chunk_size(n, v, torch.device("cuda"), dtype, free_bytes=FREE_BYTES)
            z = torch.empty(chunk, v, dtype=torch.float32, **meta)  # fp32 logits for every input dtype
            lse_l, lse, ent = lse_launch(z, 1.0 / 0.7, flags, block_v_for(v))
            yield f"chunk_lse[{dname}, entropy={flags}]", lse_l
            yield (f"chunk_dlogits[{dname}, entropy={flags}]",
                   dlogits_launch(z, dlogits_view(z, dtype), lse, lse, ent, 1.0 / 0.7, block_v_for(v)))


def _specialise(launch) -> Tuple[Dict[str, str], Dict[str, object], Dict[Tuple[int, ...], list]]:
    """Signature, constexprs and divisibility attributes as Triton's JIT derives them from these arguments."""
    import torch

    fn = launch.kernel
    signature: Dict[str, str] = {}
    constexprs: Dict[str, object] = dict(launch.constexprs)
    attrs: Dict[Tuple[int, ...], list] = {}
    unspecialised = {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)}
    for name, value in launch.args.items():
        index = fn.arg_names.index(name)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                                      torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8",
                                      torch.bool: "i1"}[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{launch.name}: argument {name} of type {type(value).__name__}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in unspecialised:
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and name not in unspecialised:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in launch.constexprs:
        signature[name] = "constexpr"
    for name in constexprs:
        signature.setdefault(name, "constexpr")
    ordered = {name: signature[name] for name in fn.arg_names if name in signature}
    return ordered, constexprs, attrs


def _ptxas_binaries():
    """The ptxas builds shipped in the triton wheel, newest first (3.9 ships a newer one for PTX 9.x)."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return [os.path.join(folder, name) for name in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(folder, name))]


def _ptxas(ptx: str, arch: str) -> Tuple[int, int]:
    """(registers, spill bytes) from ptxas -v, with the first bundled ptxas that accepts this PTX version."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_binaries():
            proc = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                info = proc.stderr + proc.stdout
                regs = max((int(x) for x in re.findall(r"Used (\d+) registers", info)), default=0)
                spills = sum(int(a) + int(b) for a, b in
                             re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info))
                return regs, spills
            errors.append(f"{os.path.basename(ptxas)}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("no bundled ptxas assembled the PTX: " + " | ".join(errors))


def _in_loops(ptx: str, pattern: "re.Pattern[str]") -> int:
    """Lines matching ``pattern`` between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line))}
    loops = [(labels[m.group(2)], j) for j, line in enumerate(lines)
             if (m := BRANCH.search(line)) and labels.get(m.group(2), j + 1) <= j]
    hits = [i for i, line in enumerate(lines) if pattern.search(line)]
    return sum(1 for i in hits if any(a <= i <= b for a, b in loops))


def fences_in_loops(ptx: str) -> int:
    """GPU- or system-wide fences between a label and a later branch back to it."""
    return _in_loops(ptx, FENCE)


def barriers_in_loops(ptx: str) -> int:
    """CTA barriers (``bar.sync`` / ``barrier.sync``) between a label and a later branch back to it."""
    return _in_loops(ptx, BARRIER)


def _dot_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def check(launch, arch: int, seen: Dict[tuple, Report]) -> Optional[Report]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(launch)
    key = (launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.name, tuple(signature.items()),
           tuple(sorted(constexprs.items())), tuple(sorted(attrs)), launch.num_warps, launch.num_stages)
    if key in seen:
        return None
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    kernel = triton.compile(ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=target, options=options)
    ptx = kernel.asm["ptx"]
    ptx_arch = (re.search(r"\.target\s+(sm_\w+)", ptx) or [None, f"sm_{arch}"])[1]
    regs, spills = _ptxas(ptx, ptx_arch)
    has_dot = "tl.dot" in launch.kernel.src
    tensor_core_dot = has_dot and launch.constexprs.get("DOT_PRECISION") != "ieee"
    kind = _dot_kind(ptx) if has_dot else "-"
    if has_dot and kind == "-":
        kind = "fma"
    report = Report(launch.name, kernel.metadata.shared, regs, spills, kind, fences_in_loops(ptx),
                    barriers_in_loops(ptx), [])
    if report.shared > SMEM_LIMIT:
        report.problems.append(f"shared memory {report.shared} B > {SMEM_LIMIT} B")
    if spills:
        report.problems.append(f"{spills} bytes of register spills")
    if tensor_core_dot and arch >= 90 and kind != "wgmma":
        report.problems.append(f"tensor-core dot (bf16/fp16, tf32x3) lowered to {kind}, not wgmma")
    if report.fences_in_loops:
        report.problems.append(f"{report.fences_in_loops} GPU-wide fence(s) inside a loop")
    if launch.constexprs.get("IN_PLACE") and not report.barriers_in_loops:
        report.problems.append("writes over its own input with no CTA barrier inside its loop")
    seen[key] = report
    return report


def compile_all(arch: int = 90, verbose: bool = True) -> Tuple[int, int]:
    """(kernels compiled, kernels with problems)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    seen: Dict[tuple, Report] = {}
    failed = 0
    for label, launch in launches():
        report = check(launch, arch, seen)
        if report is None:
            continue
        failed += bool(report.problems)
        if verbose:
            verdict = "ok" if not report.problems else "FAIL: " + "; ".join(report.problems)
            print(f"{label:<52} smem {report.shared:>6} B  regs {report.registers:>3}  spills {report.spill_bytes:>4} B  "
                  f"dot {report.dot:<5}  fences-in-loops {report.fences_in_loops}  "
                  f"barriers-in-loops {report.barriers_in_loops}  {verdict}", flush=True)
    return len(seen), failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90, Hopper)")
    args = parser.parse_args(argv)
    compiled, failed = compile_all(args.arch)
    print(f"{compiled} kernel variants compiled for sm_{args.arch}, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
