"""Triton kernels of the fused judge head, one file per phase (docs/design.md, "Layout").

- ``forward.py``: ``judge_head``'s forward: one pass over vocabulary tiles per
  (row block, vocabulary split), in grouped order: online max / sum / entropy
  and the picked target and score-token logits; then a combine kernel that
  merges the splits and runs the O(N m) score epilogue.
- ``score_grad.py``: backward of the score epilogue, O(N m): upstream gradients
  of the outputs become per-row gradients of the raw log-probs.
- ``chunk_lse.py``, ``chunk_dlogits.py``: one read (statistics) and one
  read-write (dlogits in place) of a chunk of logits that cuBLAS wrote; used by
  ``judge_loss`` and by ``judge_head``'s backward (``recompute_backward.py``).
- ``launch.py``, ``head_config.py``, ``head_launches.py``, ``chunk_pass.py``:
  launches as data, block sizes and their autotuning, the launch builders.
- ``fused_head.py``: the autograd wrapper.
- ``compile_check.py``: lowers every launch at the benchmark shapes for sm_90
  without a GPU and checks shared memory, spills, wgmma and fences.
"""
