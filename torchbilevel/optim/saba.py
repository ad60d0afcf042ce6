"""SABA (Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables
stochastic and global variance reduction algorithms", NeurIPS 2022, Alg. 2): SOBA's three
directions, each replaced by a SAGA estimate over a finite sum of n fixed minibatches.

The finite sum: g = (1/n_inner) Σ_i g_i and f = (1/n_outer) Σ_j f_j, one term per fixed
minibatch.  Each step draws one inner index i and one outer index j and evaluates, at
(x_t, y_t, v_t) (our v solves ∇yy g·v = +∇y f; the paper's v has the opposite sign),

    r^g_i = [∇y g_i, ∇yy g_i·v, ∇xy g_i·v],    r^f_j = [∇y f_j, ∇x f_j]
    D^g = r^g_i − m^g_i + (1/n_inner) Σ_k m^g_k,   then m^g_i ← r^g_i        (SAGA, per direction)
    D^f = r^f_j − m^f_j + (1/n_outer) Σ_k m^f_k,   then m^f_j ← r^f_j
    y_{t+1} = y_t − β D^g_y
    v_{t+1} = v_t − λ (D^g_{yy·v} − D^f_y)                                   (the paper's D_v)
    x_{t+1} = x_t − α (D^f_x − D^g_{xy·v})                                   (the paper's D_x)

The memories m start at zero (benchmark_bilevel's SABA, ``mode_init_memory="zero"``): the
first step is a SOBA step and the averages fill as indices are visited.  Step sizes are
constant in the paper's analysis (as in the reference); numbers or callables of t here.

Batches: ``inner_batch`` / ``outer_batch`` yield ``(i, batch)`` pairs, i an int in
[0, n_inner) / [0, n_outer), the index of the fixed minibatch (the memories are per
index); a non-iterator pair is used at every step.  A bad index, anything but a pair, or a
state whose memories were built for another n is a clear error naming the argument.

Cost per step: one y-gradient of g, one exact ∇yy g·v with ∇xy g·v (one backward) and one
full gradient of f — about 4 gradient evaluations, as SOBA; memory n_inner·(2 dim y + dim x)
+ n_outer·(dim y + dim x) numbers.  Data parallel (the same index on every rank, each rank
1/N of the minibatch): one all-reduce per step.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import tree as T
from ..derivatives import exact_products, gradient, second_order
from ..problem import check_positive, check_problem, check_steps, draw
from . import donation as D
from ._flat import check_step, checkpoint, flat_fn, init_flat, view
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, norm, one_step_solve, reply

_INNER = "the inner gradient ∇y g (y update)"

__all__ = ["SABAState", "saba", "draw_indexed", "Pairs", "inner_row", "outer_row", "split_rows", "pair_step"]


class SABAState(NamedTuple):
    """State of SABA in flat buffers: iterates ``xf, yf, vf``; the SAGA memories
    ``mem_g`` (n_inner rows [∇y g_i, ∇yy g_i·v, ∇xy g_i·v]) and ``mem_f`` (n_outer rows
    [∇y f_j, ∇x f_j]) with their means ``avg_g``, ``avg_f``; ``step`` t; the dict layouts.
    ``state.x``, ``state.y``, ``state.v`` are dicts."""
    xf: Tensor
    yf: Tensor
    vf: Tensor
    mem_g: Tensor
    mem_f: Tensor
    avg_g: Tensor
    avg_f: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    v = view("vf", "layout_y", "v (≈ [∇yy g]⁻¹∇y f) as a dict shaped like y")


def draw_indexed(batch, name: str, n: int, n_name: str):
    """``(i, batch)`` from ``batch`` (drawn when an iterator), with i checked to be an
    integer in [0, n): TypeError for anything but a pair with an integer index, ValueError
    naming ``name`` and ``n_name`` for an index out of range."""
    item = draw(batch, name)
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(f"{name} must yield (i, batch) pairs, i the index of a fixed minibatch in "
                        f"[0, {n_name}={n}); got {type(item).__name__}")
    i, b = item
    if isinstance(i, Tensor) and i.numel() == 1 and not i.dtype.is_floating_point and i.dtype != torch.bool:
        i = int(i)
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"{name} yielded an index of type {type(i).__name__}: the first item of each pair must "
                        f"be an int in [0, {n_name}={n})")
    i = int(i)
    if not 0 <= i < n:
        raise ValueError(f"{name} yielded index {i}, outside [0, {n_name}={n}): the finite sum has {n} fixed "
                         f"minibatches (build the method with the right {n_name})")
    return i, b


class Pairs:
    """The ``(i, batch)`` source of one batch argument during one step; the first inner draw
    runs the check that g depends on y (on the batch, not the pair)."""

    def __init__(self, batch, name: str, n: int, n_name: str, check=None):
        self.batch, self.name, self.n, self.n_name, self.check = batch, name, n, n_name, check

    def draw(self):
        """The next ``(i, batch)``."""
        i, b = draw_indexed(self.batch, self.name, self.n, self.n_name)
        if self.check is not None:
            b = self.check(b)
            self.check = None
        return i, b


def inner_row(problem, lx, ly, xf, yf, vf, batch, update_buffers: bool):
    """([∇y g, ∇yy g·v, ∇xy g·v] at (x, y, v) on ``batch``, flat (dim y + dim y + dim x),
    g(x, y; batch)); running statistics move only when ``update_buffers``."""
    g = flat_fn(problem.inner, lx, ly)
    with (B.updating() if update_buffers else contextlib.nullcontext()):
        g_val, (gy,) = gradient(g, xf, yf, batch, argnums=1)             # ∇y g
    G.record(_INNER, gy)
    jv, hv = exact_products(g, xf, yf, vf, batch)                        # one backward of ⟨∇y g, v⟩
    G.record(G.LINEAR, hv)
    G.record(G.MIXED, jv)
    return torch.cat([gy, hv.to(gy.dtype), jv.to(gy.dtype)]), g_val


def outer_row(problem, lx, ly, xf, yf, batch):
    """([∇y f, ∇x f] at (x, y) on ``batch``, flat; f(x, y; batch))."""
    f = flat_fn(problem.outer, lx, ly)
    f_val, (fx, fy) = gradient(f, xf, yf, batch)
    G.record(G.OUTER, fx, fy)
    return torch.cat([fy, fx.to(fy.dtype)]), f_val


def solve_report(vf: Tensor, d_g: Tensor, d_f: Tensor):
    """The linear system's report (:func:`torchbilevel.optim.step_info.one_step_solve`) at v
    from the SOBA-shaped directions: their ∇yy g·v and ∇y f parts."""
    dy = vf.numel()
    return one_step_solve(vf, d_g[dy:2 * dy], d_f[:dy])


def split_rows(d_g: Tensor, d_f: Tensor, dy: int):
    """(y direction, v direction, x direction) of the SOBA-shaped rows ``d_g``, ``d_f``:
    ∇y g,  ∇yy g·v − ∇y f,  ∇x f − ∇xy g·v."""
    gy, hv, jv = d_g[:dy], d_g[dy:2 * dy], d_g[2 * dy:]
    fy, fx = d_f[:dy], d_f[dy:]
    return gy, hv - fy, fx - jv


def pair_step(cls, body, problem, name: str, sizes):
    """``step(s, inner_batch, outer_batch, has_aux=False)`` for the finite-sum methods (SABA,
    SRBA): type and size checks of the state (``sizes(s)`` returns (n_inner, n_outer) it
    was built for), then ``body(s, inner_pairs, outer_pairs, has_aux)`` (the new state, or
    ``(state, StepInfo)``) with module buffers frozen, products' double-backward failures
    named, and on error the random stream and running statistics put back."""
    def step(s, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        if not isinstance(s, cls):
            raise TypeError(f"state must come from init(), got {type(s).__name__}")
        D.check(donate, name, s)             # (no in-place update: donate=True is refused)
        (n_in, n_out), (m_in, m_out) = sizes(None), sizes(s)
        if (n_in, n_out) != (m_in, m_out):
            raise ValueError(f"{name}: the state was built for n_inner={m_in}, n_outer={m_out} minibatches, this "
                             f"{name} for n_inner={n_in}, n_outer={n_out}; the finite sum cannot change in a run")
        with R.restored_on_error(s.xf), B.transaction(), B.frozen(), second_order(name):
            ip = Pairs(inner_batch, "inner_batch", n_in, "n_inner",
                       check=lambda b: problem.check_inner_uses_y(s.x, s.y, b))
            op = Pairs(outer_batch, "outer_batch", n_out, "n_outer")
            return body(s, ip, op, has_aux)
    return step


def saba(problem, *, lr_x, lr_y, lr_v, n_inner: int, n_outer: int, check_finite: bool = True) -> Algorithm:
    """SABA (Dagréou et al., NeurIPS 2022, Alg. 2): SOBA with SAGA variance reduction over
    ``n_inner`` and ``n_outer`` fixed minibatches.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (x), β (y), λ (v); numbers > 0 or callables of t
            (benchmark_bilevel: one step size 0.1 for y and v, x the same over
            ``outer_ratio`` = 1; constant, as the paper's analysis).
        n_inner, n_outer: the numbers of fixed minibatches of g and f (the memories).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Batches: ``inner_batch`` and ``outer_batch`` yield ``(i, batch)`` pairs (i an int in
    [0, n_inner) / [0, n_outer)); one pair of each per step.  Cost per step: about 4
    gradient evaluations (∇y g, one product backward, ∇f), as SOBA.  Returns an
    :class:`torchbilevel.Algorithm`; ``state.x``, ``state.y``, ``state.v`` are dicts.
    ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo` ``)``:
    ``inner_loss`` g_i(x_t, y_t) and ``outer_loss`` f_j(x_t, y_t) on the step's minibatches
    i, j, ``hypergrad_norm`` ‖D^f_x − D^g_{xy·v}‖ (the SAGA direction x moves along),
    ``solve`` the v step's report at v_t from the SAGA estimates of ∇yy g·v_t and ∇y f
    (relative residual ‖D^g_{yy·v} − D^f_y‖/‖D^f_y‖, vᵀ(D^g_{yy·v}) ≤ 0); data parallel:
    means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    n_inner = check_steps(n_inner, "n_inner")
    n_outer = check_steps(n_outer, "n_outer")
    name = "saba"

    def init(x, y) -> SABAState:
        """Initial state from dicts x, y (copied); v and the memories start at zero."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        dy, dx = yf.numel(), xf.numel()
        z = lambda *shape: torch.zeros(*shape, dtype=yf.dtype, device=yf.device)
        return SABAState(xf, yf, torch.zeros_like(yf), z(n_inner, 2 * dy + dx), z(n_outer, dy + dx),
                         z(2 * dy + dx), z(dy + dx), 0, lx, ly)

    def sizes(s):
        return (n_inner, n_outer) if s is None else (s.mem_g.shape[0], s.mem_f.shape[0])

    def body(s: SABAState, inner: Pairs, outer: Pairs, has_aux: bool = False):
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        i, bi = inner.draw()
        j, bj = outer.draw()
        with G.tracing(check_finite) as trace:
            r_g, g_val = inner_row(problem, lx, ly, s.xf, s.yf, s.vf, bi, update_buffers=True)
            r_f, f_val = outer_row(problem, lx, ly, s.xf, s.yf, bj)
        r_g, r_f, g_val, f_val = problem.average(r_g, r_f, g_val, f_val)    # one all-reduce
        r_g, r_f = r_g.to(s.yf.dtype), r_f.to(s.yf.dtype)
        diff_g, diff_f = r_g - s.mem_g[i], r_f - s.mem_f[j]
        d_g, d_f = diff_g + s.avg_g, diff_f + s.avg_f                         # SAGA directions
        gy, dv, dx = split_rows(d_g, d_f, s.yf.numel())
        y_new = s.yf - value_at(lr_y, t, "lr_y") * gy
        v_new = s.vf - value_at(lr_v, t, "lr_v") * dv
        dx = dx.to(s.xf.dtype)
        x_new = s.xf - value_at(lr_x, t, "lr_x") * dx
        if check_finite:
            check_step(name, t, (x_new, y_new, v_new), trace,
                       "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, vf=s.vf, mem_g=s.mem_g, mem_f=s.mem_f)
        mem_g = s.mem_g.index_copy(0, torch.tensor([i], device=r_g.device), r_g[None])
        mem_f = s.mem_f.index_copy(0, torch.tensor([j], device=r_f.device), r_f[None])
        new = SABAState(x_new, y_new, v_new, mem_g, mem_f, s.avg_g + diff_g / n_inner, s.avg_f + diff_f / n_outer,
                        t + 1, lx, ly)
        return reply(new, has_aux, lambda: StepInfo(inner_loss=g_val, outer_loss=f_val, hypergrad_norm=norm(dx),
                                                    solve=solve_report(s.vf, d_g, d_f)))

    state_dict, load_state_dict = checkpoint(SABAState, name)
    return Algorithm(init, pair_step(SABAState, body, problem, name, sizes), state_dict, load_state_dict, name)
