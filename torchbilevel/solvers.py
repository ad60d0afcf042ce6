"""Solvers for the linear system of implicit differentiation, (∇yy g + λI) · v = ∇y f.

Solvers are small immutable configs (like JAXopt's); :func:`solve` runs one given a
matrix-vector product on parameter dicts and returns the solution with a
:class:`SolveInfo` saying what the solve did (iterations, final relative residual,
iterations that met non-positive curvature).  Without a tolerance the iteration count is
fixed and nothing is read on the host, so a solve composes with ``torch.func.vmap``; the
report is a handful of 0-d tensors the iteration computes anyway (no extra product for
CG and fixed point).

Indefinite systems.  With every weight of a deep network inner, ∇yy g is indefinite and
CG's assumptions fail: an iteration meets pᵀAp ≤ 0 and the iterate is noise.  Each config
says what to do then (``indefinite=``): ``"warn"`` (keep iterating, the caller warns),
``"truncate"`` (stop at the first non-positive curvature and keep the iterate reached so
far, as Newton-CG does) or ``"raise"``.  :func:`solve_failed` says whether a report
shows such a failure; ``tb.hypergrad`` and the double loop turn it into one
``RuntimeWarning`` per run (or :class:`IndefiniteSystemError`).
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from . import tree as T
from .problem import check_positive, check_steps, in_functorch_transform

__all__ = ["CG", "FixedPoint", "Nystrom", "SolveInfo", "IndefiniteSystemError", "cg", "fixed_point", "nystrom",
           "solve", "is_solver", "solve_failed", "residual_grew", "INDEFINITE_MODES"]

MatVec = Callable[[T.Tree], T.Tree]
INDEFINITE_MODES = ("warn", "truncate", "raise")


class IndefiniteSystemError(ArithmeticError):
    """A linear solve met non-positive curvature or ended with a larger residual than it
    started with, and its config says ``indefinite="raise"``."""


class SolveInfo(NamedTuple):
    """What a linear solve did (0-d tensors; no host read to build them).

    Attributes:
        iterations: iterations that updated v (CG stops counting at a truncation).
        residual: ‖b − A v‖ / ‖b‖ at the returned v (A includes the damping). CG and fixed
            point track it by their recurrences at no extra product: right to ~1e-15 before
            convergence, below rounding once converged, where the true residual stalls at
            ~1e-16 relative. Nyström spends one product, and its residual says how well
            rank k explains the system: large for a low rank, which is no failure of that
            method.
        start_residual: the same at the starting point (1 for v0 = 0).
        nonpositive_curvature: iterations whose search direction p had pᵀAp ≤ 0 (CG: the
            direction; fixed point: the residual r, rᵀAr ≤ 0; Nyström: non-positive
            eigenvalues of the sampled k×k block). Any such count means A is not positive
            definite where the solve ran: the implicit-function formula's assumption fails.
        truncated: whether the solve stopped at the first non-positive curvature
            (``indefinite="truncate"``).
    """
    iterations: Tensor
    residual: Tensor
    start_residual: Tensor
    nonpositive_curvature: Tensor
    truncated: Tensor


def _check_tol(tol):
    if tol is not None:
        check_positive(tol, "tol")
    return None if tol is None else float(tol)


def _check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping == damping \
            or damping < 0 or damping == float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


def _check_mode(indefinite) -> str:
    if indefinite not in INDEFINITE_MODES:
        raise ValueError(f"indefinite must be one of {INDEFINITE_MODES}, got {indefinite!r}")
    return indefinite


class CG(NamedTuple):
    """Conjugate gradient on (A + damping·I) v = b for a symmetric A (config).

    steps: iterations (each is one matrix-vector product).
    tol: optional relative residual tolerance ‖b − A v‖ ≤ tol·‖b‖; reading the residual
        costs one host synchronisation per iteration, so it is off by default.
    damping: λ ≥ 0 added to the diagonal (ridge; TorchOpt and JAXopt call it so): the
        solve then answers for the damped system, a different but stable quantity where
        A is indefinite or ill-conditioned.
    indefinite: ``"warn"``, ``"truncate"`` or ``"raise"`` (see the module docstring).
    """
    steps: int
    tol: Optional[float] = None
    damping: float = 0.0
    indefinite: str = "warn"


class FixedPoint(NamedTuple):
    """Richardson / truncated Neumann iteration  v ← v − lr·((A + damping·I) v − b)  (config).

    Converges when A + damping·I is positive definite and 0 < lr < 2 / λ_max; ``lr = 1/L``
    for an L-smooth inner problem.  ``indefinite="truncate"`` stops at the first residual
    r with rᵀAr ≤ 0 (the direction along which the iteration grows).  The iteration runs on
    the residual (r ← r − lr·A r, v ← v + lr·r), so the report's residual is the returned
    v's at no extra product; a warm start v0 costs one product (A v0) more than a cold one.
    """
    steps: int
    lr: float
    tol: Optional[float] = None
    damping: float = 0.0
    indefinite: str = "warn"


class Nystrom(NamedTuple):
    """Rank-k Nyström approximation of A and a Woodbury solve (Hataya & Yamada, AISTATS
    2023, "Nyström Method for Accurate and Scalable Implicit Differentiation") (config).

    rank: k, the number of sampled coordinates (k Hessian-vector products with unit
        vectors, plus one to report the residual of the original system).
    rho: ρ > 0, the regulariser of (A_k + ρI), A_k = C W⁺ Cᵀ with C = A[:, K], W = A[K, K].
    generator: the torch.Generator that draws the coordinates K (default: torch's global
        generator); the double loop carries its state per run.
    """
    rank: int
    rho: float
    generator: Optional[torch.Generator] = None
    indefinite: str = "warn"

    @property
    def steps(self) -> int:
        """Hessian-vector products the solve's approximation costs (= rank), as for CG."""
        return self.rank


