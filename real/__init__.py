"""real: the REAL algorithm (rewards, RLOO advantages, losses), its baselines, judge data,
RAIL inference, correlation metrics and a thin training loop, on top of ``real_kernels``."""
__version__ = "0.1.0"
