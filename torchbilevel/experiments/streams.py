"""Seeded minibatch streams: the iterators that stochastic methods draw from.

A batch argument that is an iterator is drawn from with ``next`` as often as a
method needs fresh samples (DESIGN.md); a tuple of tensors is a full batch.
"""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["minibatches", "full_batch"]


def minibatches(*tensors: torch.Tensor, batch_size: int, seed: int,
                with_index: bool = False) -> Iterator[tuple]:
    """Endless stream of random minibatches of the rows of ``tensors``.

    Each pass is a fresh permutation drawn from a ``torch.Generator`` seeded
    with ``seed``, so two streams with the same seed yield the same batches.
    With ``with_index`` every batch starts with the int64 row indices (used by
    per-sample outer variables such as hyper-cleaning weights).
    """
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError("all tensors must have the same number of rows")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    device = tensors[0].device

    def stream():
        while True:
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start:start + batch_size]
                picked = tuple(t[idx] for t in tensors)
                yield (idx, *picked) if with_index else picked

    return stream()


def full_batch(*tensors: torch.Tensor, with_index: bool = False) -> tuple:
    """The whole data as one batch, shaped like a batch of :func:`minibatches`."""
    if with_index:
        idx = torch.arange(tensors[0].shape[0], device=tensors[0].device)
        return (idx, *tensors)
    return tuple(tensors)
