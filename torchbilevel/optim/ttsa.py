"""TTSA (Hong, Wai, Wang, Yang, "A two-timescale stochastic algorithm framework for bilevel
optimization: complexity analysis and application to actor-critic", SIAM J. Optim. 2023,
Alg. 1): one SGD step on y on the fast timescale, one step on x on the slow timescale along
a hypergradient whose inverse Hessian is the randomly truncated Neumann series of Ghadimi
and Wang (2018, Alg. 3; benchmark_bilevel's ``hia``).

    y_{t+1} = y_t − β_t ∇y g(x_t, y_t; ζ_t)                                     (fast timescale)
    v_t     = Q η Π_{k=1..p} (I − η ∇yy g(x_t, y_{t+1}; ζ_k)) ∇y f(x_t, y_{t+1}; ψ_t),  p ~ U{0, .., Q−1}
    x_{t+1} = x_t − α_t (∇x f(x_t, y_{t+1}; ψ_t) − ∇xy g(x_t, y_{t+1}; ζ_t)·v_t)    (slow timescale)
    α_t = lr_x / (t + 1)^{decay_x},   β_t = lr_y / (t + 1)^{decay_y}

The two timescales: α_t ∝ t^{−3/5}, β_t ∝ t^{−2/5} (the paper's rates for the nonconvex case
and benchmark_bilevel's exponents 0.6, 0.4); set ``decay_x = decay_y = 0`` for constant steps.
Q = ``neumann_steps`` (default 10) and the Neumann step η = ``eta`` (default: ``lr_y``,
benchmark_bilevel's ``n_hia_steps = 10`` and HIA step size, constant — never decayed with
β_t).  The truncation p is drawn from a generator the state carries (``seed``), so a
resumed run draws the same p's.  The mixed product reuses the y step's sample ζ_t at
y_{t+1}, as the reference does.

Cost per step: one y-gradient of g, one full gradient of f, p Hessian-vector products and
one mixed product — 3 + p gradient evaluations, (Q + 5)/2 on average (7.5 at Q = 10).
Data parallel: one all-reduce per gradient or product (3 + p).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import tree as T
from ..derivatives import gradient, second_order
from ..problem import check_positive, check_problem, check_steps, draw
from ._flat import check_step, checkpoint, flat_fn, guarded, init_flat, view
from .algorithm import Algorithm
from .amigo import hvp_flat, mixed_flat
from .schedule import value_at
from .step_info import StepInfo, norm, reply

_INNER = "the inner gradient ∇y g (y update)"


class TTSAState(NamedTuple):
    """State of TTSA in flat buffers: iterates ``xf, yf``; ``rng``, the state of the
    generator of the Neumann truncation p (a uint8 tensor); ``step`` t; the dict layouts.
    ``state.x``, ``state.y`` are dicts."""
    xf: Tensor
    yf: Tensor
    rng: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")


def _check_decay(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1] (the exponent of a step-size decay), got {value}")
    return float(value)


def ttsa(problem, *, lr_x, lr_y, neumann_steps: int = 10, eta: Optional[float] = None, decay_x: float = 0.6,
         decay_y: float = 0.4, seed: int = 0, check_finite: bool = True) -> Algorithm:
    """TTSA (Hong, Wai, Wang, Yang, SIAM J. Optim. 2023, Alg. 1): two-timescale SGD on y and
    x with a randomly truncated Neumann hypergradient.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y: the step sizes' scales (numbers > 0 or callables of t), divided by
            (t + 1)^decay_x and (t + 1)^decay_y.
        neumann_steps: Q, the Neumann series' length; the truncation p is uniform in [0, Q).
        eta: the Neumann step η (< 1/L_g); default None: ``lr_y`` (which must then be a
            number: the series' step is never decayed).
        decay_x, decay_y: the timescales' exponents in [0, 1] (default 0.6 and 0.4, the
            paper's and benchmark_bilevel's); 0 gives constant steps.
        seed: seed of the generator of p (carried by the state).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: ζ_t from ``inner_batch`` (y step and mixed product), ψ_t from
    ``outer_batch``, then p draws from ``inner_batch`` for the series.  Cost per step:
    3 + p gradient evaluations ((Q + 5)/2 on average).  Returns an :class:`torchbilevel.Algorithm`.
    ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo` ``)``:
    ``inner_loss`` g(x_t, y_t; ζ_t) (the y step's evaluation), ``outer_loss``
    f(x_t, y_{t+1}; ψ_t), ``hypergrad_norm`` ‖∇x f − ∇xy g·v_t‖ (the direction before the
    step size α_t); data parallel: means over ranks.
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    neumann_steps = check_steps(neumann_steps, "neumann_steps")
    if eta is None:
        if callable(lr_y):
            raise ValueError("eta must be given when lr_y is a schedule (the Neumann step is a constant)")
        eta = lr_y
    eta = check_positive(eta, "eta")
    decay_x, decay_y = _check_decay(decay_x, "decay_x"), _check_decay(decay_y, "decay_y")
    seed = check_steps(seed, "seed", minimum=0)
    name = "ttsa"

    def init(x, y) -> TTSAState:
        """Initial state from dicts x, y (copied) and the truncation generator seeded with ``seed``."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite)
        return TTSAState(xf, yf, torch.Generator().manual_seed(seed).get_state(), 0, lx, ly)

    def body(s: TTSAState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        lx, ly = s.layout_x, s.layout_y
        g, f = flat_fn(problem.inner, lx, ly), flat_fn(problem.outer, lx, ly)
        gen = torch.Generator()
        gen.set_state(s.rng)
        p = int(torch.randint(neumann_steps, (1,), generator=gen))
        with G.tracing(check_finite) as trace, second_order(name):
            zeta = draw(inner_batch, "inner_batch")
            with B.updating():
                g_val, (gy,) = gradient(g, s.xf, s.yf, zeta, argnums=1)
            G.record(_INNER, gy)
            gy, g_val = problem.average(gy, g_val)
            y = s.yf - value_at(lr_y, t, "lr_y") / (t + 1) ** decay_y * gy
            f_val, (fx, fy) = gradient(f, s.xf, y, draw(outer_batch, "outer_batch"))
            G.record(G.OUTER, fx, fy)
            fx, fy, f_val = problem.average(fx, fy, f_val)
            v = fy.to(y.dtype)
            for _ in range(p):                                              # Π (I − η ∇yy g(ζ_k)) ∇y f
                hv = hvp_flat(problem, lx, ly, s.xf, y, v, draw(inner_batch, "inner_batch"))
                G.record(G.LINEAR, hv)
                (hv,) = problem.average(hv)
                v = v - eta * hv
            v = (neumann_steps * eta) * v
            jv = mixed_flat(problem, lx, ly, s.xf, y, v, zeta)
            G.record(G.MIXED, jv)
            (jv,) = problem.average(jv)
        d_x = fx.to(s.xf.dtype) - jv
        x_new = s.xf - value_at(lr_x, t, "lr_x") / (t + 1) ** decay_x * d_x
        if check_finite:
            check_step(name, t, (x_new, y), trace, "the update (step sizes too large: the iterates overflowed)",
                       xf=s.xf, yf=s.yf)
        return reply(TTSAState(x_new, y, gen.get_state(), t + 1, lx, ly), has_aux,
                     lambda: StepInfo(inner_loss=g_val, outer_loss=f_val, hypergrad_norm=norm(d_x)))

    state_dict, load_state_dict = checkpoint(TTSAState, name)
    return Algorithm(init, guarded(TTSAState, body, problem, name), state_dict, load_state_dict, name)
