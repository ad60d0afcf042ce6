"""MRBO (Yang, Ji, Liang, "Provably faster algorithms for bilevel optimization", NeurIPS
2021, Alg. 1): recursive momentum (STORM) on x and y, the x direction a stocBiO
hypergradient estimate evaluated at the current and the previous iterate on the same
samples.

    ∇̄f(x, y; S) = ∇x f(x, y; D_F) − ∇xy g(x, y; D_G)·η Σ_{q=0..Q} Π_{j=1..q} (I − η ∇yy g(x, y; B_j)) ∇y f(x, y; D_F)
    h^y_t = η^y ∇y g(z_t; ζ) + (1 − η^y)(h^y_{t−1} + ∇y g(z_t; ζ) − ∇y g(z_{t−1}; ζ))
    h^x_t = η^x ∇̄f(z_t; S) + (1 − η^x)(h^x_{t−1} + ∇̄f(z_t; S) − ∇̄f(z_{t−1}; S))
    y_{t+1} = y_t − β_t h^y_t,   x_{t+1} = x_t − α_t h^x_t                     (z_t = (x_t, y_t))

The estimate ∇̄f is the library's stocBiO estimator (Ji, Yang, Liang 2021, Alg. 3; see
:func:`torchbilevel.stocbio`), called twice on one set of samples S = (D_F, B_1..B_Q,
D_G) and one random stream, at z_t and z_{t−1}.  Its q-th Neumann term applies
(I − η∇yy g(B_q))···(I − η∇yy g(B_1)) to ∇y f: the paper's Π_{j=Q−q}^{Q} with the samples
numbered in the other direction (B_j here is the paper's B_{Q+1−j}; i.i.d. samples, the
same estimator).  The paper writes the momentum after the step, u_{k+1} = ∇y g(z_{k+1}) +
(1 − α_{k+1})(u_k − ∇y g(z_k)) on one fresh sample, then steps along u_{k+1}: the h_t above
with η^y = α_{k+1}, the same iterates.  Its first direction is the plain estimate (u_0 =
∇y g(z_0)), as here; benchmark_bilevel's MRBO starts its memories at zero instead, so the
two agree from the second step on.  The paper's analysis decays the step
sizes as k^(-1/3) and the momentum weights as k^(-2/3) (the exponents benchmark_bilevel's
MRBO uses); here α_t = ``lr_x``, β_t = ``lr_y`` and η^x, η^y = ``eta_x``, ``eta_y`` are
given directly, each a number or a callable of t, so those schedules are one lambda away.  The
first step (no previous iterate) uses the plain estimates (h_0 = ∇̄f, ∇y g).  Both updates
are the fused recursive-momentum kernel of :mod:`torchbilevel.kernels` over flat buffers.

Cost per step: at each of the two points, one y-gradient of g, one full gradient of f,
Q Hessian-vector products and one mixed product (full batch: one linearisation of ∇y g
shared by them; iterator batches: one per sample) — 2·(Q + 3) gradients and products.
Data parallel: the stocBiO estimator averages every product (Q + 2 all-reduces per
point), plus one for the two inner gradients.
"""
from __future__ import annotations

import collections.abc
import contextlib
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import kernels as K
from .. import randomness as R
from .. import tree as T
from ..derivatives import gradient
from ..estimators import stocbio
from ..problem import check_positive, check_problem, check_steps, check_unit, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, norm, reply

_INNER = "the inner gradient ∇y g (y update)"


class MRBOState(NamedTuple):
    """State of MRBO in flat buffers: iterates ``xf, yf``; momenta ``h_x, h_y``; the previous
    iterate ``x_prev, y_prev``; ``step`` t; the dict layouts.  ``state.x``, ``state.y`` are dicts."""
    xf: Tensor
    yf: Tensor
    h_x: Tensor
    h_y: Tensor
    x_prev: Tensor
    y_prev: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")


