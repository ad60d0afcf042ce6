"""BOME (Liu, Ye, Wright, Stone, Liu, "BOME! Bilevel optimization made easy: a simple
first-order approach", NeurIPS 2022): fully first order.  The bilevel problem becomes
min f(x, y) s.t. q(x, y) = g(x, y) − g*(x) ≤ 0, with g*(x) approximated by T gradient
steps on g from the current y, and x, y move together along a dynamic-barrier direction:

    θ_0 = y_t,  θ_{k+1} = θ_k − γ ∇y g(x_t, θ_k; ζ_k)      (k < T; θ_T(x_t) treated as constant)
    q̂(x, y) = g(x, y) − g(x, θ_T)
    ∇q̂ = (∇x g(x_t, y_t; ζ) − ∇x g(x_t, θ_T; ζ),  ∇y g(x_t, y_t; ζ))
    φ_t = η ‖∇q̂‖²                       (the default rule; phi_rule="value": φ_t = η q̂(x_t, y_t))
    λ_t = max(φ_t − ⟨∇f, ∇q̂⟩, 0) / ‖∇q̂‖²
    (x_{t+1}, y_{t+1}) = (x_t, y_t) − (α, β)·(∇f(x_t, y_t; ψ) + λ_t ∇q̂)

λ_t is the smallest multiplier for which the step decreases q̂ at least at rate φ_t
(⟨∇f + λ∇q̂, ∇q̂⟩ ≥ φ_t): the direction is ∇f with its component against ∇q̂ removed,
plus η∇q̂.  η is any number ≥ 0: the paper's control of the constraint's decrease rate, not
a weight in [0, 1] (benchmark_bilevel sweeps η ∈ {0.05, 0.5, 5}).  Where ∇q̂ = 0 (y already
minimises g and θ_T = y) the constraint is inactive and λ_t = 0 (the formula would divide 0
by 0; benchmark_bilevel's BOME returns NaN there).  The paper uses one step size for (x, y); here x and y have their own
(``lr_x``, ``lr_y``; ``lr_x = lr_y`` is the paper's), and the inner path's γ is
``lr_inner`` (default ``lr_y``).  benchmark_bilevel's BOME (full batch) uses η = 0.5,
T = 10 and the gradient-norm rule: these are the defaults.

Samples: the inner path draws one inner sample per step (when ``inner_batch`` is an
iterator); then ζ (inner) and ψ (outer) serve every gradient of the update, and the two
evaluations of ∇x g at (x, y) and (x, θ_T) replay one random stream (dropout masks), so
that ∇x q̂ is a difference on one sample.

BOME is a full-batch method: the paper states and analyses it with exact gradients, and
benchmark_bilevel runs it on full batches only.  With minibatches λ_t is a ratio of noisy
inner products and ∇q̂ on a minibatch is not zero at y*(x), so the barrier keeps acting on
noise and the iterate settles at a higher floor.  Measured (``bench/bome_minibatch.py``,
the finite-sum quadratic of :func:`torchbilevel.experiments.compare.finite_sum_quadratic`,
n = 512, p = d = 10, 1500 steps, lr_x = lr/5, η = 0.5): with minibatches of 64 the final
‖∇Φ‖²/‖∇Φ(x_0)‖² is 4.8e-3 (lr 0.1) and 3.6e-3 (lr 0.3), against 7e-4 and 9e-4 with full
batches at the same steps, where SOBA, MA-SOBA and F2SA with minibatches of 64 reach
8e-6, 5.5e-6 and 5.6e-6 (lr 0.1); at lr 0.03 it is still at 5e-2.  Prefer full (or large)
batches with BOME.

Cost per step: T y-gradients of g (the path), two full gradients of g and one of f —
T + 3 gradient evaluations, no second-order products; data parallel: one all-reduce per
path step plus one for the update.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import sharding as S
from .. import tree as T
from ..derivatives import gradient
from ..problem import check_positive, check_problem, check_steps, draw
from ._flat import add_into, check_step, checkpoint, guarded, init_flat, ravel_consuming, view, views_fn, work_dtype
from . import donation as D
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, norm, reply

_PATH = "the inner path θ_T (gradient steps on ∇y g)"
_G = "the constraint gradient ∇q̂ (∇g at (x, y) and (x, θ_T))"
_F = "the outer gradient ∇f"
_OVERFLOW = "the update (step sizes too large: the iterates overflowed)"


def _check_phi(value, name: str):
    """η of φ = η‖∇q̂‖²: a finite number ≥ 0 (or a callable of t), else an error naming it."""
    if callable(value) and name == "phi":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0 or a callable of the step t, got {value!r}")
    if not (0.0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


class BOMEState(NamedTuple):
    """State of BOME in flat buffers: ``xf, yf``; ``step`` t; the dict layouts; ``lam``,
    the multiplier λ of the last step (a 0-d tensor, for monitoring).
    ``state.x``, ``state.y`` are dicts."""
    xf: Tensor
    yf: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled
    lam: Tensor

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")


def bome(problem, *, lr_x, lr_y, inner_steps: int = 10, phi=0.5, phi_rule: str = "grad_norm",
         lr_inner=None, check_finite: bool = True) -> Algorithm:
    """BOME (Liu et al., NeurIPS 2022): first-order dynamic-barrier method on the
    value-function constraint g(x, y) − g(x, θ_T(x)) ≤ 0.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y: step sizes of x and y (numbers > 0 or callables of t).
        inner_steps: T ≥ 1, gradient steps of the inner path θ (default 10).
        phi: η ≥ 0 in φ = η‖∇q̂‖² (or φ = η q̂); a number or callable of t (default 0.5,
            benchmark_bilevel's; its sweep also uses 0.05 and 5).
        phi_rule: ``"grad_norm"`` (φ = η‖∇q̂‖², default) or ``"value"`` (φ = η q̂).
        lr_inner: step γ of the inner path (default: ``lr_y``).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Returns an :class:`torchbilevel.Algorithm`; ``state.x``, ``state.y`` are dicts and
    ``state.lam`` the last multiplier.  ``step(..., has_aux=True)`` returns ``(state,``
    :class:`torchbilevel.StepInfo` ``)``: ``inner_loss`` g(x_t, y_t; ζ), ``outer_loss``
    f(x_t, y_t; ψ) (the update's evaluations), ``hypergrad_norm`` ‖∇x f + λ_t ∇x q̂‖ (the x
    part of the direction), ``multiplier`` λ_t; data parallel and sharded: means over ranks.
    ``step(..., donate=True)`` moves x and y in the old state's buffers (bitwise the same
    numbers; a step adds 3.0x the parameter bytes above its state, bench/RESULTS.md §16;
    :mod:`torchbilevel.optim.donation`).
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    inner_steps = check_steps(inner_steps, "inner_steps")
    phi = _check_phi(phi, "phi")
    if phi_rule not in ("grad_norm", "value"):
        raise ValueError(f"phi_rule must be 'grad_norm' or 'value', got {phi_rule!r}")
    lr_inner = lr_y if lr_inner is None else check_positive(lr_inner, "lr_inner", allow_schedule=True)
    name = "bome"

    def init(x, y) -> BOMEState:
        """Initial state from dicts x, y (copied)."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite, sharded=True)   # gradients only: runs sharded
        return BOMEState(xf, yf, 0, lx, ly, torch.zeros((), dtype=work_dtype(yf), device=yf.device))

    def body(s: BOMEState, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        """One step.  Lean: the objectives are differentiated at the dict views of the flat
        buffers (each gradient arrives key by key) and raveled into flat buffers key by key,
        each entry freed as it is copied; ∇x q̂ and the x direction are formed in the buffers
        of the gradients they consume; x and y move in place when ``donate``.  The same
        operations as on flat gradients: bitwise the same numbers."""
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        g, f = views_fn(problem.inner, lx, ly), views_fn(problem.outer, lx, ly)
        gamma = value_at(lr_inner, t, "lr_inner")
        if donate:
            D.take(s)
        xv, yv = lx.unravel(s.xf), ly.unravel(s.yf)
        with G.tracing(check_finite) as trace:
            theta = s.yf.clone()
            thv = ly.unravel(theta)
            for _ in range(inner_steps):                       # θ_T: no graph, buffers frozen
                (gy,) = gradient(g, xv, thv, draw(inner_batch, "inner_batch"), argnums=1)[1]
                (gy,) = problem.average(gy)
                add_into(thv, gy, -gamma)
                del gy
            G.record(_PATH, theta)
            zeta, psi = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")

            def at_y():
                with B.updating():        # running statistics move once per step, here
                    return gradient(g, xv, yv, zeta)

            (gv, (gx, gy)), (gv_th, (gx_th,)) = R.replaying(
                R.capture(s.xf), [at_y, lambda: gradient(g, xv, thv, zeta, argnums=0)])
            G.record(_G, gx, gy, gx_th)
            theta = thv = None             # the path is no longer needed: freed
            # ∇x q̂ = ∇x g(x, y) − ∇x g(x, θ_T), key by key into one flat buffer
            qx = ravel_consuming(lx, gx, minus=gx_th)
            gy = ravel_consuming(ly, gy)
            fv, (fx, fy) = gradient(f, xv, yv, psi)
            G.record(_F, fx, fy)
            fx, fy = ravel_consuming(lx, fx), ravel_consuming(ly, fy)
        qx, gy, fx, fy, gv, gv_th, fv = problem.average(qx, gy, fx, fy, gv, gv_th, fv)  # one all-reduce
        work = work_dtype(s.yf)
        qx, qy = qx.to(work), gy.to(work)
        d = S.dots((qx, qx, lx), (qy, qy, ly), (fx.to(work), qx, lx), (fy.to(work), qy, ly))  # sharded: one all-reduce
        n2, dot = d[0] + d[1], d[2] + d[3]                               # ‖∇q̂‖², ⟨∇f, ∇q̂⟩
        eta = _check_phi(phi(t), f"phi({t})") if callable(phi) else phi
        phi_t = eta * (n2 if phi_rule == "grad_norm" else (gv - gv_th).to(work))
        lam = torch.where(n2 > 0, torch.clamp(phi_t - dot, min=0.0) / torch.where(n2 > 0, n2, 1.0),
                          torch.zeros_like(n2))
        # (x, y) − (α, β)·(∇f + λ∇q̂), each direction formed in place in the buffers it consumes
        d_x = fx.to(work).add_(qx.mul_(lam))
        d_y = fy.to(work).add_(qy.mul_(lam))
        del qx, qy
        step_x = d_x.to(s.xf.dtype)
        a_x, a_y = -value_at(lr_x, t, "lr_x"), -value_at(lr_y, t, "lr_y")
        if donate:
            x_new, y_new = s.xf.add_(step_x, alpha=a_x), s.yf.add_(d_y.to(s.yf.dtype), alpha=a_y)
        else:
            x_new, y_new = torch.add(s.xf, step_x, alpha=a_x), torch.add(s.yf, d_y.to(s.yf.dtype), alpha=a_y)
        del d_y
        if check_finite:
            if donate:
                check_step(name, t, (x_new, y_new, lam), trace, _OVERFLOW, donated=True)
            else:
                check_step(name, t, (x_new, y_new, lam), trace, _OVERFLOW, xf=s.xf, yf=s.yf)
        return reply(BOMEState(D.fresh(x_new), D.fresh(y_new), t + 1, lx, ly, lam), has_aux, lambda: StepInfo(
            inner_loss=gv, outer_loss=fv, hypergrad_norm=norm(step_x, lx), multiplier=lam))

    state_dict, load_state_dict = checkpoint(BOMEState, name)
    return Algorithm(init, guarded(BOMEState, body, problem, name), state_dict, load_state_dict, name)
