"""Solvers for the linear system of implicit differentiation, ∇yy g · v = ∇y f.

Solvers are small immutable configs (like JAXopt's); :func:`solve` runs one given a
matrix-vector product on parameter dicts.  Without a tolerance the iteration count is
fixed and nothing is read on the host, so a solve composes with ``torch.func.vmap``.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from . import tree as T
from .problem import check_positive, check_steps, in_functorch_transform

__all__ = ["CG", "FixedPoint", "cg", "fixed_point", "solve", "is_solver"]

MatVec = Callable[[T.Tree], T.Tree]


class CG(NamedTuple):
    """Conjugate gradient for a symmetric positive-definite system (config).

    steps: iterations (each is one matrix-vector product).
    tol: optional relative residual tolerance ‖b − A v‖ ≤ tol·‖b‖; reading the residual
        costs one host synchronisation per iteration, so it is off by default.
    """
    steps: int
    tol: Optional[float] = None


class FixedPoint(NamedTuple):
    """Richardson / truncated Neumann iteration  v ← v − lr·(A v − b)  (config).

    Converges when 0 < lr < 2 / λ_max(A); ``lr = 1/L`` for an L-smooth inner problem.
    """
    steps: int
    lr: float
    tol: Optional[float] = None


def _check_tol(tol):
    if tol is not None:
        check_positive(tol, "tol")
    return None if tol is None else float(tol)


def cg(steps: int = 10, tol: Optional[float] = None) -> CG:
    """Conjugate-gradient solver config: ``steps`` iterations, optional early stop at ``tol``."""
    return CG(check_steps(steps, "steps"), _check_tol(tol))


def fixed_point(steps: int = 10, lr: float = 0.1, tol: Optional[float] = None) -> FixedPoint:
    """Fixed-point (Richardson / Neumann) solver config: v ← v − lr (A v − b), ``steps`` times."""
    return FixedPoint(check_steps(steps, "steps"), check_positive(lr, "lr"), _check_tol(tol))


def is_solver(obj) -> bool:
    """True for the configs returned by :func:`cg` and :func:`fixed_point`."""
    return isinstance(obj, (CG, FixedPoint))


def _converged(r: T.Tree, b_norm: Tensor, tol: Optional[float]) -> bool:
    if tol is None or in_functorch_transform():
        return False
    return bool(T.norm(r) <= tol * b_norm)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # num/den, and 0 where den is 0 (residual reached zero): keeps CG finite without a
    # host-side branch.
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def solve(solver, matvec: MatVec, b: Mapping[str, Tensor], v0: Optional[Mapping[str, Tensor]] = None) -> T.Tree:
    """Approximately solve ``A v = b`` with ``solver``, starting from ``v0`` (default 0).

    ``matvec(v)`` returns A v for a dict v shaped like b.
    """
    if not is_solver(solver):
        raise TypeError(f"solver must be tb.cg(...) or tb.fixed_point(...), got {type(solver).__name__}")
    v = T.zeros_like(b) if v0 is None else dict(v0)
    T.check_same_keys(v, b, "v0 and the right-hand side")
    b_norm = T.norm(b) if solver.tol is not None and not in_functorch_transform() else None
    if isinstance(solver, FixedPoint):
        for _ in range(solver.steps):
            r = T.sub(b, matvec(v))                       # r = b − A v
            if _converged(r, b_norm, solver.tol):
                break
            v = T.axpy(solver.lr, r, v)                   # v ← v + lr·r (Richardson)
        return v
    # Conjugate gradient (Hestenes–Stiefel).  The residual is updated from the fresh
    # A p of this iteration, never reused from an earlier one.
    r = T.sub(b, matvec(v)) if v0 is not None else dict(b)
    p = dict(r)
    rr = T.sqnorm(r)
    for _ in range(solver.steps):
        if _converged(r, b_norm, solver.tol):
            break
        Ap = matvec(p)
        alpha = _safe_div(rr, T.dot(p, Ap))               # α = rᵀr / pᵀAp
        v = T.axpy(alpha, p, v)                           # v ← v + α p
        r = T.axpy(-alpha, Ap, r)                         # r ← r − α A p
        rr_new = T.sqnorm(r)
        beta = _safe_div(rr_new, rr)                      # β = r'ᵀr' / rᵀr
        p = T.axpy(beta, p, r)                            # p ← r' + β p
        rr = rr_new
    return v
