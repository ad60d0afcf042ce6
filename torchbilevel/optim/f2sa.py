"""F2SA (Kwon, Kwon, Wright, Nowak, "A fully first-order method for stochastic bilevel
optimization", ICML 2023): no second-order products.  The bilevel problem is replaced by
the penalty  L_λ(x, y) = f(x, y) + λ (g(x, y) − min_z g(x, z)),  whose minimiser over y,
y_λ*(x), approaches y*(x) as λ grows, and whose gradient in x approaches ∇Φ(x) with an
O(1/λ) bias:

    ∇x L_λ = ∇x f(x, y_λ*) + λ (∇x g(x, y_λ*) − ∇x g(x, y*)).

Single loop (one inner step per outer step, all three gradients at the current iterate):

    z_{t+1} = z_t − γ_t ∇y g(x_t, z_t; ζ_t)                                   z tracks y*(x)
    y_{t+1} = y_t − β_t (∇y g(x_t, y_t; ζ_t) + ∇y f(x_t, y_t; ψ_t) / λ_t)      y tracks y_λ*(x)
    x_{t+1} = x_t − α_t (∇x f(x_t, y_t; ψ_t) + λ_t (∇x g(x_t, y_t; ζ_t) − ∇x g(x_t, z_t; ζ_t)))
    λ_t     = penalty · (1 + t)^penalty_growth

Scaling: the paper steps y along ∇y f + λ ∇y g with a step α_k ∝ 1/λ_k (its step sizes
satisfy α_k λ_k = γ_k, the z step); we write that step as β_t (∇y g + ∇y f/λ_t), the
gradient of (f + λ g)/λ, so ``lr_y`` is a step size on the scale of g — stable for the
same values as ``lr_z`` whatever λ — and the penalty can grow without retuning it.
λ grows polynomially, λ_t = penalty·(1 + t)^p.  The default p = 1/7 follows the paper's
coupling of λ to the step sizes (y's step α_k with α_k λ_k of the order of z's step γ_k)
with the decay exponents 5/7 (y) and 4/7 (z) that benchmark_bilevel's F2SA uses; a larger
p (up to 1) removes the O(1/λ) bias faster when the steps are constant.

Samples: one inner sample ζ_t serves z, y and both ∇x g terms, one outer sample ψ_t serves
∇f, and the two g evaluations at (x, y) and (x, z) replay one random stream (dropout
masks): λ(∇x g(x, y; ζ) − ∇x g(x, z; ζ)) is then a difference of nearby points on one
sample, whose noise is O(λ‖y − z‖) = O(1), not O(λ) as with independent samples
(benchmark_bilevel's F2SA draws them independently).

Cost per step: two full gradients of g (at (x, y) and (x, z)) and one of f — 3 gradient
evaluations, no products; data parallel: one all-reduce per step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import tree as T
from ..derivatives import gradient
from ..problem import check_positive, check_problem, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .schedule import value_at

_G = "the inner gradients ∇g at (x, y) and (x, z)"
_F = "the outer gradient ∇f"


class F2SAState(NamedTuple):
    """State of F2SA in flat buffers: ``xf``; ``yf`` (the penalised inner iterate, tracks
    argmin f/λ + g); ``zf`` (tracks argmin g); ``step`` t; the dict layouts.
    ``state.x``, ``state.y``, ``state.z`` are dicts."""
    xf: Tensor
    yf: Tensor
    zf: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    z = view("zf", "layout_y", "z as a dict (views of the flat buffer)")


def f2sa(problem, *, lr_x, lr_y, lr_z, penalty=10.0, penalty_growth: float = 1.0 / 7.0,
         check_finite: bool = True) -> Algorithm:
    """F2SA (Kwon et al., ICML 2023), fully first order, single loop.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_z: step sizes α (x), β (y, on the scale of g: see the module
            docstring), γ (z); numbers > 0 or callables of t.
        penalty: λ_0 (> 0), or a callable t -> λ_t (then ``penalty_growth`` is unused).
            The bias of the x direction is O(1/λ): larger is more accurate, and stable
            because y's step does not scale with λ.  Default 10.
        penalty_growth: exponent p ≥ 0 of λ_t = penalty·(1 + t)^p; default 1/7, the
            paper's rate.
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    ``init(x, y, z=None)`` starts z at y unless given.  Returns an
    :class:`torchbilevel.Algorithm`.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_z = check_positive(lr_z, "lr_z", allow_schedule=True)
    penalty = check_positive(penalty, "penalty", allow_schedule=True)
    if isinstance(penalty_growth, bool) or not isinstance(penalty_growth, (int, float)):
        raise TypeError(f"penalty_growth must be a number >= 0, got {penalty_growth!r}")
    if not (0.0 <= penalty_growth < float("inf")):
        raise ValueError(f"penalty_growth must be a finite number >= 0, got {penalty_growth}")
    penalty_growth = float(penalty_growth)
    name = "f2sa"

    def lam_at(t: int) -> float:
        if callable(penalty):
            return value_at(penalty, t, "penalty")
        return penalty * (1.0 + t) ** penalty_growth

    def init(x, y, z=None) -> F2SAState:
        """Initial state from dicts x, y (and z, default y); copies them."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite, sharded=True)   # gradients only: runs sharded
        if z is None:
            zf = yf.clone()
        else:
            T.check_same_keys(z, y, "z and y")
            zf = T.ravel_like(ly, z).to(yf.dtype).clone()
        return F2SAState(xf, yf, zf, 0, lx, ly)

    def body(s: F2SAState, inner_batch, outer_batch) -> F2SAState:
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        g, f = flat_fn(problem.inner, lx, ly), flat_fn(problem.outer, lx, ly)
        zeta, psi = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")

        def at_y():
            with B.updating():            # running statistics move once per step, here
                return gradient(g, s.xf, s.yf, zeta)[1]

        with G.tracing(check_finite) as trace:
            (gx_y, gy_y), (gx_z, gy_z) = R.replaying(R.capture(s.xf), [at_y, lambda: gradient(g, s.xf, s.zf, zeta)[1]])
            G.record(_G, gx_y, gy_y, gx_z, gy_z)
            fx, fy = gradient(f, s.xf, s.yf, psi)[1]
            G.record(_F, fx, fy)
        gx_y, gy_y, gx_z, gy_z, fx, fy = problem.average(gx_y, gy_y, gx_z, gy_z, fx, fy)   # one all-reduce
        lam = lam_at(t)
        z_new = torch.add(s.zf, gy_z, alpha=-value_at(lr_z, t, "lr_z"))
        y_new = torch.add(s.yf, torch.add(gy_y, fy, alpha=1.0 / lam), alpha=-value_at(lr_y, t, "lr_y"))
        d_x = torch.add(fx, torch.sub(gx_y, gx_z), alpha=lam)
        x_new = torch.add(s.xf, d_x, alpha=-value_at(lr_x, t, "lr_x"))
        if check_finite:
            check_step(name, t, (x_new, y_new, z_new), trace,
                       "the update (step sizes too large or the penalty λ too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf, zf=s.zf)
        return F2SAState(x_new, y_new, z_new, t + 1, lx, ly)

    state_dict, load_state_dict = checkpoint(F2SAState, name)
    return Algorithm(init, guarded(F2SAState, body, problem), state_dict, load_state_dict, name)
