"""AmIGO (Arbel, Mairal, "Amortized implicit differentiation for stochastic bilevel
optimization", ICLR 2022, Alg. 1-3): warm-started SGD on y, then warm-started SGD on the
quadratic ½ vᵀ∇yy g v − vᵀ∇y f for v, then one outer step — both inner problems are
amortised across outer steps by starting from the previous solution.

    y ← y − β ∇y g(x_t, y; ζ_k),                      k = 1..T            (Alg. 2, warm start y_t)
    v ← v − λ (∇yy g(x_t, y_{t+1}; ζ'_k)·v − ∇y f(x_t, y_{t+1}; ψ_t)),  k = 1..M   (Alg. 3, warm start v_t)
    x_{t+1} = x_t − α (∇x f(x_t, y_{t+1}; ψ_t) − ∇xy g(x_t, y_{t+1}; ζ''_t)·v_{t+1})   (Alg. 1)

(our v solves ∇yy g·v = +∇y f).  Every ζ is a fresh inner sample when ``inner_batch`` is
an iterator, ψ_t one outer sample; ∇y f is evaluated once per step and reused by the M
v-steps (as benchmark_bilevel's AmIGO does).  Defaults T = M = 10 and constant step sizes
(benchmark_bilevel's ``n_inner_steps = 10``, step size 0.1 for y, v and x).

Cost per step: T y-gradients of g, one full gradient of f, M Hessian-vector products and
one mixed product ∇xy g·v — T + M + 2 gradient evaluations (22 at the defaults).  Data
parallel: one all-reduce per gradient or product (T + M + 2).  Running statistics move once
per inner SGD step on y (T per step).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import tree as T
from ..derivatives import exact_products, gradient, second_order
from ..problem import check_positive, check_problem, check_steps, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, nonpositive, norm, reply, sgd_solve

_INNER = "the inner gradient ∇y g (y update)"

__all__ = ["AmIGOState", "amigo", "hvp_flat", "mixed_flat"]


class AmIGOState(NamedTuple):
    """State of AmIGO in flat buffers: iterates ``xf, yf`` and the linear-system iterate
    ``vf`` (warm starts); ``step`` t; the dict layouts.  ``state.x``, ``state.y``,
    ``state.v`` are dicts."""
    xf: Tensor
    yf: Tensor
    vf: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    v = view("vf", "layout_y", "v (≈ [∇yy g]⁻¹∇y f) as a dict shaped like y")


def hvp_flat(problem, lx, ly, xf, yf, vf, batch) -> Tensor:
    """∇yy g(x, y; batch)·v on flat buffers, exactly (:func:`torchbilevel.derivatives.exact_products`:
    one evaluation of ∇y g with its graph and one backward)."""
    return exact_products(flat_fn(problem.inner, lx, ly), xf, yf, vf, batch)[1].to(yf.dtype)


def mixed_flat(problem, lx, ly, xf, yf, vf, batch) -> Tensor:
    """∇xy g(x, y; batch)·v on flat buffers, exactly (as :func:`hvp_flat`)."""
    return exact_products(flat_fn(problem.inner, lx, ly), xf, yf, vf, batch)[0].to(xf.dtype)


def amigo(problem, *, lr_x, lr_y, lr_v, inner_steps: int = 10, v_steps: Optional[int] = None,
          check_finite: bool = True) -> Algorithm:
    """AmIGO (Arbel, Mairal, ICLR 2022, Alg. 1): T warm-started SGD steps on y, M on the
    linear system for v, one step on x.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (x), β (y), λ (v); numbers > 0 or callables of t.
        inner_steps: T, SGD steps on y per outer step (default 10, benchmark_bilevel's).
        v_steps: M, SGD steps on v per outer step (default None: T, as benchmark_bilevel).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: T draws from ``inner_batch`` for y, one from ``outer_batch``, M from
    ``inner_batch`` for v and one for the mixed product.  Cost per step: T + M + 2
    gradient evaluations.  Returns an :class:`torchbilevel.Algorithm`.
    ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo` ``)``:
    ``inner_loss`` g(x_t, y_{t,T−1}; ζ_T) (the last y step's evaluation, before that
    step), ``outer_loss`` f(x_t, y_{t+1}; ψ_t), ``hypergrad_norm`` ‖∇x f − ∇xy g·v_{t+1}‖,
    ``solve`` the M v steps' report (``step_info.sgd_solve``: the relative residual
    ‖∇yy g·v − ∇y f‖/‖∇y f‖ at v_t on the first sample and at v_{t,M−1} on the last, the
    iterates with vᵀ∇yy g v ≤ 0); data parallel: means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    inner_steps = check_steps(inner_steps, "inner_steps")
    v_steps = inner_steps if v_steps is None else check_steps(v_steps, "v_steps")
    name = "amigo"

    def init(x, y) -> AmIGOState:
        """Initial state from dicts x, y (copied); v starts at zero."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        return AmIGOState(xf, yf, torch.zeros_like(yf), 0, lx, ly)

    def body(s: AmIGOState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        g, f = flat_fn(problem.inner, lx, ly), flat_fn(problem.outer, lx, ly)
        beta, lam = value_at(lr_y, t, "lr_y"), value_at(lr_v, t, "lr_v")
        with G.tracing(check_finite) as trace, second_order(name):
            y = s.yf
            for _ in range(inner_steps):                                     # Alg. 2: warm-started SGD on y
                with B.updating():
                    g_val, (gy,) = gradient(g, s.xf, y, draw(inner_batch, "inner_batch"), argnums=1)
                G.record(_INNER, gy)
                gy, g_val = problem.average(gy, g_val)
                y = y - beta * gy
            f_val, (fx, fy) = gradient(f, s.xf, y, draw(outer_batch, "outer_batch"))
            G.record(G.OUTER, fx, fy)
            fx, fy, f_val = problem.average(fx, fy, f_val)
            v = s.vf
            report = []        # has_aux: (‖r‖², vᵀHv ≤ 0) of each v step, r = Hv − ∇y f
            for _ in range(v_steps):                                         # Alg. 3: warm-started SGD on v
                hv = hvp_flat(problem, lx, ly, s.xf, y, v, draw(inner_batch, "inner_batch"))
                G.record(G.LINEAR, hv)
                (hv,) = problem.average(hv)
                r = hv - fy.to(v.dtype)
                if has_aux:
                    report.append((r.pow(2).sum(), nonpositive(v, hv)))
                v = v - lam * r
            jv = mixed_flat(problem, lx, ly, s.xf, y, v, draw(inner_batch, "inner_batch"))
            G.record(G.MIXED, jv)
            (jv,) = problem.average(jv)
        d_x = fx.to(s.xf.dtype) - jv
        x_new = s.xf - value_at(lr_x, t, "lr_x") * d_x
        if check_finite:
            check_step(name, t, (x_new, y, v), trace, "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, vf=s.vf)
        return reply(AmIGOState(x_new, y, v, t + 1, lx, ly), has_aux,
                     lambda: StepInfo(inner_loss=g_val, outer_loss=f_val, hypergrad_norm=norm(d_x), solve=sgd_solve(
                         v_steps, report[0][0], report[-1][0], fy.to(v.dtype).pow(2).sum(),
                         sum(bad.to(torch.int64) for _, bad in report))))

    state_dict, load_state_dict = checkpoint(AmIGOState, name)
    return Algorithm(init, guarded(AmIGOState, body, problem, name), state_dict, load_state_dict, name)
