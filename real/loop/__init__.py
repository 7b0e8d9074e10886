"""The training loop: ``real train``'s flags and config, the step loop (``train.Trainer``),
rollout engines, the run folder, checkpoints and resuming, non-finite steps.  It drives
``real.methods``; it is the only package that imports every other one of ``real``."""
