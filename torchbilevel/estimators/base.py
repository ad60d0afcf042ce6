"""What every hypergradient estimator returns besides the hypergradient."""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from .. import tree as T
from ..solvers import SolveInfo


class HypergradAux(NamedTuple):
    """Auxiliary output of a hypergradient estimate (what a warm start needs).

    Attributes:
        y: the inner iterate the estimate used (after the estimator's own inner steps for
            ITD and PZOBO; the given y for AID and stocBiO).
        v: the linear-system solution (AID, stocBiO's v_Q), or None.
        outer_loss: f(x, y; batch) at that inner iterate, as a 0-d tensor.
        solve: what the linear solve did (:class:`torchbilevel.SolveInfo`: iterations,
            relative residual, iterations that met non-positive curvature) for AID and
            stocBiO's Neumann series, else None.
        inner_loss: g(x, y; batch) where the estimate evaluated it anyway (0-d tensor; AID:
            at the given y on the inner batch, from the forward that builds ∇y g's graph;
            stocBiO: at the given y on its first inner sample), else None.
    """
    y: T.Tree
    v: Optional[T.Tree]
    outer_loss: Tensor
    solve: Optional[SolveInfo] = None
    inner_loss: Optional[Tensor] = None


def outer_grads(problem, x, y, batch):
    """(∇x f, ∇y f, f) at (x, y; batch) from one reverse pass (averaged over the
    data-parallel group with one all-reduce when the problem has a reduce hook)."""
    from ..derivatives import gradient
    from ..guards import OUTER, record
    fval, (fx, fy) = gradient(problem.outer, x, y, batch)
    fx, fy, fval = problem.average(fx, fy, fval)
    record(OUTER, fval, fx, fy)
    return fx, fy, fval


def unroll(problem, x, y, batches, lr, differentiable: bool = True):
    """``len(batches)`` gradient steps on the inner problem from y: y ← y − lr ∇y g(x, y; S_t)
    (stocBiO paper Alg. 1 line 5 / Alg. 2 line 6).

    ``differentiable=True`` keeps the graph so the result can be differentiated w.r.t. x
    (ITD): with torch.func inside transforms, else autograd with ``create_graph``.
    ``differentiable=False`` (PZOBO's paths) only needs the values: each step is one
    y-gradient of g, no graph kept.  With a data-parallel problem each step's ∇y g is
    averaged over the group (one all-reduce per step, differentiable for ITD).
    """
    from ..derivatives import gradient
    from ..features import hoisted_inner
    inner = hoisted_inner(problem, x)          # declared features: phi once per batch, head steps
    for b in batches:
        _, (gy,) = gradient(inner, x, y, b, argnums=1, create_graph=differentiable)
        (gy,) = problem.average(gy)
        y = {k: y[k] - lr * gy[k] for k in y}
    return y