def mrbo(problem, *, lr_x, lr_y, eta_x=0.5, eta_y=0.5, neumann_steps: int = 10, eta: Optional[float] = None,
         backend: str = "auto", check_finite: bool = True) -> Algorithm:
    """MRBO (Yang, Ji, Liang, NeurIPS 2021): STORM momentum on x and y with a stocBiO
    hypergradient at the current and previous iterate on the same samples.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y: step sizes of x and y (numbers > 0 or callables of t).
        eta_x, eta_y: momentum weights in [0, 1] (1 = no momentum, plain stocBiO-SGD);
            numbers or callables of t.  Default 0.5, the starting value of the momentum
            weight in benchmark_bilevel's MRBO (which decays it as t^(-2/3)).
        neumann_steps: Q, terms of the Neumann series (default 10, benchmark_bilevel's).
        eta: the Neumann step η (< 1/L_g), a number or a callable of t; default None uses
            the value of ``lr_y`` at t = 0, held constant (the Neumann series is Q gradient
            steps on the linear system, stable for the step that is stable for y).  A
            decaying ``lr_y`` schedule does not decay η: a smaller η truncates the series
            ``η Σ_{q≤Q} (I − η∇yy g)^q`` further from the inverse, a bias, not a smaller step.
            benchmark_bilevel's MRBO does the same (its Neumann step ``hia_lr`` is the
            constant initial step size while its inner step decays as t^(-1/3)).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``, the fused update's backend.
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: each step draws ζ (y update) from ``inner_batch``, then D_F from
    ``outer_batch`` and B_1..B_Q, D_G from ``inner_batch`` (when iterators), and uses them
    at both points.  Returns an :class:`torchbilevel.Algorithm`; ``state.x``, ``state.y``
    are dicts.  ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo`
    ``)``: ``inner_loss`` g(x_t, y_t; ζ) (the y gradient's evaluation), ``outer_loss``
    f(x_t, y_t; D_F) (the stocBiO estimate's), ``hypergrad_norm`` ‖h^x_t‖ (the momentum
    direction x moves along), ``solve`` the stocBiO estimate's report at z_t (its Neumann
    series as a fixed-point solve, see :func:`torchbilevel.stocbio`); data parallel: means
    over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    eta_x = check_unit(eta_x, "eta_x", allow_schedule=True)
    eta_y = check_unit(eta_y, "eta_y", allow_schedule=True)
    neumann_steps = check_steps(neumann_steps, "neumann_steps")
    eta = value_at(lr_y, 0, "lr_y") if eta is None else check_positive(eta, "eta", allow_schedule=True)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    name = "mrbo"

    def init(x, y) -> MRBOState:
        """Initial state from dicts x, y (copied)."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        z = lambda t: torch.zeros_like(t)
        return MRBOState(xf, yf, z(xf), z(yf), xf, yf, 0, lx, ly)

    def body(s: MRBOState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        first = t == 0
        lx, ly = s.layout_x, s.layout_y
        g = flat_fn(problem.inner, lx, ly)
        est = stocbio(neumann_steps, value_at(eta, t, "eta"))
        zeta = draw(inner_batch, "inner_batch")
        d_f = draw(outer_batch, "outer_batch")
        fresh = isinstance(inner_batch, collections.abc.Iterator)
        samples = [draw(inner_batch, "inner_batch") for _ in range(neumann_steps + 1)] if fresh else None   # B_1..B_Q, D_G
        points = [(s.xf, s.yf)] + ([] if first else [(s.x_prev, s.y_prev)])

        def at(xf, yf, current):
            with (B.updating() if current else contextlib.nullcontext()):
                g_val, (gy,) = gradient(g, xf, yf, zeta, argnums=1)           # ∇y g(z; ζ)
            G.record(_INNER, gy)
            dx, aux = est.estimate(problem, lx.unravel(xf), ly.unravel(yf),
                                   iter(samples) if fresh else inner_batch, d_f)   # ∇̄f(z; S)
            return gy, T.ravel_like(lx, dx), g_val, aux

        with G.tracing(check_finite) as trace:
            # one sample = one batch and one random stream at both points
            rows = R.replaying(R.capture(s.xf), [lambda p=p, i=i: at(*p, i == 0) for i, p in enumerate(points)])
        gys, dxs, g_vals, auxes = (list(c) for c in zip(*rows))
        if first:
            gys, dxs = gys * 2, dxs * 2                                   # prev = cur: plain gradients
        *gys, g_val = problem.average(*gys, g_vals[0])                    # one all-reduce (estimates: averaged)
        e = (lambda sch, nm: 1.0) if first else (lambda sch, nm: value_at(sch, t, nm, unit=True))
        zx, zy = torch.zeros_like(dxs[0]), torch.zeros_like(gys[0])
        x_new, h_x = K.outer_update(s.xf, s.h_x, torch.stack([dxs[0], dxs[1], zx, zx]).to(s.xf.dtype),
                                    alpha=value_at(lr_x, t, "lr_x"), eta_f=e(eta_x, "eta_x"),
                                    scale_cur=1.0, scale_prev=1.0, fd=False, backend=backend)
        y_new, h_y = K.outer_update(s.yf, s.h_y, torch.stack([gys[0], gys[1], zy, zy]).to(s.yf.dtype),
                                    alpha=value_at(lr_y, t, "lr_y"), eta_f=e(eta_y, "eta_y"),
                                    scale_cur=1.0, scale_prev=1.0, fd=False, backend=backend)
        if check_finite:
            check_step(name, t, (x_new, y_new), trace,
                       "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, h_x=s.h_x, h_y=s.h_y)
        return reply(MRBOState(x_new, y_new, h_x, h_y, s.xf, s.yf, t + 1, lx, ly), has_aux,
                     lambda: StepInfo(inner_loss=g_val, outer_loss=auxes[0].outer_loss, hypergrad_norm=norm(h_x),
                                      solve=auxes[0].solve))

    state_dict, load_state_dict = checkpoint(MRBOState, name)
    return Algorithm(init, guarded(MRBOState, body, problem, name), state_dict, load_state_dict, name)
