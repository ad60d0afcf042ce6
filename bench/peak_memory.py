"""Peak tensor memory of a piece of code on any device, CPU included.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no such statistic
and process RSS cannot resolve a few MB of activations.  :func:`peak_tensor_bytes` runs
the code under a ``TorchDispatchMode`` that sees every tensor an operator returns, counts
each new storage's bytes once, and subtracts them when the storage is freed: the peak of
that running sum is the peak memory held by tensors created inside the call (inputs and
tensors alive before the call are not counted).  An output that shares its storage with one
of the operator's inputs (a view such as ``t()`` of a weight, an in-place or ``out=`` op)
is not new memory and is not counted: before that rule a transposed weight counted its
parameter's bytes as allocated (bench/RESULTS.md §16).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen = set()

    def _release(self, key, nbytes):
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and not a.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self.seen or key in inputs or st.nbytes() == 0:
                    continue
                self.seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._release, key, st.nbytes())
        return out


def peak_tensor_bytes(fn) -> int:
    """Run ``fn()`` and return the peak bytes held by tensors it created."""
    tracker = _StorageTracker()
    with tracker:
        fn()
    return tracker.peak
