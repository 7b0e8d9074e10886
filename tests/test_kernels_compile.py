"""The kernels lower to a Hopper cubin, not only run in the interpreter.

The CPU interpreter never invokes Triton's compiler; this test does (in a
subprocess, since TRITON_INTERPRET=1 is set for this one), for every kernel,
input dtype and constexpr branch, with the ptxas bundled in the triton wheel.
No GPU is needed to compile.
"""
import os
import subprocess
import sys


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "real_kernels.ops.compile_check", "--arch", "90"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "16 kernel variants compiled for sm_90" in proc.stdout
