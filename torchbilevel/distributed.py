"""Data-parallel hypergradients over a ``torch.distributed`` process group.

N processes each hold 1/N of every batch.  When ``g`` and ``f`` are *means* over the
samples they see and the shards have equal size, the full-batch gradient is the mean of
the per-process gradients, and so is every derivative product (they are linear in the
loss).  :func:`data_parallel` returns the problem with a ``reduce`` hook that averages a
flat buffer over the group; the library passes each data-dependent derivative through it
(:meth:`torchbilevel.Bilevel.average`), so every process computes the full-batch result:

    import torch.distributed as dist, torchbilevel as tb
    dist.init_process_group("nccl")                  # "gloo" on CPU; torchrun sets the env
    problem = tb.distributed.data_parallel(tb.Bilevel(outer=f, inner=g))
    algo = tb.fdehbo(problem, ...)                   # or tb.double_loop / tb.hypergrad
    state = algo.step(state, my_inner_shard, my_outer_shard)

Collectives per call (each one all-reduce of one raveled buffer):

- FdeHBO / FMBO step: **one** — all gradient rows of the step (∇y g at the current and
  previous iterate, the four perturbed or two exact products, ∇x f and ∇y f) in one buffer.
- AID hypergradient: 1 (∇x f, ∇y f and f together) + 1 per Hessian-vector product of the
  solver (+1 for the warm start's initial residual) + 1 (the mixed product).  The linear
  solve needs the *averaged* operator at every iteration, so one collective per product
  is unavoidable: the next CG direction depends on the averaged previous product.
- stocBiO: 1 + one per Neumann term + 1 (mixed product).
- double_loop step: one per warm-start inner step (∇y g), plus the estimator's.
- ITD: one per unrolled step forward and one per step backward, plus one at the end
  (the hypergradient and f).  PZOBO: one per inner step of each path, plus one.

Not owned by the library: the data sharding (use a ``DistributedSampler`` or slice each
batch by rank), the seeds (PZOBO's ``generator`` must be seeded identically on every rank
so that all ranks use the same directions), and the iterators.  All ranks must call the
same functions in the same order with shards of equal size.  Results are identical on
every rank (all-reduce returns the same bits everywhere), so host-side decisions — the
finite check, CG's tolerance — agree and no rank is left waiting.  A rank whose objective
raises leaves the others blocked in the next collective: fix such errors with one process.

Not supported: torch.func transforms (vmap over tasks) around a data-parallel problem —
collectives cannot run on batched tensors (RuntimeError).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .problem import Bilevel, check_problem

__all__ = ["data_parallel", "MeanAllReduce", "mean_all_reduce"]


class _MeanAllReduceFn(torch.autograd.Function):
    """Mean over the group of a 1-D buffer; its backward is the same mean of the incoming
    gradient, which makes ITD's unrolled data-parallel steps differentiable: with every
    rank backpropagating its own loss f_r, each rank's backward yields its share of the
    gradient of Σ_r f_r, and a final mean over ranks gives the gradient of the mean loss."""

    @staticmethod
    def forward(ctx, flat: Tensor, group, world: int) -> Tensor:
        ctx.group, ctx.world = group, world
        out = flat.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.div_(world)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.div_(ctx.world), None, None


def mean_all_reduce(flat: Tensor, group=None) -> Tensor:
    """The mean of ``flat`` (a 1-D tensor) over the processes of ``group`` (default: the
    world), as a new tensor; differentiable (its backward averages the gradient too)."""
    if not isinstance(flat, Tensor) or flat.dim() != 1:
        raise ValueError(f"mean_all_reduce needs a 1-D tensor, got {type(flat).__name__} "
                         f"{tuple(getattr(flat, 'shape', ()))}")
    world = dist.get_world_size(group)
    if world == 1:
        return flat
    if flat.requires_grad and torch.is_grad_enabled():
        return _MeanAllReduceFn.apply(flat, group, world)
    return _MeanAllReduceFn.forward(_NoCtx(), flat, group, world)


class _NoCtx:
    """A stand-in for autograd's ctx when no graph is recorded."""


class MeanAllReduce:
    """The ``reduce`` hook of a data-parallel problem: ``hook(flat) -> mean over group``.

    ``calls`` counts the collectives issued (useful to check the per-step cost)."""

    def __init__(self, group=None):
        self.group = group
        self.calls = 0

    def __call__(self, flat: Tensor) -> Tensor:
        self.calls += 1
        return mean_all_reduce(flat, self.group)

    def __repr__(self):
        return f"MeanAllReduce(world_size={dist.get_world_size(self.group)})"


def data_parallel(problem: Bilevel, group: Optional[object] = None) -> Bilevel:
    """The same bilevel problem, with every data-dependent derivative averaged over the
    processes of ``group`` (default: the world group).

    Args:
        problem: a :class:`torchbilevel.Bilevel` whose objectives are means over the
            samples of the batch they get (each rank passes its shard).
        group: a ``torch.distributed`` process group, or None for the default group.

    Returns a new :class:`~torchbilevel.Bilevel` with ``reduce`` set to a
    :class:`MeanAllReduce`; use it with ``tb.hypergrad``, ``tb.double_loop``,
    ``tb.fdehbo`` and ``tb.fmbo`` as usual, on every rank.

    Raises:
        RuntimeError: ``torch.distributed`` is unavailable or not initialised.
        TypeError: ``problem`` is not a Bilevel.
    """
    check_problem(problem)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        raise RuntimeError("data_parallel needs an initialised process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets the env)")
    return problem.with_reduce(MeanAllReduce(group))
