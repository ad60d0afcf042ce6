"""The gradient helper: (value, gradients) of an objective ``(x, y, batch) -> scalar`` over
dicts or flat buffers, by ``torch.autograd.grad`` (fast, eager) or ``torch.func`` (inside
transforms and torch.compile).  Every other derivative of the library is built on it.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..tracing import use_func_mechanism

__all__ = ["gradient"]


def _leaves(arg):
    return list(arg.values()) if isinstance(arg, Mapping) else [arg]


def _rebuild(arg, leaves):
    return dict(zip(arg.keys(), leaves)) if isinstance(arg, Mapping) else leaves[0]


def gradient(fn, x, y, batch, argnums=(0, 1), mode: str = "auto", create_graph: bool = False):
    """(value, gradients) of ``fn(x, y, batch)`` w.r.t. the arguments in ``argnums``.

    ``x`` and ``y`` may be dicts of tensors or single tensors (flat buffers).  Returns
    ``(value, grads)`` with ``grads`` a tuple ordered like ``argnums`` (zeros for inputs
    ``fn`` does not use).

    mode: ``"autograd"`` runs one backward with ``torch.autograd.grad`` restricted to the
        requested inputs (measured 2-6x faster than ``torch.func`` here for y-only
        gradients and unrolled steps); ``"func"`` uses ``torch.func.grad_and_value`` and
        composes with vmap/grad; ``"auto"`` picks ``"func"`` inside torch.func transforms
        and under torch.compile.
    create_graph: (autograd mode) keep the graph so the result can be differentiated
        again; the inputs are then used as given (not detached), so gradients flow back
        to whatever they depend on.
    """
    if isinstance(argnums, int):
        argnums = (argnums,)
    if mode == "auto":
        mode = "func" if use_func_mechanism() else "autograd"
    if mode == "func":
        from torch.func import grad_and_value
        gr, val = grad_and_value(fn, argnums=argnums)(x, y, batch)
        return val, gr
    args = [x, y]
    inputs = []
    with torch.enable_grad():
        for i in (0, 1):
            leaves = _leaves(args[i])
            if create_graph:
                leaves = [t if (i not in argnums or t.requires_grad) else t.detach().requires_grad_(True)
                          for t in leaves]
            else:
                leaves = [t.detach().requires_grad_(i in argnums) for t in leaves]
            if i in argnums:
                inputs.append(leaves)
            args[i] = _rebuild(args[i], leaves)
        val = fn(args[0], args[1], batch)
        flat = [t for group in inputs for t in group]
        # an objective independent of every requested input (f of hyper-cleaning in x) has
        # no graph: its gradient is zero, not an autograd error
        gs = (torch.autograd.grad(val, flat, create_graph=create_graph, allow_unused=True)
              if val.requires_grad else [None] * len(flat))
    gs = [torch.zeros_like(t) if gi is None else (gi if create_graph else gi.detach()) for gi, t in zip(gs, flat)]
    out, pos = [], 0
    for i, leaves in zip(argnums, inputs):
        out.append(_rebuild(args[i], gs[pos:pos + len(leaves)]))
        pos += len(leaves)
    return (val if create_graph else val.detach()), tuple(out)