def cg(steps: int = 10, tol: Optional[float] = None, damping: float = 0.0, indefinite: str = "warn") -> CG:
    """Conjugate-gradient solver config: ``steps`` iterations on (∇yy g + damping·I) v = ∇y f,
    optional early stop at ``tol``; ``indefinite`` says what to do on non-positive curvature
    (``"warn"``: go on and warn once per run; ``"truncate"``: stop there, keep the iterate
    reached, warn once; ``"raise"``: IndefiniteSystemError)."""
    return CG(check_steps(steps, "steps"), _check_tol(tol), _check_damping(damping), _check_mode(indefinite))


def fixed_point(steps: int = 10, lr: float = 0.1, tol: Optional[float] = None, damping: float = 0.0,
                indefinite: str = "warn") -> FixedPoint:
    """Fixed-point (Richardson / Neumann) solver config: v ← v − lr ((∇yy g + damping·I) v − ∇y f),
    ``steps`` times; ``indefinite`` as for :func:`cg`."""
    return FixedPoint(check_steps(steps, "steps"), check_positive(lr, "lr"), _check_tol(tol),
                      _check_damping(damping), _check_mode(indefinite))


def nystrom(rank: int = 10, rho: float = 1e-2, generator: Optional[torch.Generator] = None,
            indefinite: str = "warn") -> Nystrom:
    """Nyström solver config (Hataya & Yamada 2023): v = (A_k + ρI)⁻¹ b by Woodbury,
    A_k the rank-``rank`` Nyström approximation from ``rank`` sampled columns of A.
    ``rank`` must not exceed dim y (checked at the solve, before any product)."""
    rank = check_steps(rank, "rank")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0 or rho == float("inf"):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return Nystrom(rank, float(rho), generator, _check_mode(indefinite))


def is_solver(obj) -> bool:
    """True for the configs returned by :func:`cg`, :func:`fixed_point` and :func:`nystrom`."""
    return isinstance(obj, (CG, FixedPoint, Nystrom))


