"""Test-wide settings.

TRITON_INTERPRET=1 must be set before triton is first imported so that the Triton
kernels run on CPU tensors (this is how CI tests them: no GPU).  TB_TEST_DEVICE=cuda
(bench/gpu.py on a GPU machine) leaves it unset: tests/test_kernels.py then runs the
compiled kernels on CUDA tensors.
"""
import os

if os.environ.get("TB_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
