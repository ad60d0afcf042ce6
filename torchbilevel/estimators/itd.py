"""ITD-BiO: iterative differentiation (Ji, Yang, Liang 2021, Alg. 1, ITD branch).

Run D gradient steps on the inner problem from y and backpropagate f(x, y_D(x))
through them: ∇̂Φ = ∂f(x, y_D(x))/∂x.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.func import grad, vjp

from .. import randomness as R
from ..guards import INNER, OUTER, UNROLL_BACKWARD, record
from ..problem import check_positive, check_steps, draw, use_func_mechanism
from .base import HypergradAux, outer_grads, unroll


class ITD(NamedTuple):
    """ITD estimator config: ``steps`` inner GD steps of size ``lr``, unrolled.
    ``checkpoint=True`` keeps only the inner iterates during the forward pass and
    rebuilds each step's graph during the backward pass: memory of one step's graph plus
    ``steps`` copies of y (instead of ``steps`` graphs), at the price of one extra
    gradient evaluation of g per step (bench/RESULTS-reliability.md)."""
    steps: int
    lr: float
    checkpoint: bool = False

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        batches = [draw(inner_batch, "inner_batch") for _ in range(self.steps)]
        ob = draw(outer_batch, "outer_batch")
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
    # Reverse-mode differentiation of the unroll with recomputation (Franceschi et al.
    # 2017, reverse-HG): the forward keeps only the iterates y_0..y_D (no graph); the
    # backward rebuilds one step's graph at a time and applies its vector-Jacobian product
    #   ā_D = ∇y f(x, y_D),   dx = ∇x f(x, y_D) − lr Σ_t ∇xy g(x, y_t; S_t)·ā_{t+1},
    #   ā_t = ā_{t+1} − lr ∇yy g(x, y_t; S_t)·ā_{t+1}          (y_{t+1} = y_t − lr ∇y g)
    # Memory: one step's graph plus D copies of y, instead of D steps' graphs.
    # (torch.utils.checkpoint around each step saved under 10% here: the double-backward
    # graph that create_graph builds inside the region escaped the recomputation.)
    from ..derivatives import gradient
    ys = [{k: t.detach() for k, t in y.items()}]
    streams = []                                             # each step's random stream, replayed
    for b in batches:                                        # forward: values only
        streams.append(R.capture(x, y))
        _, (gy,) = gradient(problem.inner, x, ys[-1], b, argnums=1)
        (gy,) = problem.average(gy)                          # data parallel: mean over ranks
        ys.append({k: ys[-1][k] - cfg.lr * gy[k] for k in y})
    y_d = ys[-1]
    record(INNER, y_d)
    fx, fy, fval = outer_grads(problem, x, y_d, ob)          # averaged, recorded as OUTER
    end = R.capture(x, y)
    dx, a = dict(fx), dict(fy)
    for t in range(len(batches) - 1, -1, -1):                # backward: one step at a time
        R.restore(streams[t])                                # the step's own dropout masks
        ja, ha = _step_vjp(problem, x, ys[t], batches[t], a)
        dx = {k: dx[k] - cfg.lr * ja[k] for k in dx}
        a = {k: a[k] - cfg.lr * ha[k] for k in a}
    R.restore(end)
    record(UNROLL_BACKWARD, dx)
    return dx, HypergradAux(y_d, None, fval.detach())


def _step_vjp(problem, x, y, batch, a):
    """(∇xy g·a, ∇yy g·a) at (x, y; batch) from one backward of ⟨∇y g, a⟩ (autograd), or one
    torch.func vjp inside transforms / torch.compile; averaged over a data-parallel group
    with one all-reduce."""
    if use_func_mechanism():
        _, pull = vjp(lambda xx, yy: grad(problem.inner, argnums=1)(xx, yy, batch), x, y)
        ja, ha = pull(a)
    else:
        xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
        yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
        inputs = list(xr.values()) + list(yr.values())
        with torch.enable_grad():
            gys = torch.autograd.grad(problem.inner(xr, yr, batch), list(yr.values()), create_graph=True,
                                      allow_unused=True)
            live = [(gi, a[k]) for gi, k in zip(gys, yr) if gi is not None and gi.requires_grad]
            outs = (torch.autograd.grad([gi for gi, _ in live], inputs, [ai for _, ai in live], allow_unused=True)
                    if live else [None] * len(inputs))
        outs = [torch.zeros_like(t) if o is None else o.detach() for o, t in zip(outs, inputs)]
        ja, ha = dict(zip(xr, outs[:len(xr)])), dict(zip(yr, outs[len(xr):]))
    return problem.average(ja, ha)


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
    """ITD-BiO hypergradient (Ji, Yang, Liang, ICML 2021, Alg. 1): unroll ``steps`` inner
    gradient steps of size ``lr`` from the given y (a fresh inner batch per step when the
    batch is an iterator) and backpropagate the outer loss through them (reverse mode, no
    explicit second-order products).  Cost: about 2-3x ``steps`` inner gradients; memory grows
    with ``steps`` (use ``checkpoint=True`` for long unrolls: one step's graph at a time,
    one more gradient of g per step; same result up to rounding)."""
    return ITD(check_steps(steps, "steps"), check_positive(lr, "lr"), bool(checkpoint))
