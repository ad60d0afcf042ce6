"""F2SA (Kwon, Kwon, Wright, Nowak, "A fully first-order method for stochastic bilevel
optimization", ICML 2023, Algorithm 1): no second-order products.  The bilevel problem is
replaced by the penalty  L_λ(x, y) = f(x, y) + λ (g(x, y) − min_z g(x, z)),  whose
minimiser over y, y_λ*(x), approaches y*(x) as λ grows, and whose gradient in x approaches
∇Φ(x) with an O(1/λ) bias:

    ∇x L_λ = ∇x f(x, y_λ*) + λ (∇x g(x, y_λ*) − ∇x g(x, y*)).

Algorithm 1, outer step k (λ_k, the step sizes and x_k fixed during the inner loop):

    for t = 0..T−1 (y_{k,0} = y_k, z_{k,0} = z_k):
        z_{k,t+1} = z_{k,t} − γ_k ∇y g(x_k, z_{k,t}; φ_z)                        z tracks y*(x_k)
        y_{k,t+1} = y_{k,t} − α_k (∇y f(x_k, y_{k,t}; ζ_y) + λ_k ∇y g(x_k, y_{k,t}; φ_y))   y tracks y_λ*(x_k)
    y_{k+1} = y_{k,T},  z_{k+1} = z_{k,T}
    x_{k+1} = x_k − ξα_k (∇x f(x_k, y_{k+1}; ζ_x) + λ_k (∇x g(x_k, y_{k+1}; φ_x) − ∇x g(x_k, z_{k+1}; φ_x)))
    λ_{k+1} = λ_k + δ_k

so x moves at the *new* y and z.  Step sizes: ``lr_z`` = γ_k; ``lr_x`` = ξα_k; ``lr_y`` = β_k
with α_k = β_k / λ_k, i.e. the y step is written β_k (∇y g + ∇y f / λ_k), the gradient of
(f + λg)/λ: ``lr_y`` is a step size on the scale of g — stable for the same values as
``lr_z`` whatever λ — and the penalty can grow without retuning it.

The multiplier, ``penalty_schedule``:

* ``"paper"`` (default): λ_k = λ_0 (1 + k)^p.  The paper couples λ_k to its step sizes,
  λ_k ∝ γ_k/α_k, with α_k ∝ k^(−a), γ_k ∝ k^(−c); for noise in both levels a = 5/7,
  c = 4/7, so p = a − c = 1/7 (the default ``penalty_growth``); δ_k = λ_{k+1} − λ_k.  A
  larger p (up to 1) removes the O(1/λ) bias faster when the steps are constant.
* ``"benchmark_bilevel"``: benchmark_bilevel's F2SA rule, additive, λ_{k+1} = λ_k + δ/(k+1)^{1/7}
  (δ = ``penalty_step``, default 0.1; its λ_0 = 1, the default ``penalty`` here).  λ then
  grows as (7/6)δ k^{6/7}: at k = 10^4, 314 from λ_0 = 1 against 37 for 10(1 + k)^{1/7}.
  Its y step is lr_inner·(λ∇y g + ∇y f): ``lr_y`` = λ_k·lr_inner reproduces it.
* a callable k -> λ_k.

Samples (common random numbers): each inner step draws one inner sample φ_t, which serves
both the z and the y step (one random stream: the same dropout masks), and ζ_y
(``outer_batch``); the x step draws φ_x (inner) and ζ_x (outer), in that order (iterators;
any other batch is a full batch).  The two evaluations of ∇x g at (x, y_{k+1}) and
(x, z_{k+1}) share φ_x and replay one random stream, as in the paper: λ(∇x g(x, y; φ) −
∇x g(x, z; φ)) is then a difference of nearby points on one sample, whose noise is
O(λ‖y − z‖), not O(λ) as with independent samples (benchmark_bilevel's F2SA draws them
independently).  The paper draws φ_z and φ_y independently (``shared_inner_sample=False``);
sharing them correlates the noise of y and z, so that y − z, which the x direction
multiplies by λ, carries less of it: on the acceptance quadratic with minibatches of 64
(1500 steps, lr = lr_y = lr_z = 5 lr_x) the final ‖∇Φ‖²/‖∇Φ(x_0)‖² is 3.3e-4 / 5.6e-6 /
7.8e-6 (lr 0.03 / 0.1 / 0.3) shared against 1.4e-3 / 4.7e-3 / 0.10 independent.
Running statistics (BatchNorm) move once per inner step, at the y gradient of g.

Cost per outer step: T·(two y-gradients of g, one of f) + two x-gradients of g and one of
f — 3T + 3 gradient evaluations, no products; data parallel: one all-reduce per inner step
and one for the x step (T + 1).
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
from ..problem import check_positive, check_problem, check_steps, draw
from ._flat import add_into, check_step, checkpoint, guarded, init_flat, view, views_fn
from . import donation as D
from .algorithm import Algorithm
from .schedule import value_at
from .step_info import StepInfo, norm, reply

_PATH = "the inner loop's gradients ∇y g at y and z"
_FY = "the outer gradient ∇y f (inner loop)"
_G = "the inner gradients ∇x g at (x, y) and (x, z)"
_F = "the outer gradient ∇x f"
_OVERFLOW = "the update (step sizes too large or the penalty λ too large: the iterates overflowed)"
SCHEDULES = ("paper", "benchmark_bilevel")
BENCHMARK_EXPONENT = 1.0 / 7.0     # benchmark_bilevel's decay of the λ increment


class F2SAState(NamedTuple):
    """State of F2SA in flat buffers: ``xf``; ``yf`` (the penalised inner iterate, tracks
    argmin f/λ + g); ``zf`` (tracks argmin g); ``step`` k; the dict layouts; ``lam``, the
    multiplier λ_k the next step uses (a float).  ``state.x``, ``state.y``, ``state.z`` are
    dicts."""
    xf: Tensor
    yf: Tensor
    zf: Tensor
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled
    lam: float

    x = view("xf", "layout_x", "x as a dict (views of the flat buffer)")
    y = view("yf", "layout_y", "y as a dict (views of the flat buffer)")
    z = view("zf", "layout_y", "z as a dict (views of the flat buffer)")


def f2sa(problem, *, lr_x, lr_y, lr_z, inner_steps: int = 10, penalty=None,
         penalty_growth: float = 1.0 / 7.0, penalty_schedule: str = "paper", penalty_step=None,
         shared_inner_sample: bool = True, check_finite: bool = True) -> Algorithm:
    """F2SA (Kwon et al., ICML 2023, Algorithm 1), fully first order: T steps on y and z,
    then x at the new y and z.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_z: step sizes ξα (x), β = αλ (y, on the scale of g: see the module
            docstring), γ (z); numbers > 0 or callables of the outer step k.
        inner_steps: T ≥ 1, steps on y and z per outer step (default 10, benchmark_bilevel's
            ``n_inner_steps``; T = 1 is a single loop).
        penalty: λ_0 (> 0), or a callable k -> λ_k (then ``penalty_growth`` and
            ``penalty_schedule`` are unused).  Default 10 (``"paper"``) or 1
            (``"benchmark_bilevel"``, its ``lmbda0``).  The bias of the x direction is
            O(1/λ): larger is more accurate, and stable because y's step does not scale with λ.
        penalty_growth: exponent p ≥ 0 of λ_k = λ_0 (1 + k)^p (``"paper"``); default 1/7,
            the paper's a − c for noise in both levels.
        penalty_schedule: ``"paper"`` (λ_k = λ_0 (1 + k)^p) or ``"benchmark_bilevel"``
            (λ_{k+1} = λ_k + δ/(k + 1)^{1/7}).
        penalty_step: δ of ``"benchmark_bilevel"`` (> 0; default 0.1, its ``delta_lmbda``).
        shared_inner_sample: one inner sample φ_t (and one random stream) for the z and the
            y step of each inner step (default), or the paper's independent φ_z, φ_y (False);
            see the module docstring.
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    ``init(x, y, z=None)`` starts z at y unless given.  Returns an
    :class:`torchbilevel.Algorithm`; ``state.lam`` is the λ of the next step.
    ``step(..., has_aux=True)`` returns ``(state,`` :class:`torchbilevel.StepInfo` ``)``
    from the x step's evaluations: ``inner_loss`` g(x_k, z_{k+1}; φ_x) (z tracks y*(x_k)),
    ``outer_loss`` f(x_k, y_{k+1}; ζ_x), ``hypergrad_norm`` ‖∇x f + λ_k(∇x g(y_{k+1}) −
    ∇x g(z_{k+1}))‖, ``multiplier`` λ_k; data parallel and sharded: means over ranks.
    ``step(..., donate=True)`` moves x, y and z in the old state's buffers (bitwise the same
    numbers; the step adds 2.2x the parameter bytes above its state either way, the donated
    step 2.5x instead of 4.5x when y is the whole model; :mod:`torchbilevel.optim.donation`).
    """
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_z = check_positive(lr_z, "lr_z", allow_schedule=True)
    inner_steps = check_steps(inner_steps, "inner_steps")
    if penalty_schedule not in SCHEDULES:
        raise ValueError(f"penalty_schedule must be 'paper' or 'benchmark_bilevel', got {penalty_schedule!r}")
    additive = penalty_schedule == "benchmark_bilevel"
    if penalty is None:
        penalty = 1.0 if additive else 10.0
    penalty = check_positive(penalty, "penalty", allow_schedule=True)
    if additive and callable(penalty):
        raise ValueError("penalty must be a number (λ_0) with penalty_schedule='benchmark_bilevel'; "
                         "a callable penalty is its own schedule (leave penalty_schedule='paper')")
    if penalty_step is None:
        penalty_step = 0.1
    elif not additive:
        raise ValueError("penalty_step is the additive increment of penalty_schedule='benchmark_bilevel'; "
                         "the 'paper' schedule grows λ by penalty_growth")
    penalty_step = check_positive(penalty_step, "penalty_step")
    if not isinstance(shared_inner_sample, bool):
        raise TypeError(f"shared_inner_sample must be True or False, got {shared_inner_sample!r}")
    if isinstance(penalty_growth, bool) or not isinstance(penalty_growth, (int, float)):
        raise TypeError(f"penalty_growth must be a number >= 0, got {penalty_growth!r}")
    if not (0.0 <= penalty_growth < float("inf")):
        raise ValueError(f"penalty_growth must be a finite number >= 0, got {penalty_growth}")
    penalty_growth = float(penalty_growth)
    name = "f2sa"

    def lam_at(k: int, previous: float) -> float:
        """λ_k (``previous`` = λ_{k−1}, used by the additive rule only)."""
        if callable(penalty):
            return value_at(penalty, k, "penalty")
        if additive:
            return penalty if k == 0 else previous + penalty_step / float(k) ** BENCHMARK_EXPONENT
        return penalty * (1.0 + k) ** penalty_growth

    def init(x, y, z=None) -> F2SAState:
        """Initial state from dicts x, y (and z, default y); copies them."""
        xf, yf, lx, ly = init_flat(name, x, y, check_finite, sharded=True)   # gradients only: runs sharded
        if z is None:
            zf = yf.clone()
        else:
            T.check_same_keys(z, y, "z and y")
            zf = T.ravel_like(ly, z).to(yf.dtype).clone()
        return F2SAState(xf, yf, zf, 0, lx, ly, lam_at(0, 0.0))

    def body(s: F2SAState, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        """One outer step.  Lean: the objectives are differentiated at the dict views of the
        flat buffers, so each gradient arrives key by key (never concatenated); y and z move
        in place (on copies unless ``donate``), key by key, and the x direction is formed in
        the gradients it consumes, each freed as soon as it is used (the same operations as
        out of place: bitwise the same numbers)."""
        k = s.step
        lx, ly = s.layout_x, s.layout_y
        g, f = views_fn(problem.inner, lx, ly), views_fn(problem.outer, lx, ly)
        lam = s.lam
        gamma, beta = value_at(lr_z, k, "lr_z"), value_at(lr_y, k, "lr_y")
        xf = s.xf
        if donate:
            D.take(s)
            yf, zf = s.yf, s.zf
        else:
            yf, zf = s.yf.clone(), s.zf.clone()
        xv, yv, zv = lx.unravel(xf), ly.unravel(yf), ly.unravel(zf)
        with G.tracing(check_finite) as trace:
            for _ in range(inner_steps):                          # Alg. 1, inner loop
                phi_z = draw(inner_batch, "inner_batch")
                phi_y = phi_z if shared_inner_sample else draw(inner_batch, "inner_batch")
                zeta_y = draw(outer_batch, "outer_batch")

                def at_y(phi_y=phi_y):
                    with B.updating():    # running statistics move once per inner step, here
                        return gradient(g, xv, yv, phi_y, argnums=1)[1][0]
                at_z = lambda phi_z=phi_z: gradient(g, xv, zv, phi_z, argnums=1)[1][0]
                if shared_inner_sample:   # one sample: one random stream at y and z
                    gy, gz = R.replaying(R.capture(xf), [at_y, at_z])
                else:
                    gz, gy = at_z(), at_y()
                G.record(_PATH, gz, gy)
                if problem.reduce is None:    # z moves at once: ∇y g at z is freed before f's evaluation
                    add_into(zv, gz, -gamma)
                    del gz
                fy = gradient(f, xv, yv, zeta_y, argnums=1)[1][0]   # (zero where f ignores y)
                G.record(_FY, fy)
                if problem.reduce is not None:
                    gz, gy, fy = problem.average(gz, gy, fy)      # one all-reduce per inner step
                    add_into(zv, gz, -gamma)
                    del gz
                add_into(yv, add_into(gy, fy, 1.0 / lam), -beta)
                del gy, fy
            phi_x, zeta_x = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")
            # one sample φ_x, one random stream at (x, y_{k+1}) and (x, z_{k+1}); x-gradients only
            # (zero where g or f ignores x)
            gx_y, (g_z, (gx_z,)) = R.replaying(R.capture(xf), [lambda: gradient(g, xv, yv, phi_x, argnums=0)[1][0],
                                                               lambda: gradient(g, xv, zv, phi_x, argnums=0)])
            G.record(_G, gx_y, gx_z)
            diff = add_into(gx_y, gx_z, -1.0)          # ∇x g(x, y_{k+1}) − ∇x g(x, z_{k+1}), gx_z freed
            del gx_z, gx_y
            f_val, (fx,) = gradient(f, xv, yv, zeta_x, argnums=0)
            G.record(_F, fx)
        diff, fx, g_z, f_val = problem.average(diff, fx, g_z, f_val)   # one all-reduce
        d_x = add_into(fx, diff, lam)                   # ∇x L_λ = ∇x f + λ(∇x g(y) − ∇x g(z))
        del diff
        x_new = xf if donate else xf.clone()
        add_into(lx.unravel(x_new), d_x, -value_at(lr_x, k, "lr_x"))
        if check_finite:
            if donate:
                check_step(name, k, (x_new, yf, zf), trace, _OVERFLOW, donated=True)
            else:
                check_step(name, k, (x_new, yf, zf), trace, _OVERFLOW, xf=s.xf, yf=s.yf, zf=s.zf)
        f = D.fresh
        return reply(F2SAState(f(x_new), f(yf), f(zf), k + 1, lx, ly, lam_at(k + 1, lam)), has_aux, lambda: StepInfo(
            inner_loss=g_z, outer_loss=f_val, hypergrad_norm=norm(T.ravel_like(lx, d_x), lx),
            multiplier=torch.tensor(lam, dtype=torch.float64 if xf.dtype == torch.float64 else torch.float32,
                                    device=xf.device)))

    state_dict, load_state_dict = checkpoint(F2SAState, name)
    return Algorithm(init, guarded(F2SAState, body, problem, name), state_dict, load_state_dict, name)
