"""Test-wide settings.

TRITON_INTERPRET=1 must be set before triton is first imported so that the Triton
kernels run on CPU tensors (this is how CI tests them: no GPU).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
