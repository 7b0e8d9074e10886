"""What the two-rank tests share: a free TCP port for the process group, and the "same weights" check."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(expected, got, what, atol=2e-5):
    """Same keys, and every tensor within ``atol`` (2% of one lr-1e-3 AdamW step): Adam divides by sqrt(v), so
    an element whose gradient is ~0 moves by an amount that fp32 summation order (ranks vs one process) can
    change in its last digits."""
    assert set(expected) == set(got), f"{what}: state-dict keys differ"
    for key, value in expected.items():
        diff = (value.float() - got[key].float()).abs().max().item()
        assert diff <= atol, f"{what}: {key} differs by {diff:.3g}"
