"""ITD-BiO: iterative differentiation (Ji, Yang, Liang 2021, Alg. 1, ITD branch).

Run D gradient steps on the inner problem from y and backpropagate f(x, y_D(x))
through them: ∇̂Φ = ∂f(x, y_D(x))/∂x.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import grad

from ..problem import check_positive, check_steps, draw, in_functorch_transform
from .base import HypergradAux, unroll


class ITD(NamedTuple):
    """ITD estimator config: ``steps`` inner GD steps of size ``lr``, unrolled.
    ``checkpoint=True`` recomputes each step's forward in the backward pass
    (torch.utils.checkpoint) instead of storing it: memory O(1) in ``steps`` for
    the stored activations at the price of one extra forward per step."""
    steps: int
    lr: float
    checkpoint: bool = False

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        batches = [draw(inner_batch) for _ in range(self.steps)]
        ob = draw(outer_batch)
        if self.checkpoint:
            return _itd_checkpointed(self, problem, x, y, batches, ob)

        if in_functorch_transform():
            def phi(xx):
                y_d = unroll(problem, xx, y, batches, self.lr)
                val = problem.outer(xx, y_d, ob)
                return val, (y_d, val)

            dx, (y_d, fval) = grad(phi, has_aux=True)(x)
            return dx, HypergradAux({k: t.detach() for k, t in y_d.items()}, None, fval)
        # autograd: the unrolled graph is built once and backpropagated once (measured
        # several times faster than nesting torch.func.grad on CPU)
        xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
        with torch.enable_grad():
            y_d = unroll(problem, xr, {k: t.detach() for k, t in y.items()}, batches, self.lr)
            fval = problem.outer(xr, y_d, ob)
            gx = torch.autograd.grad(fval, list(xr.values()), allow_unused=True)
        dx = {k: (torch.zeros_like(xr[k]) if gi is None else gi.detach()) for k, gi in zip(xr, gx)}
        return dx, HypergradAux({k: t.detach() for k, t in y_d.items()}, None, fval.detach())


def _itd_checkpointed(cfg, problem, x, y, batches, ob):
    # Autograd with torch.utils.checkpoint around each inner step: the activations of a
    # step are recomputed during the backward pass instead of kept.
    from torch.utils.checkpoint import checkpoint
    xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
    xk, yk = list(xr), list(y)

    def step(b, *flat):
        xx, yy = dict(zip(xk, flat[:len(xk)])), dict(zip(yk, flat[len(xk):]))
        yy = {k: v.requires_grad_(True) if not v.requires_grad else v for k, v in yy.items()}
        val = problem.inner(xx, yy, b)
        gys = torch.autograd.grad(val, list(yy.values()), create_graph=True)
        return tuple(yy[k] - cfg.lr * gi for k, gi in zip(yk, gys))

    with torch.enable_grad():
        ys = tuple(t.detach() for t in y.values())
        for b in batches:
            ys = checkpoint(step, b, *xr.values(), *ys, use_reentrant=False)
        y_d = dict(zip(yk, ys))
        fval = problem.outer(xr, y_d, ob)
        gx = torch.autograd.grad(fval, list(xr.values()), allow_unused=True)
    dx = {k: (torch.zeros_like(xr[k]) if gi is None else gi.detach()) for k, gi in zip(xk, gx)}
    return dx, HypergradAux({k: t.detach() for k, t in y_d.items()}, None, fval.detach())


def itd(steps: int, lr: float, checkpoint: bool = False) -> ITD:
    """ITD-BiO hypergradient: unroll ``steps`` inner gradient steps of size ``lr`` from the
    given y (a fresh inner batch per step when the batch is an iterator) and backpropagate
    the outer loss through them.  Cost: about 2-3x ``steps`` inner gradients; memory grows
    with ``steps`` (use ``checkpoint=True`` for long unrolls)."""
    return ITD(check_steps(steps, "steps"), check_positive(lr, "lr"), bool(checkpoint))
