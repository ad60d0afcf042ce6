"""What a hypergradient's own figures say about it, read with the finite-value check's one
host read: a linear solve that met non-positive curvature or ended worse than it started
(the inner Hessian is indefinite: a deep network with every weight inner), and a
first-order hypergradient that is identically zero (f does not depend on x).

``flags(dx, aux, estimator)`` builds 0-d tensors (no host read); ``act(...)`` turns
the values read into one ``RuntimeWarning`` per run (the names of the warnings given live
in the run's state: the double loop's ``warned``) or an :class:`IndefiniteSystemError`.
``tb.hypergrad`` has no run: Python's registry shows each message once per call site
(three texts: non-positive curvature, a residual that grew, both).
"""
from __future__ import annotations

import warnings
from typing import Dict, Tuple

from torch import Tensor

from . import tree as T
from .estimators import FirstOrder
from .solvers import IndefiniteSystemError, residual_grew

__all__ = ["INDEFINITE", "ZERO_FIRST_ORDER", "flags", "act"]

INDEFINITE = "indefinite"
ZERO_FIRST_ORDER = "zero_first_order"

_NEGATIVE = (
    "the linear solve of the hypergradient met negative (non-positive) curvature: the inner Hessian ∇yy g is "
    "indefinite where it ran (typical when every weight of a deep network is inner), so the implicit-function "
    "formula's assumption fails and the hypergradient may be noise.")
_GREW = (
    "the linear solve of the hypergradient (a fixed-point or Neumann iteration) ended with a larger residual "
    "than it started with: it diverged (an lr above 2/λmax(∇yy g), or an indefinite ∇yy g), so the "
    "hypergradient may be noise.")
_REMEDIES = (
    "  The figures are in aux.solve / info.solve (iterations, residual, nonpositive_curvature).  Remedies: "
    "tb.cg(steps, indefinite='truncate') (stop at the first non-positive curvature, as Newton-CG), "
    "tb.cg(steps, damping=λ) (solve ∇yy g + λI), Gauss-Newton curvature (inner=tb.OutputLoss(outputs, loss, "
    "regularizer) and tb.aid(solver, curvature='gauss_newton')), tb.nystrom(rank, rho), a smaller fixed-point "
    "lr, or a method that differentiates the inner steps (tb.itd).")


def _solve_text(code: float) -> str:
    # code = 1·(non-positive curvature met) + 2·(residual grew)
    code = int(code)
    return " ".join(t for bit, t in ((1, _NEGATIVE), (2, _GREW)) if code & bit) + _REMEDIES


_ZERO_TEXT = (
    "tb.first_order() returned exactly zero: f does not depend on x (x acts on the outer loss only through "
    "the inner solution, as in data reweighting or weight decay), so the first-order hypergradient ∇x f "
    "carries no signal.  Use a method that differentiates through y*(x): tb.itd, tb.aid, tb.pzobo, "
    "tb.fdehbo or tb.f2sa.")


def flags(dx, aux, estimator) -> Dict[str, Tensor]:
    """The checks that apply to this estimate, as 0-d tensors (non-zero = something to say)."""
    out = {}
    if aux.solve is not None:                 # AID's solve, stocBiO's Neumann series
        info = aux.solve               # a code: 1·(non-positive curvature) + 2·(residual grew)
        code = (info.nonpositive_curvature > 0).double()
        code = code + 2 * residual_grew(info, getattr(estimator, "solver", None)).double()
        out[INDEFINITE] = code
    if isinstance(estimator, FirstOrder):
        out[ZERO_FIRST_ORDER] = T.sqnorm(dx) == 0
    return out


def act(values: Dict[str, float], estimator, warned: Tuple[str, ...] = (), stacklevel: int = 3) -> Tuple[str, ...]:
    """Warn (once: names in ``warned`` are skipped) or raise for the checks that fired;
    returns ``warned`` with the names of the warnings given now added."""
    given = tuple(warned)
    if values.get(INDEFINITE):
        text = _solve_text(values[INDEFINITE])
        if getattr(getattr(estimator, "solver", None), "indefinite", "warn") == "raise":
            raise IndefiniteSystemError(text)
        if INDEFINITE not in given:
            warnings.warn(text + "  indefinite='raise' in the solver config makes this an error.", RuntimeWarning,
                          stacklevel=stacklevel)
            given += (INDEFINITE,)
    if values.get(ZERO_FIRST_ORDER) and ZERO_FIRST_ORDER not in given:
        warnings.warn(_ZERO_TEXT, RuntimeWarning, stacklevel=stacklevel)
        given += (ZERO_FIRST_ORDER,)
    return given
