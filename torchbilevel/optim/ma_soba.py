"""MA-SOBA (Chen, Xu, Zhang, "Optimal algorithms for stochastic bilevel optimization under
relaxed smoothness conditions", 2023): SOBA whose x step follows a moving average of the
SOBA direction — plain averaging, not recursive momentum, so no evaluation at the previous
iterate is needed.

    y_{t+1} = y_t − β_t ∇y g(x_t, y_t; ζ_t)                                   (as SOBA)
    v_{t+1} = v_t − λ_t (∇yy g(x_t, y_t; ψ_t)·v_t − ∇y f(x_t, y_t; ψ_t))      (as SOBA)
    D_t     = ∇x f(x_t, y_t; ψ_t) − ∇xy g(x_t, y_t; ψ_t)·v_t                   (SOBA's x direction)
    h_t     = momentum·h_{t−1} + (1 − momentum)·D_t,   h_0 = D_0
    x_{t+1} = x_t − α_t h_t

Parametrisation: the paper writes the average with θ_t, the weight of the *new* direction
(h ← (1 − θ)h + θ D, θ small); ``momentum`` here is the weight of the *old* average,
momentum = 1 − θ (0.9 ↔ θ = 0.1), as in heavy-ball/Adam conventions.  ``momentum=0``
is SOBA.  The x step uses the average that includes the current direction (h_t), and
the first step the plain direction (h_0 = D_0: no zero-initialised bias).

Runs on the FMBO engine (:func:`torchbilevel.optim.soba.fresh_single_loop`): the engine
takes the SOBA step for y and v and returns D_t as its η = 1 momentum, then x is stepped
along h_t.  The state is a :class:`torchbilevel.SingleLoopState` whose ``h_f`` holds h_t.

Cost per step: that of SOBA (about 4 gradient evaluations) plus two vector operations.
"""
from __future__ import annotations

import torch

from ..problem import check_unit, in_functorch_transform
from .schedule import value_at
from .single_loop import SingleLoopState
from .soba import _DOC_ARGS, fresh_single_loop


def ma_soba(problem, *, lr_x, lr_y, lr_v, momentum=0.9, backend: str = "auto",
            independent_outer_sample: bool = False, check_finite: bool = True):
    """MA-SOBA: SOBA with a moving average h ← momentum·h + (1 − momentum)·D_x of the x
    direction (momentum = 1 − θ of the paper; a number in [0, 1) or a callable of t).
    """
    momentum = check_unit(momentum, "momentum", allow_schedule=True)
    if not callable(momentum) and momentum >= 1.0:
        raise ValueError(f"momentum must lie in [0, 1) (1 would never move x), got {momentum}")
    name = "ma_soba"
    base, step_at = fresh_single_loop(problem, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, backend=backend,
                                      independent_outer_sample=independent_outer_sample,
                                      check_finite=check_finite, name=name)

    def step(s: SingleLoopState, inner_batch, outer_batch) -> SingleLoopState:
        t = s.step if isinstance(s, SingleLoopState) else 0
        alpha = value_at(lr_x, t, "lr_x")
        new = step_at(s, inner_batch, outer_batch, alpha)   # y, v: SOBA; new.h_f = D_t
        keep = 0.0 if t == 0 else value_at(momentum, t, "momentum", unit=True)
        h = torch.lerp(new.h_f, s.h_f, keep) if keep else new.h_f      # momentum·h + (1−momentum)·D
        x_new = torch.add(s.xf, h, alpha=-alpha)
        if check_finite and not in_functorch_transform() and not bool(torch.isfinite(x_new.float().sum())):
            raise FloatingPointError(f"{name} step {t}: NaN/inf arose in the outer update (step size lr_x too "
                                     "large: x overflowed); the state passed in is unchanged")
        return new._replace(xf=x_new, h_f=h)

    return base._replace(step=step)


ma_soba.__doc__ += _DOC_ARGS
