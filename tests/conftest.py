"""Test setup: run the Triton kernels on the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, which is why it
is done here, at collection time, before any test module imports real_kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny shapes: one intra-op thread is as fast, and immune to a busy machine's second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
