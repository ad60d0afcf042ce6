"""FSLA (Li, Gu, Huang, "A fully single loop algorithm for bilevel optimization without
Hessian inverse", AAAI 2022, Alg. 1): one SGD step each on y and on the linear-system
variable v, then an x step along a recursive-momentum (STORM) estimate of the
hypergradient, whose correction compares the new point with the previous one.

    y_{t+1} = y_t − β ∇y g(x_t, y_t; ζ_t)
    v_{t+1} = v_t − λ (∇yy g(x_t, y_{t+1}; ζ'_t)·v_t − ∇y f(x_t, y_{t+1}; ψ_t))
    D(x, y, v) = ∇x f(x, y; ψ'_t) − ∇xy g(x, y; ζ''_t)·v                       (one sample, both points)
    h_t = D(x_t, y_{t+1}, v_{t+1}) + (1 − η)(h_{t−1} − D(x_{t−1}, y_t, v_t)),   h_0 = D(x_0, y_1, v_1)
    x_{t+1} = x_t − α h_t

(our v solves ∇yy g·v = +∇y f).  The two evaluations of D use one sample and one random
stream.  The first step has no previous point and uses D itself (benchmark_bilevel starts
h and x_{−1} at zero instead).  η = ``eta_x`` defaults to 0.1, the starting value of
benchmark_bilevel's η_t = 0.1/√(t + 1) (which also decays its step sizes as 1/√(t + 1):
schedules are a lambda away, every argument takes a callable of t).

Cost per step: one y-gradient of g, one Hessian-vector product, one y-gradient and two
x-gradients of f (counted as full gradients), two mixed products — 7 gradient evaluations
(5 at the first step).  Data parallel: three all-reduces per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import tree as T
from ..derivatives import gradient, second_order
from ..problem import check_positive, check_problem, check_unit, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .amigo import hvp_flat, mixed_flat
from .schedule import value_at
from .step_info import StepInfo, norm, one_step_solve, reply

_INNER = "the inner gradient ∇y g (y update)"


class FSLAState(NamedTuple):
    """State of FSLA in flat buffers: iterates ``xf, yf, vf``; the momentum ``h`` of the x
    direction; the previous outer iterate ``x_prev``; ``step`` t; the dict layouts.
    ``state.x``, ``state.y``, ``state.v`` are dicts."""
    xf: Tensor
    yf: Tensor
    vf: Tensor
    h: Tensor
    x_prev: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    v = view("vf", "layout_y", "v (≈ [∇yy g]⁻¹∇y f) as a dict shaped like y")


def fsla(problem, *, lr_x, lr_y, lr_v, eta_x=0.1, check_finite: bool = True) -> Algorithm:
    """FSLA (Li, Gu, Huang, AAAI 2022, Alg. 1): single-loop SGD on y and v, STORM momentum on
    the x direction.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (x), β (y), λ (v); numbers > 0 or callables of t.
        eta_x: the momentum weight η in [0, 1] (1 = no momentum); a number or a callable of
            t; default 0.1 (benchmark_bilevel's starting η).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: ζ_t, ζ'_t from ``inner_batch``, ψ_t, ψ'_t from ``outer_batch``, then ζ''_t
    (benchmark_bilevel's order).  Cost per step: 7 gradient evaluations (5 at the first).
    Returns an :class:`torchbilevel.Algorithm`.  ``step(..., has_aux=True)`` returns
    ``(state,`` :class:`torchbilevel.StepInfo` ``)``: ``inner_loss`` g(x_t, y_t; ζ_t) (the
    y step's evaluation), ``outer_loss`` f(x_t, y_{t+1}; ψ_t) (the v step's ∇y f),
    ``hypergrad_norm`` ‖h_t‖ (the momentum direction x moves along), ``solve`` the v step's
    report at v_t (‖∇yy g·v_t − ∇y f‖/‖∇y f‖ at (x_t, y_{t+1}) on ζ'_t, ψ_t; v_tᵀ∇yy g v_t ≤ 0);
    data parallel: means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    eta_x = check_unit(eta_x, "eta_x", allow_schedule=True)
    name = "fsla"

    def init(x, y) -> FSLAState:
        """Initial state from dicts x, y (copied); v and the momentum start at zero."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        return FSLAState(xf, yf, torch.zeros_like(yf), torch.zeros_like(xf), xf, 0, lx, ly)

    def body(s: FSLAState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        first = t == 0
        lx, ly = s.layout_x, s.layout_y
        g, f = flat_fn(problem.inner, lx, ly), flat_fn(problem.outer, lx, ly)
        with G.tracing(check_finite) as trace, second_order(name):
            zeta = draw(inner_batch, "inner_batch")
            with B.updating():
                g_val, (gy,) = gradient(g, s.xf, s.yf, zeta, argnums=1)
            G.record(_INNER, gy)
            gy, g_val = problem.average(gy, g_val)
            y = s.yf - value_at(lr_y, t, "lr_y") * gy
            zeta2, psi = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")
            hv = hvp_flat(problem, lx, ly, s.xf, y, s.vf, zeta2)
            G.record(G.LINEAR, hv)
            f_val, (fy,) = gradient(f, s.xf, y, psi, argnums=1)
            G.record(G.OUTER, fy)
            hv, fy, f_val = problem.average(hv, fy, f_val)
            v = s.vf - value_at(lr_v, t, "lr_v") * (hv - fy.to(hv.dtype))
            psi2, zeta3 = draw(outer_batch, "outer_batch"), draw(inner_batch, "inner_batch")

            def direction(xf, yf, vf):
                fx = gradient(f, xf, yf, psi2)[1][0]       # both arguments: f may not depend on x
                G.record(G.OUTER, fx)
                jv = mixed_flat(problem, lx, ly, xf, yf, vf, zeta3)
                G.record(G.MIXED, jv)
                return fx.to(xf.dtype) - jv

            points = [(s.xf, y, v)] + ([] if first else [(s.x_prev, s.yf, s.vf)])
            # one sample = one batch and one random stream at both points
            ds = R.replaying(R.capture(s.xf), [lambda p=p: direction(*p) for p in points])
            ds = problem.average(*ds)
        if first:
            h = ds[0]
        else:
            keep = 1.0 - value_at(eta_x, t, "eta_x", unit=True)
            h = ds[0] + keep * (s.h - ds[1])
        x_new = s.xf - value_at(lr_x, t, "lr_x") * h
        if check_finite:
            check_step(name, t, (x_new, y, v), trace, "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, vf=s.vf, h=s.h)
        return reply(FSLAState(x_new, y, v, h, s.xf, t + 1, lx, ly), has_aux,
                     lambda: StepInfo(inner_loss=g_val, outer_loss=f_val, hypergrad_norm=norm(h),
                                      solve=one_step_solve(s.vf, hv, fy)))

    state_dict, load_state_dict = checkpoint(FSLAState, name)
    return Algorithm(init, guarded(FSLAState, body, problem, name), state_dict, load_state_dict, name)
