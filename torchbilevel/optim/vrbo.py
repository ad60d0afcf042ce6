"""VRBO (Yang, Ji, Liang, "Provably faster algorithms for bilevel optimization", NeurIPS
2021, Alg. 2): SARAH/SPIDER variance reduction of the inner gradient u ≈ ∇y g and of a
stocBiO hypergradient w ≈ ∇̄f, restarted from large-batch estimates every ``period``
outer steps, with ``inner_steps`` y-steps between two x-steps.

    t ≡ 0 (mod period):  u = ∇y g(x_t, y_t; S_1),  w = ∇̄f(x_t, y_t; S_1)            (large batch S_1)
    x_{t+1} = x_t − α w
    for k = 1..m:   (z_k = (x_{t+1}, y_{t,k}),  z_{k−1} the previous evaluated point, y_{t,1} = y_t)
        u ← u + ∇y g(z_k; S_2) − ∇y g(z_{k−1}; S_2),   w ← w + ∇̄f(z_k; S_2) − ∇̄f(z_{k−1}; S_2)
        y_{t,k+1} = y_{t,k} − β u
    y_{t+1} = y_{t,m+1}

∇̄f is the library's stocBiO estimate (Ji, Yang, Liang 2021, Alg. 3; :func:`torchbilevel.stocbio`)
with Q = ``neumann_steps`` terms and Neumann step η = ``lr_v`` (the linear system's step
size); both points of a difference use one sample S_2 = (ζ, D_F, B_1..B_Q, D_G) and one
random stream.  The chain of differences always runs between consecutive evaluated points,
the first of a step from the last evaluated point of the previous one (benchmark_bilevel
evaluates both points of the first difference at the new x, which leaves the change of x
uncorrected).

Defaults: m = 10 and Q = 10 (benchmark_bilevel's ``n_inner_steps``, ``n_shia_steps``).
S_1: a non-iterator batch is the full batch; with iterators S_1 averages the estimates of
``large_batches`` (default 10) fresh samples — benchmark_bilevel takes the full dataset
there and restarts about every 128 epochs, so no reference value fits a stream; ``period``
defaults to 100 outer steps (our choice).

Cost per step: 2m(Q + 3) gradient evaluations (a y-gradient, an f gradient, Q
Hessian-vector products and a mixed product at two points, m times: 260 at the
defaults), plus large_batches·(Q + 3) at a restart.  Data parallel: per inner step one
all-reduce for the two ∇y g and Q + 2 for each stocBiO estimate.  Running statistics move
once per inner y-step (m per step).
"""
from __future__ import annotations

import collections.abc
import contextlib
from typing import NamedTuple

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import tree as T
from ..derivatives import gradient, second_order
from ..estimators import stocbio
from ..problem import check_positive, check_problem, check_steps, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, norm, reply

_INNER = "the inner gradient ∇y g (y update)"


class VRBOState(NamedTuple):
    """State of VRBO in flat buffers: iterates ``xf, yf``; the SARAH estimates ``u`` (∇y g)
    and ``w`` (hypergradient), valid at the last evaluated point ``x_anchor, y_anchor``;
    ``step`` t; the dict layouts.  ``state.x``, ``state.y`` are dicts."""
    xf: Tensor
    yf: Tensor
    u: Tensor
    w: Tensor
    x_anchor: Tensor
    y_anchor: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")


