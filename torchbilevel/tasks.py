"""``over_tasks``: a meta-batch of tasks, the meta-gradient as the mean of per-task hypergradients.

Few-shot meta-learning as a bilevel problem (stocBiO paper sec. 5; Hessian-free paper
sec. 4.3): x is shared by every task (a representation), each task i has its own inner
variable y_i (a head) and its own data (support set for g, query set for f), and

    Φ(x) = (1/N) Σ_i f_i(x, y_i*(x)),   so   ∇Φ(x) = (1/N) Σ_i ∇Φ_i(x)          (meta-gradient)

:func:`over_tasks` maps a hypergradient function (what :func:`torchbilevel.hypergrad`
returns) over a leading task dimension of y and of both batches and averages the
x-gradients.  Two mechanisms, the same numbers (float64: 1e-10):

* ``"loop"``: a Python loop over the tasks, one call of ``fn`` each (each call uses the
  library's fast autograd path: one retained graph per linear solve).
* ``"vmap"``: ``torch.func.vmap`` over the tasks (one batched call; the estimators run
  their torch.func mechanism).
* ``"auto"``: loop on CPU, vmap on CUDA (:data:`AUTO_RULE`; measured in bench/fewshot_cost.py:
  CNN4 body, 5-way 5-shot, 16 tasks, ITD(10) on the head, the vmap mode costs 1.5-2.9x the
  loop on a 2-core CPU, as does a hand-written ``torch.func`` vmap against a hand-written
  loop: batching the tasks' convolutions does not pay where one task already keeps the
  core busy.  On CUDA, 16 small tasks in one set of kernels is the expected win; not
  measured here, bench/gpu.py has the row).

Per task: train-mode BatchNorm normalises with that task's batch statistics in both modes
(running statistics untouched, as in every hypergradient); dropout draws one stream per
task (common random numbers within the task: finite-difference pairs, PZOBO's paths).
The loop draws the tasks' masks one after another, vmap draws them as one batched tensor,
so with dropout the two modes see different (equally distributed) masks.
"""
from __future__ import annotations

import collections.abc
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import tree as T
from .randomness import restored_on_error

__all__ = ["over_tasks", "MODES", "AUTO_RULE", "choose_mode", "task_count", "stack_tasks"]

MODES = ("auto", "loop", "vmap")

#: the rule ``mode="auto"`` applies, per call, from the device of x
AUTO_RULE = ("loop on CPU (vmap measured 1.5-2.9x the loop there, bench/fewshot_cost.py), "
             "vmap on CUDA and other accelerators")


def choose_mode(x: Mapping[str, Tensor]) -> str:
    """The mode ``"auto"`` picks for outer parameters ``x``: ``"loop"`` when x lives on the
    CPU, ``"vmap"`` otherwise (:data:`AUTO_RULE`)."""
    dev = next(iter(x.values())).device
    return "loop" if dev.type == "cpu" else "vmap"


def _is_stacked_list(batch) -> bool:
    """A list/tuple of per-task batches (each a container, not a tensor)."""
    return (isinstance(batch, (list, tuple)) and len(batch) > 0
            and all(not isinstance(b, Tensor) and isinstance(b, (list, tuple, dict)) for b in batch))


def stack_tasks(batch, name: str = "batch"):
    """A meta-batch with a leading task dimension on every tensor: ``batch`` itself when it
    is already stacked (a tensor, tuple or dict of tensors), or the per-task batches of a
    list stacked with ``torch.stack``.  ValueError naming ``name`` when the tasks' batches
    differ in size (different support sizes cannot share one meta-batch)."""
    if not _is_stacked_list(batch):
        return batch
    flats = [pytree.tree_flatten(b) for b in batch]
    spec0 = flats[0][1]
    for i, (_, spec) in enumerate(flats):
        if spec != spec0:
            raise ValueError(f"{name}: task {i}'s batch has another structure than task 0's")
    out = []
    for j, leaf0 in enumerate(flats[0][0]):
        leaves = [f[0][j] for f in flats]
        if not isinstance(leaf0, Tensor):
            out.append(leaf0)
            continue
        for i, t in enumerate(leaves):
            if not isinstance(t, Tensor) or t.shape != leaf0.shape:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name}: the tasks have different support sizes: leaf {j} of task 0 has shape "
                    f"{tuple(leaf0.shape)}, of task {i} {shape}; one meta-batch needs tasks of one "
                    "size (call the hypergradient per task, or group tasks by size)")
        out.append(torch.stack(leaves))
    return pytree.tree_unflatten(out, spec0)


