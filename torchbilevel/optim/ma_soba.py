"""MA-SOBA (Xuxing Chen, Tesi Xiao, Krishnakumar Balasubramanian, "Optimal algorithms for
stochastic bilevel optimization under relaxed smoothness conditions", arXiv 2306.12067,
2023; JMLR 2024): SOBA whose x step follows a moving average of the SOBA direction —
plain averaging, not recursive momentum, so no evaluation at the previous iterate is
needed.  Its Algorithm 1 (the paper's z is our v; its v solves ∇yy g·z = ∇y f as ours):

    y_{k+1} = y_k − β_k ∇y g(x_k, y_k; ζ_k)                                   (as SOBA)
    v_{k+1} = v_k − γ_k (∇yy g(x_k, y_k; ψ_k)·v_k − ∇y f(x_k, y_k; ψ_k))      (as SOBA)
    x_{k+1} = x_k − α_k h_k                                                   x steps along the average so far
    h_{k+1} = (1 − θ_k) h_k + θ_k D_k,   D_k = ∇x f(x_k, y_k; ψ_k) − ∇xy g(x_k, y_k; ψ_k)·v_k

x moves along h_k, the average of D_0..D_{k−1} (h_0 = D_0 here: the paper leaves h_0 to the
user, and D_0 gives a first step equal to SOBA's rather than none), and D_k enters the
average after the step.  ``order="current"`` is the other convention, x_{k+1} = x_k − α_k h_{k+1}
with h_{k+1} already holding D_k (as an exponential-moving-average optimiser does; this
library's MA-SOBA before issue 19); with ``momentum=0`` it is SOBA.

Parametrisation: the paper writes the average with θ_k, the weight of the *new* direction;
``momentum`` here is the weight of the *old* average, momentum = 1 − θ (0.9 ↔ θ = 0.1), as
in heavy-ball/Adam conventions.  ``radius`` optionally projects v on the ball of radius r
after its step (as FdeHBO's Alg. 1 line 6; default ∞, none).

Runs on the FMBO engine (:func:`torchbilevel.optim.soba.fresh_single_loop`): the engine
takes the SOBA step for y and v and returns D_k as its η = 1 momentum, then x is stepped
along h.  The state is a :class:`torchbilevel.SingleLoopState` whose ``h_f`` holds the
direction of the next x step (h_{k+1}).

Cost per step: that of SOBA (about 4 gradient evaluations) plus two vector operations.
"""
from __future__ import annotations

import torch

from ..problem import check_unit, in_functorch_transform
from .schedule import value_at
from . import donation as D
from .single_loop import SingleLoopState
from .step_info import norm, reply
from .soba import _DOC_ARGS, fresh_single_loop

ORDERS = ("paper", "current")


def ma_soba(problem, *, lr_x, lr_y, lr_v, momentum=0.9, order: str = "paper", radius=float("inf"),
            backend: str = "auto", independent_outer_sample: bool = False, check_finite: bool = True):
    """MA-SOBA (Chen, Xiao, Balasubramanian 2023, Alg. 1): SOBA with the x step along a
    moving average h ← momentum·h + (1 − momentum)·D_x of the x direction (momentum = 1 − θ
    of the paper; a number in [0, 1) or a callable of t).  ``order``: ``"paper"`` (x steps
    along h_k, then D_k enters the average) or ``"current"`` (the average includes D_k
    before the step).  ``radius``: projection of v on a ball (default ∞, none).

    ``step(state, inner_batch, outer_batch, has_aux=True)`` returns ``(state,``
    :class:`torchbilevel.StepInfo` ``)``: as SOBA's (g(x_t, y_t; ζ_t), f(x_t, y_t; ψ_t),
    ‖w_{t+1}‖, whether the projection on the ball bound), with ``hypergrad_norm`` the norm
    of the average x moves along (h_k, or h_{k+1} with ``order="current"``).
    """
    momentum = check_unit(momentum, "momentum", allow_schedule=True)
    if not callable(momentum) and momentum >= 1.0:
        raise ValueError(f"momentum must lie in [0, 1) (1 would never move x), got {momentum}")
    if order not in ORDERS:
        raise ValueError(f"order must be 'paper' or 'current', got {order!r}")
    lagged = order == "paper"
    name = "ma_soba"
    base, step_at = fresh_single_loop(problem, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, backend=backend,
                                      independent_outer_sample=independent_outer_sample,
                                      check_finite=check_finite, name=name, radius=radius)

    def step(s: SingleLoopState, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        # (its x update reads the old average h_f after the engine's step: donate=True refused)
        D.check(donate, name, s)
        t = s.step if isinstance(s, SingleLoopState) else 0
        alpha = value_at(lr_x, t, "lr_x")
        new = step_at(s, inner_batch, outer_batch, alpha, has_aux)   # y, v: SOBA; new.h_f = D_t
        new, info = new if has_aux else (new, None)
        d = new.h_f
        keep = 0.0 if t == 0 else value_at(momentum, t, "momentum", unit=True)
        avg = lambda h: torch.lerp(d, h, keep) if keep else d        # momentum·h + (1−momentum)·D
        if lagged:
            h_now = d if t == 0 else s.h_f                            # h_0 = D_0
            h_next = avg(h_now)
        else:
            h_now = h_next = avg(s.h_f)
        x_new = torch.add(s.xf, h_now, alpha=-alpha)
        if check_finite and not in_functorch_transform() and not bool(torch.isfinite(x_new.float().sum())):
            raise FloatingPointError(f"{name} step {t}: NaN/inf arose in the outer update (step size lr_x too "
                                     "large: x overflowed); the state passed in is unchanged")
        return reply(new._replace(xf=x_new, h_f=h_next), has_aux,
                     lambda: info._replace(hypergrad_norm=norm(h_now, new.layout_x)))

    return base._replace(step=step)


ma_soba.__doc__ += _DOC_ARGS
