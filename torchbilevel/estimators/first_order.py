"""First-order baseline: the partial gradient ∇x f(x, y) at the given y, with the implicit
term ∇x y*(x)ᵀ ∇y f dropped (the first-order approximation of DARTS, Liu, Simonyan, Yang,
ICLR 2019, eq. (7) with ξ = 0; FOMAML in meta-learning).

    ∇̂Φ = ∇x f(x, y)

It is what the hypergradient reduces to when the outer loss does not see the inner
solution's dependence on x, and the reference against which the other estimators'
implicit terms are worth their cost.
"""
from __future__ import annotations

from typing import NamedTuple

from ..problem import draw
from .base import HypergradAux, outer_grads


class FirstOrder(NamedTuple):
    """First-order estimator config (no fields; see :func:`first_order`)."""

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        fx, _, fval = outer_grads(problem, x, y, draw(outer_batch, "outer_batch"))
        return fx, HypergradAux(y, None, fval.detach())


def first_order() -> FirstOrder:
    """First-order baseline hypergradient: ∇x f(x, y) at the given y, the implicit term
    dropped (DARTS' first-order approximation).  Cost: one gradient of f; g is never
    evaluated (``double_loop``'s inner steps still train y).  Biased whenever the inner
    solution depends on x: use it as the baseline the other estimators must beat."""
    return FirstOrder()