def _lead(batch, name):
    """The leading dimensions of the tensors of a batch (ValueError for a 0-d one)."""
    if isinstance(batch, collections.abc.Iterator):
        raise TypeError(f"{name}: over_tasks needs a stacked meta-batch (tensors with a leading "
                        "task dimension), not an iterator")
    leaves, _ = pytree.tree_flatten(batch)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if not tensors or any(t.dim() == 0 for t in tensors):
        raise ValueError(f"{name} must hold tensors with a leading task dimension, got "
                         f"{[tuple(t.shape) for t in tensors] or type(batch).__name__}")
    return [tuple(t.shape) for t in tensors]


def task_count(y: Mapping[str, Tensor], inner_batch, outer_batch) -> int:
    """The number of tasks: the common leading dimension of every tensor of ``y`` and of
    both batches.  ValueError naming the argument that disagrees: y when both batches agree
    with each other and y does not (y without the task dimension), else the batch that
    differs from y.  (A y without the task dimension whose first axis happens to equal the
    number of tasks cannot be told apart here; the objective then meets a shape error.)"""
    shapes = {k: tuple(t.shape) for k, t in y.items()}
    leads = {"inner_batch": _lead(inner_batch, "inner_batch"), "outer_batch": _lead(outer_batch, "outer_batch")}
    per_batch = {name: {s[0] for s in ss} for name, ss in leads.items()}
    for name, ns in per_batch.items():
        if len(ns) != 1:
            raise ValueError(f"{name}: its tensors have different leading (task) dimensions {leads[name]}")
    n_in, n_out = per_batch["inner_batch"].pop(), per_batch["outer_batch"].pop()
    y_leads = {s[0] if s else None for s in shapes.values()}
    n_y = next(iter(y_leads)) if len(y_leads) == 1 else None
    if n_y is None or (n_in == n_out and n_y != n_in):
        n = n_in if n_in == n_out else "n_tasks"
        raise ValueError(
            f"y must have a leading task dimension of size {n} (the batches' task dimension) on every "
            f"entry, got shapes {shapes}; for one starting point shared by all tasks expand it: "
            "{k: v.expand(n_tasks, *v.shape)}")
    for name, m in (("inner_batch", n_in), ("outer_batch", n_out)):
        if m != n_y:
            raise ValueError(f"{name}: task dimension {m} (tensor shapes {leads[name]}), but y has {n_y} tasks "
                             f"(y shapes {shapes}): every tensor of the batches needs the task dimension "
                             "first, of y's size")
    return n_y


def _task(tree, i):
    return pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


