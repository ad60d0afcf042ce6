"""What a single-loop step (FdeHBO Alg. 1, FMBO Alg. 2; SOBA) does with its gradients once
they are evaluated: the fused update over stacked rows (the default: the old state stays
intact), or the accumulation into a donated state (``donate=True``), and the checks and the
report that close either step.

    fused:    rows of every gradient of the step -> torchbilevel.kernels (one pass per side)
    donated:  h ← (1−η)h, then each gradient added with its sign as it returns, iterates in place

Both implement, with ∇vR = ∇yy g·v − ∇y f (eq. (5)) and ∇̄f = ∇x f − ∇xy g·v (eq. (3)):

    h^g_t = ∇y g(z_t) + (1−η^g)(h^g_{t−1} − ∇y g(z_{t−1}))        eq. (6)
    h^R_t = ∇vR(z_t) + (1−η^R)(h^R_{t−1} − ∇vR(z_{t−1}))          eq. (7) / (12)
    h^f_t = ∇̄f(z_t) + (1−η^f)(h^f_{t−1} − ∇̄f(z_{t−1}))            eq. (10) / (13)
    y_{t+1} = y_t − β h^g_t,  w = v_t − λ h^R_t,  v_{t+1} = Proj_r(w),  x_{t+1} = x_t − α h^f_t
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import guards as G
from .. import kernels as K
from .. import sharding as S
from .. import tree as T
from ..problem import in_functorch_transform
from . import donation as D
from .schedule import value_at
from .single_loop_state import RADIUS_WINDOW, SingleLoopState
from .step_info import StepInfo, norm, one_step_solve, reply

__all__ = ["Settings", "Evaluations", "rows_sink", "fused_update", "Donated", "finish"]


class Settings(NamedTuple):
    """The configuration of one single-loop algorithm (what its builder was given)."""
    name: str
    fd: bool
    problem: Any
    lr_x: Any
    lr_y: Any
    lr_v: Any
    eta_x: Any
    eta_y: Any
    eta_v: Any
    radius: float
    backend: str
    check_finite: bool


class Evaluations(NamedTuple):
    gy: Tensor      # (2, d): ∇y g at cur, prev on ζ
    gy_prod: Tensor  # (2, d): ∇yy g·v at cur, prev (FD eq. (9) for FdeHBO, exact for FMBO)
    gx_prod: Tensor  # (2, p): ∇xy g·v at cur, prev (FD eq. (11) for FdeHBO, exact for FMBO)
    fx: Tensor      # (2, p): ∇x f at cur, prev
    fy: Tensor      # (2, d): ∇y f at cur, prev
    losses: Optional[Tensor] = None   # (2,): g(cur; ζ) (or the ± pair's mean), f(cur; ψ)


def sharded(s: SingleLoopState) -> bool:
    return s.layout_x.shards is not None or s.layout_y.shards is not None


# ---------------------------------------------------------------- the fused update (default)

def rows_sink(s: SingleLoopState, func: bool):
    """(sink, ev) for the evaluations of a step: ``sink(point, n_points)(name, dict)`` fills
    the fused kernels' stacked rows, ``ev(losses)`` returns the :class:`Evaluations`.  Eager:
    rows allocated once and written key by key as each gradient returns, so it is freed at
    once (no list of rows, stack and concatenation beside each other).  Under torch.func
    transforms / torch.compile (``func``): pure, the rows raveled and stacked at the end."""
    slot = {"gy": ("y", 0), "hv": ("y", 2), "fy": ("y", 4), "fx": ("x", 0), "jv": ("x", 2)}
    layout = {"x": s.layout_x, "y": s.layout_y}
    if func:
        got = {k: [None, None] for k in slot}

        def sink(i, n):
            def put(name, t):
                got[name][i] = T.ravel_like(layout[slot[name][0]], t)
            return put

        def ev(loss):
            stack = lambda two: torch.stack(two if two[1] is not None else [two[0]] * 2)  # prev = cur
            return Evaluations(stack(got["gy"]), stack(got["hv"]), stack(got["jv"]), stack(got["fx"]),
                               stack(got["fy"]), loss)
        return sink, ev
    rows = {"y": s.yf.new_empty((6,) + tuple(s.yf.shape)),     # gy, gy', Hv, Hv', fy, fy'
            "x": s.xf.new_empty((4,) + tuple(s.xf.shape))}     # fx, fx', Jv, Jv'

    def sink(i, n):
        def put(name, t):
            side, base = slot[name]
            for j in ((0, 1) if n == 1 else (i,)):           # prev = cur: t = 0, or every η = 1
                view = layout[side].unravel(rows[side][base + j])
                for k, tk in t.items():
                    view[k].copy_(tk)
        return put

    def ev(loss):
        ry, rx = rows["y"], rows["x"]
        return Evaluations(ry[0:2], ry[2:4], rx[2:4], rx[0:2], ry[4:6], loss)
    return sink, ev


def stack_rows(ev: Evaluations):
    """The stacked gradient buffers of torchbilevel.kernels (products layout, fd=False):
    rows_y = [gy_cur, gy_prev, Hv_cur, Hv_prev, fy_cur, fy_prev],
    rows_x = [fx_cur, fx_prev, Jv_cur, Jv_prev]; the buffers themselves when ``ev`` holds
    views of them (:func:`rows_sink`), no copy."""
    by, bx = ev.gy._base, ev.fx._base
    if (by is not None and bx is not None and by.dim() == 2 and by.shape[0] == 6 and bx.dim() == 2
            and bx.shape[0] == 4 and ev.gy.data_ptr() == by.data_ptr()
            and ev.gy_prod.data_ptr() == by[2].data_ptr() and ev.fy.data_ptr() == by[4].data_ptr()
            and ev.fx.data_ptr() == bx.data_ptr() and ev.gx_prod.data_ptr() == bx[2].data_ptr()):
        return by, bx          # the row buffers of rows_sink (not views of another buffer)
    rows_y = torch.cat([ev.gy, ev.gy_prod, ev.fy]).to(ev.gy.dtype)
    rows_x = torch.cat([ev.fx, ev.gx_prod]).to(ev.fx.dtype)
    return rows_y.contiguous(), rows_x.contiguous()


def fused_update(cfg: Settings, s: SingleLoopState, ev: Evaluations, d_cur, pair_mode, has_aux: bool):
    """The new state (beside the old) from the step's evaluations, by the fused kernels;
    returns (new state, ‖w‖², the losses, the solve report or None, the stage namer)."""
    t = s.step
    if cfg.problem.reduce is not None and not sharded(s):   # (sharded: already the mean over ranks)
        # data parallel: every gradient row of the step in one flat buffer, one all-reduce
        ev = Evaluations(*cfg.problem.average(*ev))
    rows_y, rows_x = stack_rows(ev)
    # the linear system's report at v_t, read before the update (which may reuse v_t's buffer)
    solve = one_step_solve(s.vf, ev.gy_prod[0], ev.fy[0], s.layout_y) if has_aux else None
    # "The first step, with no previous iterate, uses the plain stochastic gradients":
    # η = 1 zeroes the momentum bracket (prev rows equal cur rows there).
    e = (lambda sch, nm: 1.0) if t == 0 else (lambda sch, nm: value_at(sch, t, nm, unit=True))
    y_new, w, h_g, h_R, w_sq = K.inner_update(
        s.yf, s.vf, s.h_g, s.h_R, rows_y, beta=value_at(cfg.lr_y, t, "lr_y"), lam=value_at(cfg.lr_v, t, "lr_v"),
        eta_g=e(cfg.eta_y, "eta_y"), eta_R=e(cfg.eta_v, "eta_v"), scale_cur=1.0, scale_prev=1.0,
        fd=False, backend=cfg.backend)
    if s.layout_y.shards is not None and (cfg.radius != float("inf") or has_aux):
        # ‖w‖² over every rank's shard (for the projection, and for the report's ‖w‖)
        w_sq = S.global_sqnorms(s.layout_y, w)[0].to(w_sq.dtype)
    v_new = K.project_ball(w, w_sq, cfg.radius, backend=cfg.backend)
    x_new, h_f = K.outer_update(
        s.xf, s.h_f, rows_x, alpha=value_at(cfg.lr_x, t, "lr_x"), eta_f=e(cfg.eta_x, "eta_x"),
        scale_cur=1.0, scale_prev=1.0, fd=False, backend=cfg.backend)
    new = SingleLoopState(x_new, y_new, v_new, h_f, h_g, h_R, s.xf, s.yf, s.vf,
                          d_cur, t + 1, s.layout_x, s.layout_y, s.ball_hits, s.ball_recent,
                          pair_mode=pair_mode, gy_from_pair=s.gy_from_pair, warned=s.warned)
    return new, w_sq, ev.losses, solve, lambda: diagnose(cfg, ev)


def diagnose(cfg: Settings, ev: Evaluations) -> str:
    parts = [("the inner gradient ∇y g (y update)", ev.gy),
             ("the linear-system products " + ("(finite-difference ∇yy g·v and ∇xy g·v)" if cfg.fd
                                               else "(exact ∇yy g·v and ∇xy g·v)"),
              torch.cat([ev.gy_prod.flatten(), ev.gx_prod.flatten()])),
             ("the outer gradient ∇f", torch.cat([ev.fx.flatten(), ev.fy.flatten()]))]
    for what, t in parts:
        if not bool(torch.isfinite(t).all()):
            return what
    return "the update (step sizes too large: the iterates overflowed)"


# ---------------------------------------------------------------- the donated step

class Donated:
    """The step written into a donated state's buffers.  On construction the state is
    marked consumed and the momenta are scaled by (1 − η) (zeroed at t = 0 or η = 1);
    :meth:`sink` adds each gradient with its sign and weight the moment it returns;
    :meth:`commit` moves the iterates in place, each into the previous iterate's buffer
    (free by then), the old iterate becoming the previous one."""

    # name -> (momentum, sign): h_g += ∇y g; h_R += ∇yy g·v − ∇y f (eq. (5)); h_f += ∇x f − ∇xy g·v (eq. (3))
    TARGET = {"gy": ("g", 1.0), "hv": ("R", 1.0), "fy": ("R", -1.0), "fx": ("f", 1.0), "jv": ("f", -1.0)}

    def __init__(self, cfg: Settings, s: SingleLoopState, has_aux: bool):
        self.cfg, self.s, self.has_aux = cfg, s, has_aux
        t = s.step
        D.take(s)                        # consumed from here on, whatever happens
        keep = (lambda sch, nm: 0.0) if t == 0 else (lambda sch, nm: 1.0 - value_at(sch, t, nm, unit=True))
        self.k = {"f": keep(cfg.eta_x, "eta_x"), "g": keep(cfg.eta_y, "eta_y"), "R": keep(cfg.eta_v, "eta_v")}
        self.h = {"f": s.h_f, "g": s.h_g, "R": s.h_R}
        for key, hk in self.h.items():
            hk.zero_() if self.k[key] == 0.0 else hk.mul_(self.k[key])
        self.views = {"f": s.layout_x.unravel(s.h_f), "g": s.layout_y.unravel(s.h_g), "R": s.layout_y.unravel(s.h_R)}
        self.data_parallel = cfg.problem.reduce is not None and not sharded(s)
        self.finite = {}                 # stage -> 0-d bool, read only after a failure
        self.kept = {}                   # has_aux: ∇y f and ∇yy g·v at the current point

    def sink(self, i, n):
        def put(name, term):
            if self.data_parallel:       # one all-reduce per gradient (no buffer of the step's rows)
                (term,) = self.cfg.problem.average(term)
            key, sign = self.TARGET[name]
            if self.cfg.check_finite:    # (sums: one read, no mask; only read to name a stage after a failure)
                sums = [t.sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)
                        for t in term.values()]                  # (float16 sums overflow)
                self.finite[name] = self.finite.get(name, True) & torch.isfinite(torch.stack(sums).sum())
            if self.has_aux and i == 0 and name in ("fy", "hv"):
                self.kept[name] = T.ravel_like(self.s.layout_y, term)
            weight = sign if i == 0 else -sign * self.k[key]   # the previous point: −(1−η)·a_{t−1}
            if weight != 0.0:
                view = self.views[key]
                for k, t in term.items():                     # key by key: never concatenated
                    view[k].add_(t.to(view[k].dtype), alpha=weight)
        return put

    def commit(self, losses, d_cur, pair_mode):
        """(new state, ‖w‖², losses, solve report, stage namer) after every evaluation."""
        cfg, s, t = self.cfg, self.s, self.s.step
        if self.data_parallel and self.has_aux:      # (the losses are only reported)
            (losses,) = cfg.problem.average(losses)
        solve = one_step_solve(s.vf, self.kept["hv"], self.kept["fy"], s.layout_y) if self.has_aux else None
        self.kept.clear()
        # y_{t+1} = y_t − β h^g_t, w = v_t − λ h^R_t (Alg. 1 l. 4-5), x_{t+1} = x_t − α h^f_t (l. 7)
        y_new = into(s.y_prev, s.yf, s.h_g, -value_at(cfg.lr_y, t, "lr_y"))
        w = into(s.v_prev, s.vf, s.h_R, -value_at(cfg.lr_v, t, "lr_v"))
        x_new = into(s.x_prev, s.xf, s.h_f, -value_at(cfg.lr_x, t, "lr_x"))
        w_sq = (S.global_sqnorms(s.layout_y, w)[0] if s.layout_y.shards is not None else K.reference.sqnorm(w))
        w_sq = w_sq.to(K.reference.compute_dtype(w.dtype))
        if cfg.radius != float("inf"):   # Alg. 1 l. 6, in place: w·r/max(‖w‖, r)
            w.mul_(K.reference.ball_factor(w_sq, cfg.radius, w_sq.dtype))
        f = D.fresh
        new = SingleLoopState(f(x_new), f(y_new), f(w), f(s.h_f), f(s.h_g), f(s.h_R), f(s.xf), f(s.yf), f(s.vf),
                              d_cur, t + 1, s.layout_x, s.layout_y, f(s.ball_hits), f(s.ball_recent),
                              pair_mode=pair_mode, gy_from_pair=s.gy_from_pair, warned=s.warned)
        return new, w_sq, losses, solve, self.diagnosis

    def diagnosis(self) -> str:
        fd = self.cfg.fd
        names = {"gy": "the inner gradient ∇y g (y update)",
                 "hv": "the linear-system products " + ("(finite-difference ∇yy g·v)" if fd else "(exact ∇yy g·v)"),
                 "jv": "the linear-system products " + ("(finite-difference ∇xy g·v)" if fd else "(exact ∇xy g·v)"),
                 "fx": "the outer gradient ∇f", "fy": "the outer gradient ∇f"}
        for key in ("gy", "hv", "jv", "fx", "fy"):
            if key in self.finite and not bool(self.finite[key]):
                return names[key]
        return "the update (step sizes too large: the iterates overflowed)"


def into(prev: Tensor, cur: Tensor, h: Tensor, alpha: float) -> Tensor:
    """cur + alpha·h written into ``prev``'s buffer (out of place where the two share it, as
    after init, where the previous iterate is the iterate itself)."""
    if prev.untyped_storage().data_ptr() == cur.untyped_storage().data_ptr():
        return torch.add(cur, h, alpha=alpha)
    return torch.add(cur, h, alpha=alpha, out=prev)


# ---------------------------------------------------------------- closing a step

def finish(cfg: Settings, s: SingleLoopState, new: SingleLoopState, w_sq, losses, solve, where, has_aux: bool):
    """The radius bookkeeping, the finite check (one host read) and the reply, shared by
    both steps; ``s`` is the state passed in (for the message), ``where()`` names the stage
    after a failure."""
    t, radius = s.step, cfg.radius
    hits, recent, warned = new.ball_hits, new.ball_recent, new.warned
    if radius != float("inf") and hits is not None:
        bound = (w_sq > radius * radius)
        hits = hits + bound.to(hits.dtype)
        recent = recent + (bound.to(recent.dtype) - recent) / RADIUS_WINDOW
        if (not warned and (t + 1) % RADIUS_WINDOW == 0 and not in_functorch_transform()
                and not torch.compiler.is_compiling()):
            warned = warn_radius(cfg, recent, w_sq, t)
    if cfg.check_finite and not in_functorch_transform():
        # one fused reduction and one host read per step
        probe = w_sq.float() + new.xf.float().sum() + new.yf.float().sum()
        if sharded(s) and dist.is_available() and dist.is_initialized():
            dist.all_reduce(probe)       # NaN/inf on one rank's shard: every rank raises (none waits)
        if not bool(torch.isfinite(probe)):
            if D.consumed(s):
                raise FloatingPointError(
                    f"{cfg.name} step {t}: NaN/inf arose in {where()}; the state was donated (donate=True) "
                    f"and holds the failed update: resume from a checkpoint, or step without donation "
                    f"where a failure must leave the state usable")
            bad = G.locate(None, where(), **{f"state.{k}": getattr(s, k)
                                             for k in ("xf", "yf", "vf", "h_f", "h_g", "h_R")})
            raise FloatingPointError(f"{cfg.name} step {t}: NaN/inf arose in {bad}; "
                                     "the state passed in is unchanged")
    new = new._replace(ball_hits=hits, ball_recent=recent, warned=warned)
    return reply(new, has_aux, lambda: StepInfo(
        inner_loss=losses[0], outer_loss=losses[1], hypergrad_norm=norm(new.h_f, s.layout_x),
        delta=torch.as_tensor(new.delta_prev, dtype=torch.float64 if new.yf.dtype == torch.float64
                              else torch.float32, device=new.yf.device) if cfg.fd else None,
        projected=w_sq > radius * radius, v_norm=w_sq.sqrt(),
        solve=solve))


def warn_radius(cfg: Settings, recent, w_sq, t) -> bool:
    """Warn (once per run: the caller records it in the state) when the projection bound
    in most recent steps; True if it warned."""
    frac, norm_w = (float(a) for a in torch.stack([recent.float(), w_sq.float().sqrt()]).tolist())
    frac /= 1.0 - (1.0 - 1.0 / RADIUS_WINDOW) ** (t + 1)     # the average starts at 0: unbias it
    if frac > 0.5:
        warnings.warn(
            f"{cfg.name}: the projection of v on the ball of radius={cfg.radius:g} bound in {frac:.0%} of the "
            f"last ~{RADIUS_WINDOW} steps (step {t}; ‖v‖ would be {norm_w:.3g} unprojected). Theorem 1 "
            f"needs radius ≥ ‖v*‖ with ∇yy g·v* = ∇y f (≈ ‖∇y f‖/μ_g): a clipped v biases the "
            f"hypergradient. Estimate ‖v*‖ with a few CG steps (tb.hypergrad(problem, "
            f"tb.aid(tb.cg(steps=20)), has_aux=True) gives aux.v) and pass radius ≈ 2‖v*‖.",
            RuntimeWarning, stacklevel=5)
        return True
    return False
