"""The CPU demo (``real demo``): warm-up then REAL and its baselines on the synthetic task with
the tiny model, its plots and report, and ``python -m real.cpu_demo.diagnose`` for a checkpoint."""