def residual_grew(info: SolveInfo, solver=None) -> Tensor:
    """0-d bool tensor (no host read): a fixed-point iteration — ``solver`` a FixedPoint, or
    None for any iteration that contracts its residual on a positive-definite system, as
    stocBiO's series — ended with a larger residual than it started with: it diverged.
    Always False for CG, whose residual is not monotone even on a positive-definite system
    (measured: the demo's warm-started CG(10) on a strongly convex problem ended 7-30 %
    above its start in 13 of 100 steps; for CG the curvature test is the one: pᵀAp > 0 at
    every iteration iff the Krylov space it explored is positive definite), and for
    Nyström, whose residual measures its rank-k fit."""
    if isinstance(solver, (CG, Nystrom)):
        return torch.zeros((), dtype=torch.bool, device=info.residual.device)
    return info.residual > info.start_residual


def solve_failed(info: SolveInfo, solver=None) -> Tensor:
    """0-d bool tensor (no host read): the solve met non-positive curvature, or its
    residual grew (:func:`residual_grew`)."""
    return (info.nonpositive_curvature > 0) | residual_grew(info, solver)


def _converged(r: T.Tree, b_norm: Tensor, tol: Optional[float]) -> bool:
    if tol is None or in_functorch_transform():
        return False
    return bool(T.norm(r) <= tol * b_norm)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # num/den, and 0 where den is 0 (residual reached zero): keeps CG finite without a
    # host-side branch.
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0.0:
        return matvec
    return lambda v: T.axpy(damping, v, matvec(v))        # (A + λI) v


def _select(keep: Optional[Tensor], new: T.Tree, old: T.Tree) -> T.Tree:
    # keep=None (no truncation possible): the new value, no elementwise select
    return new if keep is None else {k: torch.where(keep, old[k], new[k]) for k in new}


def _tiny(b: T.Tree) -> float:
    # below this squared relative residual a solve has converged to rounding: a pᵀAp ≤ 0
    # computed there is rounding, not curvature
    return (100.0 * torch.finfo(next(iter(b.values())).dtype).eps) ** 2


def solve(solver, matvec: MatVec, b: Mapping[str, Tensor], v0: Optional[Mapping[str, Tensor]] = None):
    """Approximately solve ``(A + damping·I) v = b`` with ``solver``, starting from ``v0``
    (default 0).  Returns ``(v, SolveInfo)``.

    ``matvec(v)`` returns A v for a dict v shaped like b.
    """
    if not is_solver(solver):
        raise TypeError(f"solver must be tb.cg(...), tb.fixed_point(...) or tb.nystrom(...), "
                        f"got {type(solver).__name__}")
    if isinstance(solver, Nystrom):
        return _nystrom_solve(solver, matvec, dict(b))
    v = T.zeros_like(b) if v0 is None else dict(v0)
    T.check_same_keys(v, b, "v0 and the right-hand side")
    A = _damped(matvec, solver.damping)
    bb = T.sqnorm(b)
    b_norm = bb.sqrt() if solver.tol is not None and not in_functorch_transform() else None
    tiny = _tiny(b) * bb
    truncate = solver.indefinite == "truncate"
    r = T.sub(b, A(v)) if v0 is not None else dict(b)     # r = b − A v0
    rr = T.sqnorm(r)
    start = rr
    zero = torch.zeros((), dtype=torch.int64, device=rr.device)
    its, bad, stopped = zero, zero, torch.zeros((), dtype=torch.bool, device=rr.device)
    if isinstance(solver, FixedPoint):
        # Richardson on the residual: v ← v + lr r, r ← r − lr A r (= b − A v, one product)
        for _ in range(solver.steps):
            if _converged(r, b_norm, solver.tol):
                break
            Ar = A(r)
            neg = (T.dot(r, Ar) <= 0) & (rr > tiny)            # rᵀAr ≤ 0: the iteration grows along r
            stop = stopped | (neg & truncate)
            v = _select(stop if truncate else None, T.axpy(solver.lr, r, v), v)
            r = _select(stop if truncate else None, T.axpy(-solver.lr, Ar, r), r)
            bad, its = bad + (neg & ~stopped).to(bad.dtype), its + (~stop).to(its.dtype)
            stopped, rr = stop, T.sqnorm(r)
    else:
        # Conjugate gradient (Hestenes–Stiefel).  The residual is updated from the fresh
        # A p of this iteration, never reused from an earlier one.
        p = dict(r)
        for _ in range(solver.steps):
            if _converged(r, b_norm, solver.tol):
                break
            Ap = A(p)
            pAp = T.dot(p, Ap)
            neg = (pAp <= 0) & (rr > tiny)                    # non-positive curvature along p
            stop = stopped | (neg & truncate)                 # truncated CG keeps the iterate reached
            alpha = _safe_div(rr, pAp)                        # α = rᵀr / pᵀAp
            if truncate:
                alpha = torch.where(stop, torch.zeros_like(rr), alpha)
            v = T.axpy(alpha, p, v)                           # v ← v + α p
            r = T.axpy(-alpha, Ap, r)                         # r ← r − α A p
            rr_new = T.sqnorm(r)
            beta = _safe_div(rr_new, rr)                      # β = r'ᵀr' / rᵀr
            p = _select(stop if truncate else None, T.axpy(beta, p, r), p)   # p ← r' + β p
            bad, its = bad + (neg & ~stopped).to(bad.dtype), its + (~stop).to(its.dtype)
            stopped, rr = stop, rr_new
    rel = lambda sq: _safe_div(sq, bb).sqrt()
    return v, SolveInfo(its, rel(rr), rel(start), bad, stopped)


