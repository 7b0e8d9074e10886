"""The kernels lower for Hopper exactly as they are launched, and pass the compile check.

The CPU interpreter never invokes Triton's compiler; this test does (in a
subprocess, since TRITON_INTERPRET=1 is set for this one), with the ptxas
bundled in the triton wheel: every launch at the benchmark shapes, every block
configuration the autotuner may pick, every constexpr branch.  No GPU is needed.
"""
import os
import subprocess
import sys
import textwrap

NO_INTERPRETER = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_DEFAULT_FP_FUSION": "1"}


def test_every_launch_compiles_for_sm90_without_spills_fences_or_non_wgmma_dots():
    proc = subprocess.run([sys.executable, "-m", "real_kernels.ops.compile_check", "--arch", "90"],
                          env=NO_INTERPRETER, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith("kernel variants compiled for sm_90, 0 with problems"), last
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("forward_partial[bfloat16", "chunk_"))]
    assert lines and all(" ok" in line for line in lines)
    assert all("dot wgmma" in line for line in lines if line.startswith("forward_partial"))


def test_the_fence_detector_sees_an_acq_rel_atomic_in_a_loop(tmp_path):
    """The check is only worth something if it fails on the pattern it exists for (the old backward's atomics)."""
    script = textwrap.dedent('''
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from real_kernels.ops.compile_check import fences_in_loops

        @triton.jit
        def k(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            for i in range(0, n):
                tl.atomic_add(x_ptr + offs, 1.0)

        @triton.jit
        def relaxed(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            for i in range(0, n):
                tl.atomic_add(x_ptr + offs, 1.0, sem="relaxed")

        for fn in (k, relaxed):
            src = ASTSource(fn=fn, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            print(fn.__name__, fences_in_loops(ptx))
    ''')
    path = tmp_path / "fence_probe.py"  # @triton.jit needs its source in a file
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env=NO_INTERPRETER, capture_output=True, text=True,
                          timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert int(counts["k"]) > 0 and int(counts["relaxed"]) == 0, counts


def test_the_in_place_dlogits_launch_orders_loads_before_stores():
    """bf16 dlogits written over the fp32 logits' own rows reach columns other threads read: the launch must say
    IN_PLACE (the kernel then puts a CTA barrier between a step's loads and stores, which the compile check
    requires).  Without it an H200 gave two identical judge_loss calls different gradients (2026-12-04)."""
    import torch

    from real_kernels.ops.chunk_pass import dlogits_launch, dlogits_view

    z = torch.zeros(3, 10)
    lse, dense = torch.zeros(3), torch.zeros(3)
    over_z = dlogits_launch(z, dlogits_view(z, torch.bfloat16), lse, dense, None, 1.0, 16)
    apart = dlogits_launch(z, torch.empty(3, 10, dtype=torch.bfloat16), lse, dense, None, 1.0, 16)
    fp32_in_place = dlogits_launch(z, dlogits_view(z, torch.float32), lse, dense, None, 1.0, 16)
    assert over_z.constexprs["IN_PLACE"] is True
    assert apart.constexprs["IN_PLACE"] is False
    assert fp32_in_place.constexprs["IN_PLACE"] is False  # each thread overwrites only the element it read


def test_the_barrier_detector_sees_a_barrier_only_where_the_loop_has_one():
    ptx = "\n".join([
        "$L__BB0_2:",
        "\tld.global.v4.b32 { %r9 }, [ %rd17 + 0 ];",
        "\tbar.sync \t0;",
        "\tst.global.v4.b32 [ %rd21 + 0 ], { %r26 };",
        "\t@%p4 bra \t$L__BB0_2;",
        "$L__BB0_3:",
        "\tbarrier.sync 0;",
    ])
    from real_kernels.ops.compile_check import barriers_in_loops

    assert barriers_in_loops(ptx) == 1
    assert barriers_in_loops(ptx.replace("\tbar.sync \t0;", "")) == 0
