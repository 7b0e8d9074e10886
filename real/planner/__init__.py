"""The memory planner (``real plan``): model shapes, the byte count of one training step,
and the plan that says whether a model and batch fit on these GPUs."""
