"""SRBA (Dagréou, Moreau, Vaiter, Ablin, "A lower bound and a near-optimal algorithm for
bilevel empirical risk minimization", AISTATS 2024, Alg. 1): SOBA's three directions as
SARAH estimates over a finite sum of n fixed minibatches, restarted from full-sum
directions every ``period`` steps.

With r^g = [∇y g, ∇yy g·v, ∇xy g·v] and r^f = [∇y f, ∇x f] (rows as in
:mod:`torchbilevel.optim.saba`; our v solves ∇yy g·v = +∇y f) and z_t = (x_t, y_t, v_t):

    t ≡ 0 (mod period):  D^g_t = (1/n_inner) Σ_i r^g_i(z_t),   D^f_t = (1/n_outer) Σ_j r^f_j(z_t)
    otherwise:           D^g_t = D^g_{t−1} + r^g_i(z_t) − r^g_i(z_{t−1})           (SARAH, one i)
                         D^f_t = D^f_{t−1} + r^f_j(z_t) − r^f_j(z_{t−1})           (one j)
    y_{t+1} = y_t − β D^g_y,   v_{t+1} = v_t − λ (D^g_{yy·v} − D^f_y),   x_{t+1} = x_t − α (D^f_x − D^g_{xy·v})

Both points of a SARAH difference use one sample and one random stream (dropout masks).
``period`` defaults to (n_inner + n_outer)/2 steps, benchmark_bilevel's
``period_frac = 0.5`` of an epoch over both sums in minibatches (at least 1).  No
projection of v (the reference has none; the paper's analysis projects on a ball).

Batches: ``(i, batch)`` pairs as SABA's.  A full-sum step draws pairs from each iterator
until every index has been seen once (later draws of a seen index are skipped, so any
stream that visits every minibatch works: a shuffled epoch takes n draws, sampling with
replacement about n·ln n); a stream that has not visited every index within 50·n + 100
draws is an error naming the missing indices.

Cost: a full-sum step n_inner·3 + n_outer gradient evaluations (one y-gradient and one
product backward per inner minibatch, one f gradient per outer one); a SARAH step 2·4 = 8
(SOBA's 4 at the current and the previous iterate).  Data parallel: one all-reduce per step.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import guards as G
from .. import randomness as R
from .. import tree as T
from ..problem import check_positive, check_problem, check_steps
from ._flat import check_step, checkpoint, init_flat, view
from .algorithm import Algorithm
from .saba import Pairs, inner_row, outer_row, pair_step, solve_report, split_rows
from .schedule import value_at
from .step_info import StepInfo, norm, reply


class SRBAState(NamedTuple):
    """State of SRBA in flat buffers: iterates ``xf, yf, vf``; the previous iterate
    ``x_prev, y_prev, v_prev``; the SARAH directions ``d_g`` ([∇y g, ∇yy g·v, ∇xy g·v]) and
    ``d_f`` ([∇y f, ∇x f]); ``step`` t; the sizes ``n_inner``, ``n_outer`` of the finite
    sums; the dict layouts.  ``state.x``, ``state.y``, ``state.v`` are dicts."""
    xf: Tensor
    yf: Tensor
    vf: Tensor
    x_prev: Tensor
    y_prev: Tensor
    v_prev: Tensor
    d_g: Tensor
    d_f: Tensor
    step: int
    n_inner: int
    n_outer: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    v = view("vf", "layout_y", "v (≈ [∇yy g]⁻¹∇y f) as a dict shaped like y")


def every_index(pairs: Pairs) -> dict:
    """{i: batch} for every index of ``pairs``: draws until each has been seen once."""
    seen, limit = {}, 50 * pairs.n + 100
    for _ in range(limit):
        i, b = pairs.draw()
        seen.setdefault(i, b)
        if len(seen) == pairs.n:
            return seen
    missing = sorted(set(range(pairs.n)) - set(seen))
    raise ValueError(f"{pairs.name} did not visit indices {missing[:10]}{' ...' if len(missing) > 10 else ''} of "
                     f"[0, {pairs.n_name}={pairs.n}) within {limit} draws: a full-sum step of srba needs every "
                     "minibatch (pass a stream that visits all of them, e.g. shuffled epochs)")


def mean_row(rows):
    """The means of the (row, value) pairs ``rows`` (an iterable, summed as it goes: one row
    held at a time), as (mean row, mean value)."""
    n, row, value = 0, 0, 0
    for r, v in rows:
        n, row, value = n + 1, row + r, value + v
    return row / n, value / n


def srba(problem, *, lr_x, lr_y, lr_v, n_inner: int, n_outer: int, period: Optional[int] = None,
         check_finite: bool = True) -> Algorithm:
    """SRBA (Dagréou et al., AISTATS 2024, Alg. 1): SOBA with SARAH variance reduction over
    ``n_inner`` and ``n_outer`` fixed minibatches, full-sum directions every ``period`` steps.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (x), β (y), λ (v); numbers > 0 or callables of t
            (benchmark_bilevel: 0.1 for y and v, x the same, constant).
        n_inner, n_outer: the numbers of fixed minibatches of g and f.
        period: steps between full-sum directions; default ``max(1, (n_inner + n_outer) // 2)``
            (benchmark_bilevel's ``period_frac = 0.5``).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Batches: ``(i, batch)`` pairs, one of each per SARAH step; a full-sum step draws until
    every index has been seen.  Cost: 8 gradient evaluations per SARAH step (SOBA's 4 at
    two points), 3·n_inner + n_outer per full-sum step.  Returns an
    :class:`torchbilevel.Algorithm`.  ``step(..., has_aux=True)`` returns ``(state,``
    :class:`torchbilevel.StepInfo` ``)``: ``inner_loss`` and ``outer_loss`` at (x_t, y_t) —
    the full sums g and f at a full-sum step (the mean over the minibatches), g_i and f_j
    on the step's minibatches at a SARAH step — and ``hypergrad_norm`` ‖D^f_x − D^g_{xy·v}‖
    (the SARAH direction x moves along), ``solve`` the v step's report at v_t from the
    SARAH estimates of ∇yy g·v_t and ∇y f (as SABA's); data parallel: means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    n_inner = check_steps(n_inner, "n_inner")
    n_outer = check_steps(n_outer, "n_outer")
    period = max(1, (n_inner + n_outer) // 2) if period is None else check_steps(period, "period")
    name = "srba"

    def init(x, y) -> SRBAState:
        """Initial state from dicts x, y (copied); v starts at zero."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        dy, dx = yf.numel(), xf.numel()
        z = lambda k: torch.zeros(k, dtype=yf.dtype, device=yf.device)
        v = torch.zeros_like(yf)
        return SRBAState(xf, yf, v, xf, yf, v, z(2 * dy + dx), z(dy + dx), 0, n_inner, n_outer, lx, ly)

    def sizes(s):
        return (n_inner, n_outer) if s is None else (s.n_inner, s.n_outer)

    def body(s: SRBAState, inner: Pairs, outer: Pairs, has_aux: bool = False):
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        with G.tracing(check_finite) as trace:
            if t % period == 0:
                bis, bjs = every_index(inner), every_index(outer)
                r_g, g_val = mean_row(inner_row(problem, lx, ly, s.xf, s.yf, s.vf, bis[i], update_buffers=(i == 0))
                                      for i in range(n_inner))
                r_f, f_val = mean_row(outer_row(problem, lx, ly, s.xf, s.yf, bjs[j]) for j in range(n_outer))
                r_g, r_f, g_val, f_val = problem.average(r_g, r_f, g_val, f_val)    # one all-reduce
                d_g, d_f = r_g.to(s.yf.dtype), r_f.to(s.yf.dtype)
            else:
                _, bi = inner.draw()
                _, bj = outer.draw()
                points = [(s.xf, s.yf, s.vf), (s.x_prev, s.y_prev, s.v_prev)]

                def at(xf, yf, vf, current):
                    return inner_row(problem, lx, ly, xf, yf, vf, bi, current), outer_row(problem, lx, ly, xf, yf, bj)

                # one sample = one batch and one random stream at both points
                ((g1, g_val), (f1, f_val)), ((g0, _), (f0, _)) = R.replaying(
                    R.capture(s.xf), [lambda p=p, k=k: at(*p, k == 0) for k, p in enumerate(points)])
                dg, df, g_val, f_val = problem.average(g1 - g0, f1 - f0, g_val, f_val)   # one all-reduce
                dg, df = dg.to(s.yf.dtype), df.to(s.yf.dtype)
                d_g, d_f = s.d_g + dg, s.d_f + df
        gy, dv, dx = split_rows(d_g, d_f, s.yf.numel())
        y_new = s.yf - value_at(lr_y, t, "lr_y") * gy
        v_new = s.vf - value_at(lr_v, t, "lr_v") * dv
        dx = dx.to(s.xf.dtype)
        x_new = s.xf - value_at(lr_x, t, "lr_x") * dx
        if check_finite:
            check_step(name, t, (x_new, y_new, v_new), trace,
                       "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, vf=s.vf, d_g=s.d_g, d_f=s.d_f)
        new = SRBAState(x_new, y_new, v_new, s.xf, s.yf, s.vf, d_g, d_f, t + 1, n_inner, n_outer, lx, ly)
        return reply(new, has_aux, lambda: StepInfo(inner_loss=g_val, outer_loss=f_val, hypergrad_norm=norm(dx),
                                                    solve=solve_report(s.vf, d_g, d_f)))

    state_dict, load_state_dict = checkpoint(SRBAState, name)
    return Algorithm(init, pair_step(SRBAState, body, problem, name, sizes), state_dict, load_state_dict, name)
