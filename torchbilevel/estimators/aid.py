"""AID-BiO: approximate implicit differentiation (Ji, Yang, Liang 2021, Alg. 1, AID branch).

Solve ∇yy g·v = ∇y f with a linear-system solver (CG or fixed point), then
∇̂Φ = ∇x f − ∇xy g·v   (stocBiO paper eq. (3)).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import tree as T
from ..derivatives import averaged, gauss_newton_linearize, linearize
from ..guards import LINEAR, MIXED, record
from ..output_loss import OutputLoss
from ..problem import draw
from ..solvers import is_solver, solve
from .base import HypergradAux, outer_grads


class AID(NamedTuple):
    """AID estimator config: ``solver`` is ``tb.cg(...)``, ``tb.fixed_point(...)`` or ``tb.nystrom(...)``;
    ``mode`` picks the mechanism of the products (see :func:`torchbilevel.derivatives.linearize`);
    ``curvature`` is ``"hessian"`` (∇yy g) or ``"gauss_newton"`` (G, for an inner
    :class:`torchbilevel.OutputLoss`)."""
    solver: object
    mode: str = "auto"
    curvature: str = "hessian"

    def check(self, problem) -> None:
        """ValueError before any work when the problem lacks what this config needs."""
        if self.curvature == "gauss_newton":
            if not isinstance(problem.inner_fn, OutputLoss):
                raise ValueError("curvature='gauss_newton' needs the inner objective declared as "
                                 "tb.OutputLoss(outputs, loss, regularizer): which function gives the network's "
                                 f"outputs and which convex loss of them g is; got {type(problem.inner_fn).__name__}")
            if problem.features is not None:
                raise ValueError("curvature='gauss_newton' with declared features is not supported: declare "
                                 "the outputs as a function of (x, y, batch) instead (features=None)")

    def check_inputs(self, x, y) -> None:
        """ValueError before any work when the inputs do not fit this config (Nyström's rank)."""
        dim = sum(t.numel() for t in y.values())
        rank = getattr(self.solver, "rank", None)
        if rank is not None and rank > dim:
            raise ValueError(f"tb.nystrom(rank={rank}): rank must be <= dim y = {dim} (the number of inner "
                             "parameters)")

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        ob, ib = draw(outer_batch, "outer_batch"), draw(inner_batch, "inner_batch")
        fx, fy, fval = outer_grads(problem, x, y, ob)
        if self.curvature == "gauss_newton":                  # G v = Jᵀ∇²loss J v + ∇yy reg·v, PSD
            lin = averaged(gauss_newton_linearize(problem.inner_fn, x, y, ib, self.mode), problem)
        else:
            lin = averaged(linearize(problem.inner, x, y, ib, self.mode), problem)   # one graph of ∇y g, reused
        v, info = solve(self.solver, lin.hvp, fy, v0)         # (∇yy g + λI)·v = ∇y f
        record(LINEAR, v)
        jv = lin.mixed(v)
        record(MIXED, jv)
        dx = T.sub(fx, jv)                                    # eq. (3)
        return dx, HypergradAux(y, v, fval.detach(), info, inner_loss=lin.value)   # g from the linearisation's forward

    @property
    def generator(self):
        """The solver's generator (Nyström's coordinates), carried per run by the double loop."""
        return getattr(self.solver, "generator", None)


def aid(solver, mode: str = "auto", curvature: str = "hessian") -> AID:
    """AID-BiO hypergradient at the given y (Ji, Yang, Liang, ICML 2021, Alg. 1, eq. (3)):
    solve ∇yy g·v = ∇y f with ``solver``, return ∇x f − ∇xy g·v.  Cost: one gradient of
    f, one of g with its graph, ``steps`` Hessian-vector products and one mixed product
    (measured 2.2-2.6 gradient evaluations of g for CG(10) on LeNet, bench/RESULTS.md).
    Warm-start v with ``hg(..., v0=aux.v)``.

    ``curvature="gauss_newton"``: solve with the generalized Gauss-Newton matrix
    G = Jᵀ∇²loss J + ∇yy regularizer instead of ∇yy g (positive semi-definite for a loss
    convex in the outputs, so CG converges where a deep network's ∇yy g is indefinite; a
    different quantity from the implicit-function hypergradient, equal to it where the
    outputs are linear in y); needs ``inner=tb.OutputLoss(outputs, loss, regularizer)``.
    Each G product costs about three backward passes through the network's graph (one
    forward per solve); ∇xy g·v stays exact."""
    if curvature not in ("hessian", "gauss_newton"):
        raise ValueError(f"curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    if not is_solver(solver):
        raise TypeError(f"aid(solver) needs tb.cg(...), tb.fixed_point(...) or tb.nystrom(...), "
                        f"got {type(solver).__name__}")
    if mode not in ("auto", "autograd", "func"):
        raise ValueError(f"mode must be 'auto', 'autograd' or 'func', got {mode!r}")
    return AID(solver, mode, curvature)
