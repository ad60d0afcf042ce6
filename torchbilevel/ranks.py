"""What the ranks of a process group hold, checked and gathered at a problem's first call:
equal shares of every batch, and sharded (DTensor) parameters as full tensors.  Imports
only torch: the problem layer uses it."""
from __future__ import annotations

import collections.abc

import torch
from torch import Tensor

__all__ = ["check_equal_batches", "gathered"]


def _leading_size(batch) -> int:
    """The leading dimension of the first tensor in ``batch`` (a tensor, tuple, list or
    dict of them), or -1 when there is none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else -1
    items = batch.values() if isinstance(batch, collections.abc.Mapping) else (
        batch if isinstance(batch, (tuple, list)) else ())
    for item in items:
        n = _leading_size(item)
        if n >= 0:
            return n
    return -1


def check_equal_batches(inner_sample, outer_batch) -> None:
    """ValueError unless every rank holds the same number of samples in its share of the
    inner batch (and of the outer batch, when it is not an iterator): the mean over ranks
    of per-rank means is the full-batch mean only for equal shares.  One all-reduce."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    n_out = -1 if isinstance(outer_batch, collections.abc.Iterator) else _leading_size(outer_batch)
    n_in = _leading_size(inner_sample)
    sizes = torch.tensor([n_in, -n_in, n_out, -n_out], dtype=torch.float64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    for name, hi, lo in (("inner_batch", sizes[0], -sizes[1]), ("outer_batch", sizes[2], -sizes[3])):
        if hi != lo:
            raise ValueError(f"{name}: the ranks hold different numbers of samples ({int(lo)} to {int(hi)}); "
                             "each rank must hold an equal share of every batch (objectives are means: the "
                             "mean over ranks equals the full-batch mean only for equal shares)")


def gathered(tree):
    """DTensor values (a sharded model) all-gathered into plain full tensors (a collective:
    every rank calls it at the same point); other values as they are."""
    return {k: (t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "placements") else t)
            for k, t in tree.items()}