def _split_result(out):
    """(dx, aux or None) from what ``fn`` returned (``dx`` or ``(dx, aux)``)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Mapping):
        return out[0], out[1]
    if isinstance(out, Mapping):
        return out, None
    raise TypeError(f"fn must return a dict shaped like x (or (dx, aux) with has_aux=True), got "
                    f"{type(out).__name__}")


def _loop(fn, x, y, ib, ob, n):
    total, auxes = None, []
    for i in range(n):
        dx, aux = _split_result(fn(x, _task(y, i), _task(ib, i), _task(ob, i)))
        total = dict(dx) if total is None else {k: total[k] + dx[k] for k in total}
        auxes.append(aux)
    mean = {k: t / n for k, t in total.items()}
    if auxes[0] is None:
        return mean, None
    return mean, pytree.tree_map(lambda *ts: torch.stack(ts) if isinstance(ts[0], Tensor) else ts[0], *auxes)


def _dims(tree):
    return pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, tree)


def _vmap(fn, x, y, ib, ob):
    from torch.func import vmap
    spec = []

    def per_task(yy, bi, bo):
        dx, aux = _split_result(fn(x, yy, bi, bo))
        leaves, tree_spec = pytree.tree_flatten(aux)   # aux.v may be None (ITD): kept out of vmap
        spec[:] = [tree_spec, [t is None for t in leaves]]
        return dx, [t for t in leaves if t is not None]

    dxs, kept = vmap(per_task, in_dims=(0, _dims(ib), _dims(ob)), randomness="different")(y, ib, ob)
    mean = {k: t.mean(0) for k, t in dxs.items()}
    kept = iter(kept)
    leaves = [None if none else next(kept) for none in spec[1]]
    return mean, pytree.tree_unflatten(leaves, spec[0])


def over_tasks(fn: Callable, mode: str = "auto") -> Callable:
    """Map a hypergradient function over a leading task dimension; return the meta-gradient.

    ``fn`` is what :func:`torchbilevel.hypergrad` returns (or any function
    ``(x, y, inner_batch, outer_batch) -> dx`` or ``-> (dx, aux)``)::

        meta = tb.over_tasks(tb.hypergrad(problem, tb.itd(10, 0.1)))
        dx = meta(x, ys, support, query)     # ys[k]: (n_tasks, ...); batches (n_tasks, ...)

    The returned function takes ``(x, y, inner_batch, outer_batch)``: x shared by every
    task, y a dict whose every tensor has the task dimension first, the batches a tensor,
    tuple or dict of tensors with the task dimension first (or a list of per-task batches
    of equal sizes, stacked here).  It returns the mean over tasks of the x-gradients,
    a dict shaped like x, and with ``fn`` built with ``has_aux=True`` also the per-task
    aux (:class:`torchbilevel.HypergradAux` whose tensors have the task dimension first).

    Args:
        fn: a hypergradient function, e.g. ``tb.hypergrad(problem, estimator)``.
        mode: ``"loop"`` (one call per task), ``"vmap"`` (``torch.func.vmap`` over the
            tasks; needs fixed step counts, no solver tolerance) or ``"auto"``
            (:func:`choose_mode`: loop on CPU, vmap on CUDA, bench/RESULTS.md §fewshot).

    The modes give the same numbers (1e-10 in float64), per-task BatchNorm statistics and
    one dropout stream per task (different masks in the two modes, see the module
    docstring).  ValueError naming the argument when y lacks the task dimension, when a
    batch's task dimension differs from y's, or when the tasks' support sizes differ;
    FloatingPointError when the meta-gradient holds NaN/inf (one host read).
    """
    if not callable(fn):
        raise TypeError(f"fn must be a hypergradient function (tb.hypergrad(...)), got {type(fn).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def meta_gradient(x: Mapping[str, Tensor], y: Mapping[str, Tensor], inner_batch, outer_batch):
        if not isinstance(x, Mapping) or not x or not isinstance(y, Mapping) or not y:
            raise TypeError("x and y must be non-empty dicts of tensors")
        inner_batch = stack_tasks(inner_batch, "inner_batch")
        outer_batch = stack_tasks(outer_batch, "outer_batch")
        n = task_count(y, inner_batch, outer_batch)
        chosen = choose_mode(x) if mode == "auto" else mode
        with restored_on_error(x, y):
            if chosen == "loop":
                dx, aux = _loop(fn, x, dict(y), inner_batch, outer_batch, n)
            else:
                dx, aux = _vmap(fn, x, dict(y), inner_batch, outer_batch)
        if not bool(T.all_finite(dx)):
            raise FloatingPointError(f"non-finite meta-gradient over {n} tasks ({chosen} mode): "
                                     "call fn on single tasks to locate the stage")
        return dx if aux is None else (dx, aux)

    meta_gradient.__doc__ = f"Mean over tasks of {getattr(fn, '__doc__', None) or 'fn'} ({mode} mode)."
    return meta_gradient
