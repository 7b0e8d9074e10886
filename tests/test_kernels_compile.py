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
