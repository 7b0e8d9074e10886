"""What the Triton ops (``real_kernels.ops``) and the torch backends share: argument checks,
output types, the fp64-ready reference, per-row loss terms, the gradient GEMMs and chunk sizing.
Imports torch only (and nothing of ``real_kernels`` outside ``core``)."""
