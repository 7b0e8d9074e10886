"""Microbenchmarks of the fused LM head against naive PyTorch and the peer libraries.

Run ``python -m benchmarks --help`` from the repository (the package is not installed).  Layout, one job
per module:

- ``shapes``: problem sizes and the named presets;
- ``providers``: naive PyTorch, our torch / triton backends, Liger-Kernel and
  Cut Cross-Entropy behind one interface (and how the peers get the judge head);
- ``workloads``: the operations timed and their inputs;
- ``measure``: time and peak memory of one case; ``worker``: a fresh process per provider;
- ``runner``: a sweep of cases with a progress bar;
- ``report`` / ``plots`` / ``output``: CSV (Liger-Kernel's layout), JSON, markdown, PNG;
- ``gpu_check``: the one-shot correctness-and-speed check on a CUDA machine;
- ``test_bench_head``: a pytest-benchmark layer (``pytest benchmarks --benchmark-only``).
"""
