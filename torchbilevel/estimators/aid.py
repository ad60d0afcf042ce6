"""AID-BiO: approximate implicit differentiation (Ji, Yang, Liang 2021, Alg. 1, AID branch).

Solve ∇yy g·v = ∇y f with a linear-system solver (CG or fixed point), then
∇̂Φ = ∇x f − ∇xy g·v   (stocBiO paper eq. (3)).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import tree as T
from ..derivatives import averaged, linearize
from ..guards import LINEAR, MIXED, record
from ..problem import draw
from ..solvers import is_solver, solve
from .base import HypergradAux, outer_grads


class AID(NamedTuple):
    """AID estimator config: ``solver`` is ``tb.cg(...)``, ``tb.fixed_point(...)`` or ``tb.nystrom(...)``;
    ``mode`` picks the mechanism of the products (see :func:`torchbilevel.derivatives.linearize`)."""
    solver: object
    mode: str = "auto"

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        ob, ib = draw(outer_batch, "outer_batch"), draw(inner_batch, "inner_batch")
        fx, fy, fval = outer_grads(problem, x, y, ob)
        lin = averaged(linearize(problem.inner, x, y, ib, self.mode), problem)   # one graph of ∇y g, reused
        v, info = solve(self.solver, lin.hvp, fy, v0)         # (∇yy g + λI)·v = ∇y f
        record(LINEAR, v)
        jv = lin.mixed(v)
        record(MIXED, jv)
        dx = T.sub(fx, jv)                                    # eq. (3)
        return dx, HypergradAux(y, v, fval.detach(), info)

    @property
    def generator(self):
        """The solver's generator (Nyström's coordinates), carried per run by the double loop."""
        return getattr(self.solver, "generator", None)


def aid(solver, mode: str = "auto") -> AID:
    """AID-BiO hypergradient at the given y (Ji, Yang, Liang, ICML 2021, Alg. 1, eq. (3)):
    solve ∇yy g·v = ∇y f with ``solver``, return ∇x f − ∇xy g·v.  Cost: one gradient of
    f, one of g with its graph, ``steps`` Hessian-vector products and one mixed product
    (measured 2.2-2.6 gradient evaluations of g for CG(10) on LeNet, bench/RESULTS.md).
    Warm-start v with ``hg(..., v0=aux.v)``."""
    if not is_solver(solver):
        raise TypeError(f"aid(solver) needs tb.cg(...), tb.fixed_point(...) or tb.nystrom(...), "
                        f"got {type(solver).__name__}")
    if mode not in ("auto", "autograd", "func"):
        raise ValueError(f"mode must be 'auto', 'autograd' or 'func', got {mode!r}")
    return AID(solver, mode)
