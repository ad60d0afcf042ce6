"""stocBiO (Ji, Yang, Liang 2021, Alg. 2-3): the linear system solved by a truncated
Neumann series, each term's Hessian on a fresh batch.

v_Q = η Σ_{i=0..Q} r_i,  r_Q = ∇y F(D_F),  r_{i-1} = r_i − η ∇yy G(B_i)·r_i   (Alg. 3, eq. (5))
∇̂Φ = ∇x F(D_F) − ∇xy G(D_G)·v_Q                                             (eq. (6))
"""
from __future__ import annotations

import collections.abc
from typing import NamedTuple

import torch

from .. import tree as T
from ..derivatives import averaged, linearize
from ..guards import LINEAR, MIXED, record
from ..problem import check_positive, check_steps, draw
from ..solvers import SolveInfo
from .base import HypergradAux, outer_grads


class StocBiO(NamedTuple):
    """stocBiO estimator config: ``neumann_steps`` = Q, ``eta`` = η (η < 1/L_g)."""
    neumann_steps: int
    eta: float
    mode: str = "auto"

    def estimate(self, problem, x, y, inner_batch, outer_batch, v0=None):
        """(hypergradient dict shaped like x, HypergradAux) at (x, y); ``tb.hypergrad`` calls this."""
        fx, fy, fval = outer_grads(problem, x, y, draw(outer_batch, "outer_batch"))      # D_F
        fresh = isinstance(inner_batch, collections.abc.Iterator)
        shared = None if fresh else averaged(linearize(problem.inner, x, y, inner_batch, self.mode), problem)
        first = []          # the first linearisation's g value: the aux's inner loss

        def op():
            # draw(), not next(): an exhausted iterator is a ValueError, not a StopIteration
            # (which a surrounding generator or for-loop would silently swallow)
            if shared is not None:
                return shared
            lin = averaged(linearize(problem.inner, x, y, draw(inner_batch, "inner_batch"), self.mode), problem)
            if not first:
                first.append(lin.value)
            return lin

        r, acc = fy, fy
        bad = torch.zeros((), dtype=torch.int64, device=fval.device)
        for _ in range(self.neumann_steps):                                # i = Q, ..., 1
            hr = op().hvp(r)                                               # ∇yy G(B_i)·r_i
            bad = bad + (T.dot(r, hr) <= 0).to(bad.dtype)                  # rᵀHr ≤ 0: the series grows along r
            r = T.axpy(-self.eta, hr, r)                                   # r_{i-1}
            acc = T.add(acc, r)
        v = T.scale(acc, self.eta)                                         # v_Q = η Σ r_i
        record(LINEAR, v)
        jv = op().mixed(v)
        record(MIXED, jv)
        dx = T.sub(fx, jv)                                                 # eq. (6), D_G
        # the report: ‖r_0‖/‖∇y F‖ is the residual of the series before its last term (one
        # batch: b − H·η Σ_{i≥1} r_i = r_0), read at no extra product
        bb = T.sqnorm(fy)
        ok = bb > 0
        rel = torch.where(ok, T.sqnorm(r) / torch.where(ok, bb, torch.ones_like(bb)), torch.zeros_like(bb)).sqrt()
        info = SolveInfo(torch.full_like(bad, self.neumann_steps), rel, ok.to(rel.dtype), bad,
                         torch.zeros((), dtype=torch.bool, device=bad.device))
        g_val = shared.value if shared is not None else first[0]
        return dx, HypergradAux(y, v, fval.detach(), info, inner_loss=g_val)


def stocbio(neumann_steps: int, eta: float, mode: str = "auto") -> StocBiO:
    """stocBiO hypergradient at the given y (Ji, Yang, Liang, ICML 2021, Alg. 2-3, eq. (5)):
    a Neumann series v_Q = η Σ_q Π_j (I − η∇yy G(·; B_j)) ∇y F for the linear system.
    Cost: ``neumann_steps`` Hessian-vector products and one mixed product (measured 2.1
    gradient evaluations of g for Q = 10 on LeNet, bench/RESULTS.md).

    When ``inner_batch`` is an iterator each Neumann term uses a fresh batch B_i and the
    mixed product a fresh batch D_G; otherwise one batch (and one autograd graph) serves
    all terms.  ``aux.solve`` reports the series like a fixed-point solve: the relative
    residual before the last term and the terms r with rᵀ∇yy G·r ≤ 0 (an indefinite
    Hessian: the series then grows); ``tb.hypergrad`` warns once on either.
    ``aux.inner_loss`` is g(x, y) on the first of those batches, from its linearisation's
    forward (None under torch.func transforms; rank-local with a data-parallel problem)."""
    if mode not in ("auto", "autograd", "func"):
        raise ValueError(f"mode must be 'auto', 'autograd' or 'func', got {mode!r}")
    return StocBiO(check_steps(neumann_steps, "neumann_steps"), check_positive(eta, "eta"), mode)
