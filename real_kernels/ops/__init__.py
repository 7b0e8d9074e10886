"""Triton kernels of the fused judge head, one file per phase.

- ``forward.py``: one pass over vocabulary tiles per (row block, vocabulary
  split): online max / sum / entropy accumulators and the picked target and
  score-token logits; then a combine kernel that merges the splits and runs the
  O(N m) score epilogue (renormalisation, expected score, squared error).
- ``score_grad.py``: backward of the score epilogue, O(N m): turns upstream
  gradients of the outputs into per-row gradients of the raw log-probs.
- ``backward.py``: recomputes each logits tile, forms ``dlogits`` (DESIGN.md
  section 2) and accumulates ``dh`` and ``dW`` in fp32.
- ``fused_head.py``: the autograd wrapper and launch configuration.
"""
