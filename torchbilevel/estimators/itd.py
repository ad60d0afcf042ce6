"""ITD-BiO: iterative differentiation (Ji, Yang, Liang 2021, Alg. 1, ITD branch).

Run D gradient steps on the inner problem from y and backpropagate f(x, y_D(x))
through them: ∇̂Φ = ∂f(x, y_D(x))/∂x.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import grad

from ..guards import INNER, OUTER, UNROLL_BACKWARD, record
from ..problem import check_positive, check_steps, draw, use_func_mechanism
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

        if use_func_mechanism():       # inside torch.func transforms and torch.compile
            def phi(xx):
                y_d = unroll(problem, xx, y, batches, self.lr)
                val = problem.outer(xx, y_d, ob)
                return val, (y_d, val)

            dx, (y_d, fval) = grad(phi, has_aux=True)(x)
            record(INNER, y_d)
            record(OUTER, fval)
            record(UNROLL_BACKWARD, dx)
            return dx, HypergradAux({k: t.detach() for k, t in y_d.items()}, None, fval)
        # autograd: the unrolled graph is built once and backpropagated once (measured
        # several times faster than nesting torch.func.grad on CPU)
        xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
        with torch.enable_grad():
            y_d = unroll(problem, xr, {k: t.detach() for k, t in y.items()}, batches, self.lr)
            record(INNER, y_d)
            fval = problem.outer(xr, y_d, ob)
            gx = torch.autograd.grad(fval, list(xr.values()), allow_unused=True)
        return _finish(problem, xr, gx, y_d, fval)


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
        (gy,) = problem.average(dict(zip(yk, gys)))          # data-parallel: mean over ranks
        return tuple(yy[k] - cfg.lr * gy[k] for k in yk)

    with torch.enable_grad():
        ys = tuple(t.detach() for t in y.values())
        for b in batches:
            ys = checkpoint(step, b, *xr.values(), *ys, use_reentrant=False)
        y_d = dict(zip(yk, ys))
        record(INNER, y_d)
        fval = problem.outer(xr, y_d, ob)
        gx = torch.autograd.grad(fval, list(xr.values()), allow_unused=True)
    return _finish(problem, xr, gx, y_d, fval)


def _finish(problem, xr, gx, y_d, fval):
    # Data parallel: each rank's backward gives its share of the gradient of Σ_ranks f
    # (the averaged inner steps pass gradients back through a mean all-reduce), so the
    # hypergradient of the mean loss is the mean over ranks; f itself is averaged too.
    dx = {k: (torch.zeros_like(xr[k]) if gi is None else gi.detach()) for k, gi in zip(xr, gx)}
    dx, fval = problem.average(dx, fval.detach())
    record(OUTER, fval)
    record(UNROLL_BACKWARD, dx)
    return dx, HypergradAux({k: t.detach() for k, t in y_d.items()}, None, fval)


def itd(steps: int, lr: float, checkpoint: bool = False) -> ITD:
    """ITD-BiO hypergradient: unroll ``steps`` inner gradient steps of size ``lr`` from the
    given y (a fresh inner batch per step when the batch is an iterator) and backpropagate
    the outer loss through them.  Cost: about 2-3x ``steps`` inner gradients; memory grows
    with ``steps`` (use ``checkpoint=True`` for long unrolls)."""
    return ITD(check_steps(steps, "steps"), check_positive(lr, "lr"), bool(checkpoint))