def vrbo(problem, *, lr_x, lr_y, lr_v, inner_steps: int = 10, neumann_steps: int = 10, period: int = 100,
         large_batches: int = 10, check_finite: bool = True) -> Algorithm:
    """VRBO (Yang, Ji, Liang, NeurIPS 2021, Alg. 2): SARAH estimates of ∇y g and of a stocBiO
    hypergradient, m y-steps per x-step, large-batch restarts every ``period`` steps.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y: step sizes α (x) and β (y); numbers > 0 or callables of t.
        lr_v: the Neumann step η of the stocBiO estimates (< 1/L_g); a number or callable.
        inner_steps: m, y-steps per outer step (default 10, benchmark_bilevel's).
        neumann_steps: Q, Neumann terms of each estimate (default 10, benchmark_bilevel's).
        period: outer steps between large-batch restarts (default 100).
        large_batches: with iterator batches, the samples averaged into S_1 (default 10).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples (iterators): per inner step ζ from ``inner_batch``, D_F from ``outer_batch``,
    then B_1..B_Q, D_G from ``inner_batch``.  Cost per step: 2m(Q + 3) gradient evaluations
    (+ large_batches·(Q + 3) at a restart).  Returns an :class:`torchbilevel.Algorithm`.
    ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo` ``)``:
    ``inner_loss`` g(x_{t+1}, y_{t,m}; ζ) and ``outer_loss`` f(x_{t+1}, y_{t,m}; D_F) at
    the last inner step's new point on its sample (the stocBiO estimate's f), with
    ``solve`` that estimate's report (its Neumann series, see :func:`torchbilevel.stocbio`),
    and ``hypergrad_norm`` ‖w‖ for the estimate x moved along; data parallel: means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    inner_steps = check_steps(inner_steps, "inner_steps")
    neumann_steps = check_steps(neumann_steps, "neumann_steps")
    period = check_steps(period, "period")
    large_batches = check_steps(large_batches, "large_batches")
    name = "vrbo"

    def init(x, y) -> VRBOState:
        """Initial state from dicts x, y (copied); the estimates are set at the first step."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        return VRBOState(xf, yf, torch.zeros_like(yf), torch.zeros_like(xf), xf, yf, 0, lx, ly)

    def body(s: VRBOState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        g = flat_fn(problem.inner, lx, ly)
        est = stocbio(neumann_steps, value_at(lr_v, t, "lr_v"))
        fresh = isinstance(inner_batch, collections.abc.Iterator)

        def sample():
            zeta, d_f = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")
            rest = [draw(inner_batch, "inner_batch") for _ in range(neumann_steps + 1)] if fresh else None
            return zeta, d_f, rest

        def at(xf, yf, smp, current):
            zeta, d_f, rest = smp
            with (B.updating() if current else contextlib.nullcontext()):
                g_val, (gy,) = gradient(g, xf, yf, zeta, argnums=1)              # ∇y g(z; ζ)
            G.record(_INNER, gy)
            dx, aux = est.estimate(problem, lx.unravel(xf), ly.unravel(yf),
                                   iter(rest) if fresh else inner_batch, d_f)      # ∇̄f(z; S)
            return gy, T.ravel_like(lx, dx), g_val, aux

        with G.tracing(check_finite) as trace, second_order(name):
            if t % period == 0:                                                # restart on S_1
                rows = [at(s.xf, s.yf, sample(), False) for _ in range(large_batches if fresh else 1)]
                (u,) = problem.average(sum(r[0] for r in rows) / len(rows))
                w = sum(r[1] for r in rows) / len(rows)
                ax, ay = s.xf, s.yf
            else:
                u, w, ax, ay = s.u, s.w, s.x_anchor, s.y_anchor
            w_x = w.to(s.xf.dtype)
            x_new = s.xf - value_at(lr_x, t, "lr_x") * w_x
            beta = value_at(lr_y, t, "lr_y")
            y = s.yf
            for _ in range(inner_steps):
                smp = sample()
                # one sample = one batch and one random stream at both points
                (g1, w1, g_val, aux), (g0, w0, _, _) = R.replaying(
                    R.capture(s.xf), [lambda: at(x_new, y, smp, True), lambda: at(ax, ay, smp, False)])
                g1, g0, g_val = problem.average(g1, g0, g_val)
                u, w = u + (g1 - g0), w + (w1 - w0)
                ax, ay = x_new, y
                y = y - beta * u.to(y.dtype)
        if check_finite:
            check_step(name, t, (x_new, y, w), trace, "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, u=s.u, w=s.w)
        return reply(VRBOState(x_new, y, u.to(s.yf.dtype), w.to(s.xf.dtype), ax, ay, t + 1, lx, ly), has_aux,
                     lambda: StepInfo(inner_loss=g_val, outer_loss=aux.outer_loss, hypergrad_norm=norm(w_x),
                                      solve=aux.solve))

    state_dict, load_state_dict = checkpoint(VRBOState, name)
    return Algorithm(init, guarded(VRBOState, body, problem, name), state_dict, load_state_dict, name)
