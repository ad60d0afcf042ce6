"""Test-wide settings.

TRITON_INTERPRET=1 must be set before triton is first imported so that the Triton
kernels run on CPU tensors (this is how CI tests them: no GPU).  TB_TEST_DEVICE=cuda
(bench/gpu.py on a GPU machine) leaves it unset: tests/test_kernels.py then runs the
compiled kernels on CUDA tensors.
"""
import os
import sys

if os.environ.get("TB_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` (the README's command) puts the current folder on sys.path; from the
# repository root that makes its top-level kernels/ folder importable as `kernels`, which
# shadows the PyPI package of that name that transformers imports (transformers then fails
# on `from kernels import CUDAProperties`). The library is installed (pip install -e .), so
# the tests never need the root on the path: drop it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]


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
