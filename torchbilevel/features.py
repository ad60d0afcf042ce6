"""Declared features: evaluate ``phi(x, batch)`` once, run the rest on the head.

With ``tb.Bilevel(outer=f, inner=g, features=phi)`` the problem is
g(x, y, batch) = g(phi(x, batch), y, batch) (same for f).  x does not change inside an
inner loop or a hypergradient call, so phi's output can be computed once per distinct
(x, batch) and every inner step, derivative product and path step runs on the head only.
Two mechanisms, both exact rewritings of the composed form:

* :func:`hoisted_inner` — the inner objective at a fixed x with phi cached per batch
  object (identity): for unrolls (ITD, PZOBO's paths) and the double loop's inner steps.
* :func:`lifted_estimate` — the chain rule through phi (Φ(x) = Φ̃(z_in(x), z_out(x))):
  run the estimator on the head problem whose outer variable is z = (phi(x, inner batch),
  phi(x, outer batch)), then pull its hypergradient back through phi with one
  vector-Jacobian product.  For AID, ITD, stocBiO and the first-order baseline with
  batches reused across the call (not iterators), single process.

* :func:`shared_features` — a double-loop step on reused batches: phi(x, inner batch) and
  phi(x, outer batch) evaluated once, with their graph, for both the inner steps (head
  only, on the detached features) and the lifted hypergradient.

Nothing is cached beyond the call or step that builds it.
"""
from __future__ import annotations

import collections.abc
import contextlib
import threading
from typing import Mapping

import torch
from torch import Tensor

from .problem import Bilevel, check_features, use_func_mechanism

__all__ = ["hoisted_inner", "can_lift", "lifted_estimate", "shared_features"]

# during shared_features(): (x, inner_batch, outer_batch, xr, z_in, z_out), else None; per
# thread (two threads stepping two problems never share features), traceable by dynamo
_SHARED = threading.local()


def _shared_for(x, inner_batch, outer_batch=None):
    """The step's shared features if they were computed at this x (same tensors) and batches."""
    sh = getattr(_SHARED, "step", None)
    if sh is None or sh[1] is not inner_batch or (outer_batch is not None and sh[2] is not outer_batch):
        return None
    xs = sh[0]
    if len(xs) != len(x) or any(xs.get(k) is not t for k, t in x.items()):
        return None
    return sh


def _detach(z):
    return z.detach() if isinstance(z, Tensor) else {k: t.detach() for k, t in z.items()}


def _features_with_graph(problem, x, inner_batch, outer_batch):
    """(xr, z_in, z_out): x as fresh leaves and phi on both batches with its graph (autograd)."""
    phi, same = problem.features, inner_batch is outer_batch
    xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
    with torch.enable_grad():
        zi = check_features(phi(xr, inner_batch))
        zo = zi if same else check_features(phi(xr, outer_batch))
    return xr, zi, zo


@contextlib.contextmanager
def shared_features(problem: Bilevel, estimator, x, inner_batch, outer_batch):
    """Context for one double-loop step: where the step's hypergradient will be lifted
    (:func:`can_lift`, eager autograd), evaluate phi on the two batches once, here, and let
    the inner steps (:func:`hoisted_inner`) and :func:`lifted_estimate` inside the block
    use those features (measured on LeNet HR: one body forward less per step).  Elsewhere a
    no-op."""
    if not can_lift(problem, estimator, inner_batch, outer_batch) or use_func_mechanism():
        yield
        return
    xr, zi, zo = _features_with_graph(problem, x, inner_batch, outer_batch)
    _SHARED.step = (dict(x), inner_batch, outer_batch, xr, zi, zo)
    try:
        yield
    finally:
        _SHARED.step = None


def hoisted_inner(problem: Bilevel, x):
    """The inner objective ``(x, y, batch) -> g`` at the fixed ``x`` given here: without
    features, ``problem.inner``; with features, ``g(phi(x, batch), y, batch)`` with
    ``phi(x, batch)`` evaluated once per batch object and reused (the x argument the caller
    passes is ignored: it must be this x, possibly detached)."""
    if problem.features is None:
        return problem.inner
    cache = {}

    def inner(_x, y, batch):
        hit = cache.get(id(batch))
        if hit is None:
            shared = _shared_for(x, batch)
            z = _detach(shared[4]) if shared is not None else check_features(problem.features(x, batch))
            hit = cache[id(batch)] = (batch, z)         # (the batch kept alive: ids stay unique)
        return problem.head_inner(hit[1], y, batch)
    return inner


def can_lift(problem: Bilevel, estimator, inner_batch, outer_batch) -> bool:
    """True where :func:`lifted_estimate` applies: features declared, single process, an
    estimator that perturbs nothing in x-space (``perturbs_x`` unset: not PZOBO), and batches reused for the whole
    call (not iterators: those need fresh features per draw)."""
    iterator = collections.abc.Iterator
    return (problem.features is not None and problem.reduce is None and not getattr(estimator, "perturbs_x", False)
            and not isinstance(inner_batch, iterator) and not isinstance(outer_batch, iterator))


def _pack(z, side):
    return {side: z} if isinstance(z, Tensor) else {f"{side}/{k}": t for k, t in z.items()}


def _unpack(zp, side, like):
    if isinstance(like, Tensor):
        return zp[side]
    return {k: zp[f"{side}/{k}"] for k in like}


def lifted_estimate(problem: Bilevel, estimator, x: Mapping[str, Tensor], y, inner_batch, outer_batch, v0=None):
    """``estimator.estimate`` on the composed problem, computed on the head: z_in =
    phi(x, inner_batch) and z_out = phi(x, outer_batch) (one evaluation when the two
    batches are the same object), the estimator on the problem with outer variable
    (z_in, z_out), then dx = (∂z/∂x)ᵀ dz — one forward and one backward of phi in all."""
    phi, same = problem.features, inner_batch is outer_batch

    def feats(xx):
        zi = check_features(phi(xx, inner_batch))
        return zi, (zi if same else check_features(phi(xx, outer_batch)))

    if use_func_mechanism():           # inside torch.func transforms and torch.compile
        from torch.func import vjp
        (zi, zo), pull = vjp(feats, x)
    else:
        shared = _shared_for(x, inner_batch, outer_batch)
        xr, zi, zo = shared[3:] if shared is not None else _features_with_graph(problem, x, inner_batch, outer_batch)
    detach = (lambda z: z) if use_func_mechanism() else _detach
    zp = {**_pack(detach(zi), "in"), **_pack(detach(zo), "out")}
    head = Bilevel(lambda xp, yy, b: problem.head_outer(_unpack(xp, "out", zo), yy, b),
                   lambda xp, yy, b: problem.head_inner(_unpack(xp, "in", zi), yy, b))
    dz, aux = estimator.estimate(head, zp, y, inner_batch, outer_batch, v0=v0)
    dzi, dzo = _unpack(dz, "in", zi), _unpack(dz, "out", zo)
    if use_func_mechanism():
        (dx,) = pull((dzi, dzo))
        return dx, aux
    outs, cots = [], []
    for z, d in ((zi, dzi), (zo, dzo)):
        for t, c in (((z, d),) if isinstance(z, Tensor) else ((z[k], d[k]) for k in z)):
            if t.requires_grad:
                outs.append(t)
                cots.append(c)
    inputs = list(xr.values())
    with torch.enable_grad():
        gs = torch.autograd.grad(outs, inputs, cots, allow_unused=True) if outs else [None] * len(inputs)
    dx = {k: (torch.zeros_like(t) if gi is None else gi.detach()) for (k, t), gi in zip(xr.items(), gs)}
    return dx, aux
