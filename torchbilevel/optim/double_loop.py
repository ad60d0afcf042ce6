"""Double-loop bilevel optimisation (Ji, Yang, Liang 2021, Alg. 1 and 2): D warm-started
inner (S)GD steps, then a hypergradient estimate and one outer step.

    y_k^0 = y_{k-1}^D;  y^t = y^{t-1} − β ∇y g(x_k, y^{t-1}; S_{t-1})   (Alg. 1 l. 3-5, Alg. 2 l. 3-6)
    x_{k+1} = x_k − α ∇̂Φ(x_k)                                            (Alg. 1 l. 8, Alg. 2 l. 13)

AID and stocBiO warm-start the linear-system solution too (v_k^0 = v_{k-1}^N).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import sharding as S
from .. import tree as T
from ..estimators.base import unroll
from ..features import shared_features
from ..estimators import AID, ESTIMATOR_NAMES, FirstOrder, is_estimator
from .. import health as H
from ..hypergrad import hypergrad, read_checks
from ..problem import check_params, check_positive, check_problem, check_steps, draw, in_functorch_transform
from . import donation as D
from .algorithm import Algorithm
from .outer import OUTER_RULES, OuterState, outer_init, outer_update
from .schedule import value_at
from .step_info import StepInfo, reply, tree_norm


class DoubleLoopState(NamedTuple):
    """x, y: current outer and inner parameters (dicts); v: the warm start of the linear
    system (AID) or None; outer: the outer rule's state; step: steps taken so far;
    generator: the state of the estimator's ``generator`` (PZOBO's directions) for this run,
    or None — set into the generator before each step and read back after it, so that two
    runs on one algorithm object draw as they would alone;
    warned: the names of the warnings this run has given (:mod:`torchbilevel.health`:
    an indefinite linear solve, an identically-zero first-order hypergradient), each
    given once per run."""
    x: T.Tree
    y: T.Tree
    v: Optional[T.Tree]
    outer: OuterState
    step: int
    generator: Optional[Tensor] = None
    warned: Tuple[str, ...] = ()


def double_loop(problem, estimator, lr_x=0.1, inner_steps: int = 5, lr_y=0.1, *,
                outer: str = "sgd", betas=(0.9, 0.999), eps: float = 1e-8,
                warm_start_v: bool = True, check_finite: bool = True, check_solve: Optional[bool] = None) -> Algorithm:
    """AID-BiO, ITD-BiO, stocBiO and PZOBO(-S) as a double loop with warm starts.

    Papers: Ji, Yang, Liang, ICML 2021, Alg. 1 (AID-BiO, ITD-BiO) and Alg. 2 (stocBiO);
    Sow, Ji, Liang, NeurIPS 2022, Alg. 1 (PZOBO, PZOBO-S). Each step k: ``inner_steps``
    warm-started gradient steps y ← y − β∇y g, then x ← x − α·(the estimator's
    hypergradient). Cost per step: ``inner_steps`` y-gradients of g plus one estimate
    (see the estimator's docstring for its cost).

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        estimator: ``tb.aid(...)``, ``tb.itd(...)``, ``tb.stocbio(...)``, ``tb.pzobo(...)`` or
            ``tb.first_order()``.
        lr_x: outer step size α (number or callable of the step k).
        inner_steps: D, warm-started inner gradient steps before each estimate (0 allowed:
            ITD and PZOBO run their own ``steps`` inner steps inside the estimate, and their
            final inner iterate is the next warm start).
        lr_y: inner step size β (number or callable of k).
        outer: ``"sgd"`` (the papers' update) or ``"adam"``.
        betas, eps: Adam's parameters.
        warm_start_v: start each linear solve from the previous solution (Alg. 1, AID 1)).
        check_finite: raise FloatingPointError (state untouched) if a step produces NaN/inf,
            naming the stage (inner gradient steps, outer gradient, linear system, mixed
            product, outer update); one host read per step.  ``init`` then also rejects
            non-finite x, y.
        check_solve: in the same host read, what the estimate says about itself
            (:func:`torchbilevel.hypergrad`'s ``check_solve``): one ``RuntimeWarning`` per run
            when an AID solve met non-positive curvature or ended worse than it started
            (``IndefiniteSystemError`` with ``indefinite="raise"``, the state untouched), and
            when ``tb.first_order()`` is identically zero; the run's ``state.warned`` records it.
            Default (None): as ``check_finite`` (``False`` keeps the step free of host reads).

    ``state, info = algo.step(state, inner_batch, outer_batch, has_aux=True)`` also returns
    a :class:`torchbilevel.StepInfo` from the estimate (no extra evaluation): ``outer_loss``
    f(x_k, y; ·) at the inner iterate the estimate used (``aux.outer_loss``), ``inner_loss``
    the estimator's ``aux.inner_loss`` (stocBiO: g at that y on its first inner sample;
    None for estimators that do not report one), ``hypergrad_norm`` ‖∇̂Φ(x_k)‖ of the
    estimate *before* the outer rule (SGD: the direction x moves along; Adam: its input),
    ``solve`` the linear solve's :class:`torchbilevel.solvers.SolveInfo` (``tb.aid``).

    Each call of ``step`` draws ``inner_steps`` inner batches (when ``inner_batch`` is an
    iterator) and what the estimator needs.  Models in train mode: BatchNorm running
    statistics (through :func:`torchbilevel.nn.call`) move exactly once per inner step,
    never from the hypergradient's products or paths; each inner step draws fresh dropout
    masks, as training does.
    """
    check_problem(problem)
    if not is_estimator(estimator):
        raise TypeError(f"estimator must be {ESTIMATOR_NAMES}, got {type(estimator).__name__}")
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    inner_steps = check_steps(inner_steps, "inner_steps", minimum=0)
    if outer not in OUTER_RULES:
        raise ValueError(f"outer must be one of {OUTER_RULES}, got {outer!r}")
    check_positive(eps, "eps")
    check_solve = check_finite if check_solve is None else bool(check_solve)
    hg = hypergrad(problem, estimator, has_aux=True, check_finite=False, check_solve=False)
    generator = getattr(estimator, "generator", None)

    def init(x, y) -> DoubleLoopState:
        check_params(x, y)
        if not (isinstance(estimator, FirstOrder) or getattr(estimator, "perturbs_x", False)):   # gradient-only
            S.refuse(f"double_loop({type(estimator).__name__})", x, y)
        if check_finite and not in_functorch_transform():
            bad = G.check_inputs(x=x, y=y)
            if bad is not None:
                raise FloatingPointError(f"init: {bad} holds NaN/inf")
        return DoubleLoopState(T.clone(x), T.clone(y), None, outer_init(outer, x), 0,
                               None if generator is None else generator.get_state())

    def step(state: DoubleLoopState, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        """One outer step: ``inner_steps`` warm-started inner steps, a hypergradient, an outer
        update.  Returns the new state (with ``has_aux``: ``(state, StepInfo)``); a
        FloatingPointError leaves ``state`` and the random stream (global and the
        estimator's generator) as they were.  ``donate=True`` is refused (ValueError: no
        in-place update here; see :mod:`torchbilevel.optim.donation`)."""
        if not isinstance(state, DoubleLoopState):
            raise TypeError(f"state must come from init(), got {type(state).__name__}")
        D.check(donate, "double_loop", state)
        if generator is not None and state.generator is not None:
            generator.set_state(state.generator)      # this run's directions stream
        with R.restored_on_error(state.x, generators=(generator,)), B.transaction():
            inner_batch, outer_batch = problem.check_uses(state.x, state.y, inner_batch, outer_batch)
            if S.is_sharded(state.x, state.y):
                # a sharded model: the step on the local shards, the new state as DTensors
                local, xl, yl, sx, sy = S.localize(problem, state.x, state.y)
                hg_l = hypergrad(local, estimator, has_aux=True, check_finite=False, check_solve=False)
                new, info = _step(state._replace(x=xl, y=yl), inner_batch, outer_batch, local, hg_l, sx)
                new = new._replace(x=S.to_user(new.x, sx), y=S.to_user(new.y, sy))
            else:
                new, info = _step(state, inner_batch, outer_batch, problem, hg)
        new = new if generator is None else new._replace(generator=generator.get_state())
        return reply(new, has_aux, info)

    def _step(state: DoubleLoopState, inner_batch, outer_batch, problem, hg, spec_x=None):
        """(new state, a function giving its StepInfo: called only with has_aux)."""
        k = state.step
        beta = value_at(lr_y, k, "lr_y")
        x, y = state.x, state.y
        with G.tracing(check_finite) as trace, shared_features(problem, estimator, x, inner_batch, outer_batch):
            with B.updating():         # running statistics move once per inner step, as in training
                # warm-started inner steps; data parallel: one all-reduce per step; declared
                # features: phi once per distinct batch, then head-only steps
                y = unroll(problem, x, y, [draw(inner_batch, "inner_batch") for _ in range(inner_steps)], beta,
                           differentiable=False)
            if inner_steps:
                G.record(G.INNER, y)
            v0 = state.v if (warm_start_v and isinstance(estimator, AID)) else None
            dx, aux = hg(x, y, inner_batch, outer_batch, v0=v0)
            x_new, opt = outer_update(outer, state.outer, x, dx, value_at(lr_x, k, "lr_x"), betas, eps)
            G.record(G.UPDATE, x_new, opt.m, opt.v)
        # one host read: the fused finite check (x_new carries dx; aux.y, aux.v, the Adam
        # moments are the rest of the new state) and what the estimate says about itself
        finite = T.all_finite(x_new, aux.y, *(t for t in (aux.v, opt.m, opt.v) if t is not None))
        _, fired, read = read_checks(dx, aux, estimator, False, check_solve, *([finite] if check_finite else []))
        if check_finite and read:
            if not read[0]:
                where = G.locate(trace, "the hypergradient", **{"state.x": state.x, "state.y": state.y,
                                                                  "state.v": state.v})
                raise FloatingPointError(f"double_loop step {k}: non-finite values (NaN/inf) first appear in "
                                         f"{where}; the state passed in is unchanged")
        warned = H.act(fired, estimator, state.warned, stacklevel=4)
        v_new = {kk: t.detach() for kk, t in aux.v.items()} if aux.v is not None else None
        return DoubleLoopState(x_new, aux.y, v_new, opt, k + 1, warned=warned), lambda: StepInfo(
            inner_loss=aux.inner_loss, outer_loss=aux.outer_loss, hypergrad_norm=tree_norm(dx, spec_x),
            solve=aux.solve)

    def state_dict(state: DoubleLoopState) -> dict:
        # plain dicts, tensors and ints only: torch.load(weights_only=True) reads it back
        d = {"algorithm": "double_loop", "x": state.x, "y": state.y, "v": state.v,
             "outer": state.outer._asdict(), "step": state.step, "warned": list(state.warned)}
        if generator is not None:
            d["generator"] = state.generator if state.generator is not None else generator.get_state()
        return d

    def load_state_dict(d: dict) -> DoubleLoopState:
        if not isinstance(d, dict) or d.get("algorithm") != "double_loop":
            raise ValueError("not a double_loop checkpoint (expected the dict of state_dict())")
        if generator is not None and "generator" in d:
            generator.set_state(d["generator"])
        return DoubleLoopState(d["x"], d["y"], d["v"], OuterState(**d["outer"]), d["step"],
                               d.get("generator") if generator is not None else None,
                               tuple(d.get("warned", ())))

    return Algorithm(init, step, state_dict, load_state_dict, f"double_loop({type(estimator).__name__})")
