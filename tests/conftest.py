"""Test-wide settings.

TRITON_INTERPRET=1 must be set before triton is first imported so that the Triton
kernels run on CPU tensors (this is how CI tests them: no GPU).  TB_TEST_DEVICE=cuda
(bench/gpu.py on a GPU machine) leaves it unset: tests/test_kernels.py then runs the
compiled kernels on CUDA tensors.
"""
import os

if os.environ.get("TB_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test (experiment-sized runs: steady timing, no
    oversubscription of the 2-core CI machine); ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