def _nystrom_solve(solver: Nystrom, matvec: MatVec, b: T.Tree):
    """v = (A_k + ρI)⁻¹ b, A_k = C W⁺ Cᵀ with C = A[:, K] (k products with unit vectors) and
    W = A[K, K], by Woodbury: v = b/ρ − C (W + CᵀC/ρ)⁻¹ Cᵀ b / ρ²  (Hataya & Yamada 2023, Sec. 3).
    The k×k system is solved in float64.  One more product gives the residual of the
    original system, ‖b − (A + ρI) v‖/‖b‖, for the report."""
    flat_b, layout = T.ravel(b)
    d, k = flat_b.numel(), solver.rank
    if k > d:
        raise ValueError(f"rank must be <= dim y = {d} (the number of inner parameters), got {k}")
    dev = flat_b.device
    idx = torch.randperm(d, generator=solver.generator, device=solver.generator.device
                         if solver.generator is not None else "cpu")[:k].to(dev)
    cols = []
    for j in range(k):                                    # C[:, j] = A e_{K_j}
        e = torch.zeros_like(flat_b).index_fill_(0, idx[j:j + 1], 1.0)
        cols.append(T.ravel_like(layout, matvec(T.unravel(layout, e))))
    C = torch.stack(cols, 1).to(torch.float64)            # d × k
    W = C.index_select(0, idx)                            # k × k, A[K, K]
    W = 0.5 * (W + W.T)
    rho, bd = solver.rho, flat_b.to(torch.float64)
    s = torch.linalg.solve(W + C.T @ C / rho, C.T @ bd)
    v_flat = (bd / rho - C @ s / rho ** 2).to(flat_b.dtype)
    v = T.unravel(layout, v_flat)
    r = T.sub(b, T.axpy(rho, v, matvec(v)))               # b − (A + ρI) v, the report's one product
    bb = T.sqnorm(b)
    nonpos = (torch.linalg.eigvalsh(W) <= 0).sum()
    one = torch.ones((), dtype=bb.dtype, device=dev)
    return v, SolveInfo(torch.tensor(k, device=dev), _safe_div(T.sqnorm(r), bb).sqrt(),
                        torch.where(bb > 0, one, 0 * one), nonpos.to(dev), torch.zeros((), dtype=torch.bool, device=dev))
