"""``hypergrad``: the transform that turns a problem and an estimator into a function
computing ∇Φ(x), shaped like ``torch.func.grad``."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from . import buffers as B
from . import guards as G
from . import health as H
from . import randomness as R
from . import sharding as S
from . import tree as T
from .derivatives import second_order
from .features import can_lift, lifted_estimate
from .estimators import ESTIMATOR_NAMES, FirstOrder, HypergradAux, is_estimator
from .problem import check_params, check_problem, in_functorch_transform


def diagnose_nonfinite(dx, aux: HypergradAux) -> str:
    """Name the first stage whose output is non-finite (called only after a failure)."""
    if not bool(T.all_finite(aux.y)):
        return "the inner iterate (inner gradient steps diverged or the inner gradient is NaN/inf)"
    if not bool(T.all_finite({"f": aux.outer_loss})):
        return "the outer objective f (outer gradient)"
    if aux.v is not None and not bool(T.all_finite(aux.v)):
        return "the linear-system solution v (∇yy g·v = ∇y f)"
    return "the hypergradient (outer gradient or mixed product ∇xy g·v)"


def check_hypergradient(dx, aux: HypergradAux, trace=None, finite=None, **inputs) -> None:
    """Raise FloatingPointError naming where NaN/inf arose (one host read when all is finite).

    ``trace``: the :class:`torchbilevel.guards.StageTrace` of the computation (names the
    stage exactly); ``inputs``: dicts to blame first when they hold NaN/inf (e.g. ``x=x``);
    ``finite``: the result of ``T.all_finite(dx)`` when the caller has read it already.
    """
    if in_functorch_transform():
        return
    if not (bool(T.all_finite(dx)) if finite is None else finite):
        where = G.locate(trace, diagnose_nonfinite(dx, aux), **inputs)
        raise FloatingPointError(f"non-finite hypergradient: NaN/inf first appears in {where}; "
                                 "the inputs are unchanged")


def _method_name(estimator) -> str:
    return {"AID": "AID-BiO (tb.aid)", "ITD": "ITD-BiO (tb.itd)", "StocBiO": "stocBiO (tb.stocbio)"}.get(
        type(estimator).__name__, type(estimator).__name__)


def _twice(estimator) -> bool:
    """Does the estimator differentiate g twice (AID, ITD, stocBiO: yes; PZOBO, first-order: no)?"""
    return not (isinstance(estimator, FirstOrder) or getattr(estimator, "perturbs_x", False))


def read_checks(dx, aux: HypergradAux, estimator, check_finite: bool, check_solve: bool, *extra: Tensor):
    """One host read for the finite check and the health checks (:mod:`torchbilevel.health`):
    returns ``(finite or None, {check: fired}, extra values)``; nothing is read (and
    ``(None, {}, ())`` returned) when neither check is on or inside torch.func transforms."""
    if in_functorch_transform():
        return None, {}, ()
    named = H.flags(dx, aux, estimator) if check_solve else {}
    tensors = ([T.all_finite(dx)] if check_finite else []) + list(named.values()) + list(extra)
    if not tensors:
        return None, {}, ()
    values = torch.stack([t.reshape(()).to(torch.float64) for t in tensors]).tolist()
    finite = bool(values.pop(0)) if check_finite else None
    fired = {k: values.pop(0) for k in named}
    return finite, fired, tuple(values)


def hypergrad(problem, estimator, has_aux: bool = False, check_finite: bool = True,
              check_solve: Optional[bool] = None) -> Callable:
    """Return a function computing the hypergradient ∇Φ(x) with ``estimator``.

    Like ``torch.func.grad``, this is a transform::

        hg = tb.hypergrad(problem, tb.aid(tb.cg(steps=20)))
        dx = hg(x, y, inner_batch, outer_batch)            # dict shaped like x
        dx, aux = tb.hypergrad(problem, est, has_aux=True)(x, y, inner_batch, outer_batch, v0=None)

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        estimator: ``tb.aid(...)``, ``tb.itd(...)``, ``tb.stocbio(...)``, ``tb.pzobo(...)`` or
            ``tb.first_order()``.
        has_aux: also return a :class:`HypergradAux` (inner iterate reached, linear-system
            solution, outer loss) for warm starts and logging.
        check_finite: raise FloatingPointError if the result holds NaN/inf, naming the
            stage where it first appeared (inputs, inner iterate, outer gradient, linear
            system, mixed product); one host read per call; skipped inside torch.func
            transforms such as vmap.  ``False`` makes the call free of host reads (for
            ``torch.compile(fullgraph=True)`` and CUDA graphs).
        check_solve: read what the estimate says about itself in the same host read: an
            AID solve that met non-positive curvature or ended with a larger residual than
            it started with (an indefinite inner Hessian) gives a ``RuntimeWarning`` (or
            ``IndefiniteSystemError`` with ``indefinite="raise"`` in the solver config); a
            ``tb.first_order()`` result that is exactly zero (f does not depend on x) gives
            a ``RuntimeWarning``.  The message is fixed, so Python shows it once per call
            site; ``aux.solve`` carries the figures either way (as tensors under vmap).
            Default (None): as ``check_finite``, so ``check_finite=False`` keeps the call
            free of host reads.

    The returned function takes ``(x, y, inner_batch, outer_batch, v0=None)``: x and y are
    dicts of tensors (never modified), the batches are passed to g and f (an iterator is
    drawn from for fresh samples), and ``v0`` warm-starts the linear-system solver.
    With fixed step counts (no solver tolerance) it composes with ``torch.func.vmap``.

    Models in train mode: the call leaves module buffers evaluated through
    :func:`torchbilevel.nn.call` bit-identical (BatchNorm normalises with batch statistics,
    its running statistics do not move), and evaluations compared point against point
    (finite-difference pairs, PZOBO's paths, an ITD step recomputed by ``checkpoint=True``)
    see the same dropout masks (:mod:`torchbilevel.randomness`).  ValueError if g does not
    depend on y (checked once per problem).
    """
    check_problem(problem)
    if not is_estimator(estimator):
        raise TypeError(f"estimator must be {ESTIMATOR_NAMES}, got {type(estimator).__name__}")
    check_solve = check_finite if check_solve is None else bool(check_solve)
    if hasattr(estimator, "check"):
        estimator.check(problem)          # what the config needs of the problem, before any work

    def hypergradient(x: Mapping[str, Tensor], y: Mapping[str, Tensor], inner_batch, outer_batch,
                      v0: Optional[Mapping[str, Tensor]] = None):
        check_params(x, y)
        if hasattr(estimator, "check_inputs"):
            estimator.check_inputs(x, y)
        if S.is_sharded(x, y):
            if _twice(estimator):
                S.refuse(_method_name(estimator), x, y)
            # a sharded model: the estimator on the local shards, the result as DTensors
            inner_batch, outer_batch = problem.check_uses(x, y, inner_batch, outer_batch)
            local, xl, yl, sx, sy = S.localize(problem, x, y)
            dx, aux = hypergrad(local, estimator, has_aux=True, check_finite=check_finite,
                                check_solve=check_solve)(xl, yl, inner_batch, outer_batch)
            dx, aux = S.to_user(dx, sx), aux._replace(y=S.to_user(aux.y, sy))
            return (dx, aux) if has_aux else dx
        if v0 is not None:
            T.check_same_keys(v0, y, "v0 and y")
            for k, t in v0.items():
                if not isinstance(t, Tensor) or t.shape != y[k].shape:
                    raise ValueError(f"v0[{k!r}] must be a tensor shaped like y[{k!r}] {tuple(y[k].shape)}, "
                                     f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        generator = getattr(estimator, "generator", None)
        # a pure transform: module buffers (BatchNorm statistics) untouched, and on failure
        # the random stream (global and the estimator's generator) rewound
        with R.restored_on_error(x, y, generators=(generator,)), B.frozen():
            inner_batch, outer_batch = problem.check_uses(x, y, inner_batch, outer_batch)
            with G.tracing(check_finite) as trace, second_order(_method_name(estimator),
                                                                 math_attention=_twice(estimator)):
                if can_lift(problem, estimator, inner_batch, outer_batch):   # declared features
                    dx, aux = lifted_estimate(problem, estimator, dict(x), dict(y), inner_batch, outer_batch, v0=v0)
                else:
                    dx, aux = estimator.estimate(problem, dict(x), dict(y), inner_batch, outer_batch, v0=v0)
            finite, fired, _ = read_checks(dx, aux, estimator, check_finite, check_solve)
            if check_finite:
                check_hypergradient(dx, aux, trace, finite=finite, x=x, y=y, v0=v0)
            H.act(fired, estimator)
        return (dx, aux) if has_aux else dx

    hypergradient.__doc__ = f"Hypergradient of {problem!r} by {estimator!r}."
    return hypergradient
