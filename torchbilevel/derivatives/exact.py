"""Exact derivative products of the inner objective (torch.func / autograd).

Notation: ``H v = ∇yy g · v`` (Hessian-vector product) and ``J v = ∇xy g · v`` (the
x-gradient of ⟨∇y g, v⟩, a vector shaped like x).
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from .. import tree as T
from ..tracing import use_func_mechanism
from .gradient import _leaves, _rebuild, gradient

__all__ = ["Linearization", "linearize", "averaged", "grad_y", "grads", "hvp", "mixed", "hvp_and_mixed",
           "exact_products"]


def grad_y(fn, x, y, batch) -> T.Tree:
    """∇y fn(x, y; batch): the gradient of a bilevel objective w.r.t. y, a dict shaped like y."""
    return grad(fn, argnums=1)(x, y, batch)


def grads(fn, x, y, batch):
    """(∇x fn, ∇y fn) at (x, y; batch), from one reverse pass."""
    return grad(fn, argnums=(0, 1))(x, y, batch)


class Linearization(NamedTuple):
    """The inner gradient at one point, with the operators that differentiate it again.

    ``grad_y`` is ∇y g(x, y); ``hvp(v)`` returns ∇yy g·v; ``mixed(v)`` returns ∇xy g·v.
    Built once per (x, y, batch) and applied many times (e.g. by CG): each application
    is one backward pass through the y-dependent operations only.  ``value`` is g(x, y)
    from the same forward (autograd mechanism; None under torch.func).
    """
    grad_y: T.Tree
    hvp: Callable[[T.Tree], T.Tree]
    mixed: Callable[[T.Tree], T.Tree]
    value: Optional[Tensor] = None


def _autograd_linearization(g, x, y, batch) -> Linearization:
    # One forward of g and one backward with create_graph: the graph of ∇y g is kept
    # and every hvp/mixed call is a backward through it (DESIGN.md, hot path).
    xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
    yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    xs, ys = list(xr.values()), list(yr.values())
    with torch.enable_grad():
        val = g(xr, yr, batch)
        gys = torch.autograd.grad(val, ys, create_graph=True, allow_unused=True)
    gys = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(gys, ys)]
    live = [i for i, gi in enumerate(gys) if gi.requires_grad]

    def backward(v: Mapping[str, Tensor], inputs):
        vs = list(v.values()) if list(v) == list(yr) else [v[k] for k in yr]
        if not live:
            return [None] * len(inputs)
        with torch.enable_grad():
            return torch.autograd.grad([gys[i] for i in live], inputs, [vs[i] for i in live],
                                       retain_graph=True, allow_unused=True)

    def hvp(v):
        out = backward(v, ys)
        return {k: (torch.zeros_like(t) if o is None else o.detach()) for (k, t), o in zip(yr.items(), out)}

    def mixed(v):
        out = backward(v, xs)
        return {k: (torch.zeros_like(t) if o is None else o.detach()) for (k, t), o in zip(xr.items(), out)}

    gy = {k: gi.detach() for k, gi in zip(yr, gys)}
    return Linearization(gy, hvp, mixed, val.detach())


def _func_linearization(g, x, y, batch) -> Linearization:
    # torch.func mechanism: composes with vmap/grad (used inside transforms).
    gy_fn = lambda xx, yy: grad(g, argnums=1)(xx, yy, batch)
    # g's value comes with the gradient (grad_and_value as the vjp's aux): no extra forward
    gy, vjp_y, val = vjp(lambda yy: grad_and_value(g, argnums=1)(x, yy, batch), y, has_aux=True)
    cache = {}

    def hvp(v):
        return vjp_y(v)[0]

    def mixed(v):
        if "vjp_x" not in cache:
            cache["vjp_x"] = vjp(lambda xx: gy_fn(xx, y), x)[1]
        return cache["vjp_x"](v)[0]

    return Linearization(gy, hvp, mixed, val)


def linearize(g, x, y, batch, mode: str = "auto") -> Linearization:
    """Build the operators ∇yy g(x, y)·v and ∇xy g(x, y)·v at one point.

    Args:
        g: the inner objective ``(x, y, batch) -> scalar``.
        mode: ``"autograd"`` keeps one autograd graph of ∇y g and backpropagates
            through it for each product (fastest, measured in bench/); ``"func"`` uses
            ``torch.func.vjp`` and composes with ``vmap``; ``"auto"`` picks ``"func"``
            inside torch.func transforms and under torch.compile, ``"autograd"`` otherwise.
    """
    return dispatch(mode, _autograd_linearization, _func_linearization)(g, x, y, batch)


def dispatch(mode: str, autograd_impl, func_impl):
    """The implementation ``mode`` names: ``"autograd"``, ``"func"``, or ``"auto"`` (func
    inside torch.func transforms and under torch.compile, autograd otherwise)."""
    if mode == "auto":
        mode = "func" if use_func_mechanism() else "autograd"
    if mode == "autograd":
        return autograd_impl
    if mode == "func":
        return func_impl
    raise ValueError(f"mode must be 'auto', 'autograd' or 'func', got {mode!r}")


def averaged(lin: Linearization, problem) -> Linearization:
    """``lin`` with its products averaged over ``problem``'s data-parallel group
    (:meth:`torchbilevel.Bilevel.average`: one all-reduce per product); ``lin`` itself when
    the problem has no reduce hook.  ``grad_y`` and ``value`` stay rank-local (no method
    here uses them in its result; average them yourself if you need them)."""
    if getattr(problem, "reduce", None) is None:
        return lin
    return Linearization(lin.grad_y, lambda v: problem.average(lin.hvp(v))[0],
                         lambda v: problem.average(lin.mixed(v))[0], lin.value)


def hvp(g, x, y, v, batch) -> T.Tree:
    """∇yy g(x, y)·v, exactly (one reverse-over-reverse pass, y part only)."""
    return vjp(lambda yy: grad(g, argnums=1)(x, yy, batch), y)[1](v)[0]


def mixed(g, x, y, v, batch) -> T.Tree:
    """∇xy g(x, y)·v = ∇x ⟨∇y g(x, y), v⟩, exactly."""
    return vjp(lambda xx: grad(g, argnums=1)(xx, y, batch), x)[1](v)[0]


def hvp_and_mixed(g, x, y, v, batch):
    """(∇yy g·v, ∇xy g·v) from a single vjp of ⟨∇y g(x, y), v⟩ w.r.t. (x, y)."""
    _, pullback = vjp(lambda xx, yy: grad(g, argnums=1)(xx, yy, batch), x, y)
    jv, hv = pullback(v)
    return hv, jv


def exact_products(g, x, y, v, batch):
    """(∇xy g·v, ∇yy g·v) exactly, from one evaluation of ∇y g with its graph kept and a
    single backward (FMBO, eq. (12)-(13)).  ``x``, ``y``, ``v`` are dicts or flat tensors.
    torch.func inside transforms, autograd otherwise."""
    if use_func_mechanism():
        _, pull = vjp(lambda a, b: grad(g, argnums=1)(a, b, batch), x, y)
        return pull(v)
    xs, ys = _leaves(x), _leaves(y)
    with torch.enable_grad():
        xr = [t.detach().requires_grad_(True) for t in xs]
        yr = [t.detach().requires_grad_(True) for t in ys]
        (gyr,) = gradient(g, _rebuild(x, xr), _rebuild(y, yr), batch, argnums=1, create_graph=True)[1]
        outs = _leaves(gyr)
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        vs = _leaves(v)
        res = torch.autograd.grad([outs[i] for i in live], xr + yr, [vs[i] for i in live],
                                  allow_unused=True) if live else [None] * (len(xr) + len(yr))
    res = [torch.zeros_like(t) if r is None else r.detach() for r, t in zip(res, xs + ys)]
    return _rebuild(x, res[:len(xs)]), _rebuild(y, res[len(xs):])
