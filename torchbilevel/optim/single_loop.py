"""The single-loop engine behind FdeHBO and FMBO (Yang, Xiao, Ji 2023, Alg. 1 and 2).

One step at (x_t, y_t, v_t), with the previous iterate (x_{t-1}, y_{t-1}, v_{t-1}):

    h^g_t = η^g ∇y g(z_t; ζ) + (1−η^g)(h^g_{t-1} + ∇y g(z_t; ζ) − ∇y g(z_{t-1}; ζ))      eq. (6)
    y_{t+1} = y_t − β_t h^g_t                                                        Alg. 1 l. 4
    h^R_t  = η^R ∇vR(z_t; ψ) + (1−η^R)(h^R_{t-1} + ∇vR(z_t; ψ) − ∇vR(z_{t-1}; ψ))       eq. (7) / (12)
    w_{t+1} = v_t − λ_t h^R_t,  v_{t+1} = Proj_{‖·‖≤r}(w_{t+1})                       Alg. 1 l. 5-6
    h^f_t  = η^f ∇̄f(z_t; ξ̄) + (1−η^f)(h^f_{t-1} + ∇̄f(z_t; ξ̄) − ∇̄f(z_{t-1}; ξ̄))        eq. (10) / (13)
    x_{t+1} = x_t − α_t h^f_t                                                        Alg. 1 l. 7

with ∇vR = ∇yy g·v − ∇y f (eq. (5)) and ∇̄f = ∇x f − ∇xy g·v (eq. (3)); FdeHBO replaces the
two products by central differences at y ± δv (eq. (9), (11)), FMBO computes them exactly.

All state lives in flat contiguous buffers; the elementwise bookkeeping is the fused
``torchbilevel.kernels`` update (Triton on CUDA, plain torch otherwise).
"""
from __future__ import annotations

import collections.abc
import contextlib
import itertools
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import buffers as B
from .. import guards as G
from .. import kernels as K
from .. import randomness as R
from .. import sharding as S
from .. import tree as T
from .. import units as U
from ..derivatives import (choose_pair_batched, exact_products, fd_delta_from_norms, fd_products, gradient,
                           second_order)
from ..problem import (check_params, check_positive, check_problem, check_unit, draw,
                       in_functorch_transform, use_func_mechanism)
from . import donation as D
from .algorithm import Algorithm
from .single_loop_state import RADIUS_WINDOW, SingleLoopState, checkpoint
from .schedule import value_at
from .step_info import StepInfo, norm, one_step_solve, reply


def _flat(fn, lx, ly):
    """fn on flat buffers: (xf, yf, batch) -> fn(unravel(xf), unravel(yf), batch); on sharded
    layouts, the mean over ranks of fn at the DTensors the local shards make up
    (torchbilevel.sharding.objective)."""
    if lx.shards is not None or ly.shards is not None:
        fn = S.objective(fn, lx, ly)
    return lambda xf, yf, batch: fn(lx.unravel(xf), ly.unravel(yf), batch)


class _Evaluations(NamedTuple):
    gy: Tensor      # (2, d): ∇y g at cur, prev on ζ
    gy_prod: Tensor  # (2, d): ∇yy g·v at cur, prev (FD eq. (9) for FdeHBO, exact for FMBO)
    gx_prod: Tensor  # (2, p): ∇xy g·v at cur, prev (FD eq. (11) for FdeHBO, exact for FMBO)
    fx: Tensor      # (2, p): ∇x f at cur, prev
    fy: Tensor      # (2, d): ∇y f at cur, prev
    losses: Optional[Tensor] = None   # (2,): g(cur; ζ) (or the ± pair's mean), f(cur; ψ)


def single_loop(problem, *, fd: bool, lr_x, lr_y, lr_v, eta_x, eta_y, eta_v, radius,
                delta=None, backend: str = "auto", batched: Optional[bool] = None,
                independent_outer_sample: bool = False, check_finite: bool = True,
                name: str = "single_loop") -> Algorithm:
    """Build FdeHBO (``fd=True``) or FMBO (``fd=False``); see :func:`torchbilevel.fdehbo`."""
    check_problem(problem)
    lr_x = check_positive(lr_x, "lr_x", allow_schedule=True)
    lr_y = check_positive(lr_y, "lr_y", allow_schedule=True)
    lr_v = check_positive(lr_v, "lr_v", allow_schedule=True)
    eta_x = check_unit(eta_x, "eta_x", allow_schedule=True)
    eta_y = check_unit(eta_y, "eta_y", allow_schedule=True)
    eta_v = check_unit(eta_v, "eta_v", allow_schedule=True)
    momentum_free = all(not callable(e) and e == 1.0 for e in (eta_x, eta_y, eta_v))
    if radius is None:
        raise ValueError("radius must be a number > 0 (float('inf') disables the projection)")
    radius = float("inf") if radius == float("inf") else check_positive(radius, "radius")
    if delta is not None:
        if not fd:
            raise ValueError("delta is a finite-difference step: FMBO uses exact products and takes no delta")
        delta = check_positive(delta, "delta")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    f_flat_src, g_flat_src = problem.outer, problem.inner

    def init(x, y, v=None, inner_batch=None) -> SingleLoopState:
        """Initial state from dicts x, y (and optionally v; default 0).  Copies the inputs.

        ``inner_batch`` (optional, FdeHBO; a batch, not an iterator): make the run's
        first-step decisions here, eagerly, from this sample's shapes (see
        :class:`SingleLoopState`), so that ``torch.compile(algo.step, fullgraph=True)``
        never meets them (otherwise the first step takes them: a graph break there)."""
        check_params(x, y)
        if not fd:
            S.refuse(name, x, y)        # exact products: a double backward through FSDP's collectives
        if S.is_sharded(x, y) or problem.reduce is not None:
            # every rank shards the same keys (a data-parallel problem: every rank is here)
            S.check_consistent("x", x)
            S.check_consistent("y", y)
            if v is not None and S.is_sharded(y) and not S.is_sharded(v):
                raise ValueError("v: y is sharded (DTensors) but v is not: pass v shaped like y (its DTensors, "
                                 "e.g. from a previous state.v) or leave it None")
        if check_finite and not in_functorch_transform():
            bad = G.check_inputs(x=S.to_local(x), y=S.to_local(y), v=None if v is None else S.to_local(v))
            if bad is not None:
                raise FloatingPointError(f"{name} init: {bad} holds NaN/inf")
        if inner_batch is not None and isinstance(inner_batch, collections.abc.Iterator):
            raise TypeError("init(inner_batch=...) takes one batch (used for its shapes), not an iterator")
        xf, lx = T.ravel(x)
        yf, ly = T.ravel(y)
        if v is None:
            vf = torch.zeros_like(yf)
        else:
            T.check_same_keys(v, y, "v and y")
            vf = T.ravel_like(ly, v).to(yf.dtype).clone()
        zero = lambda t: torch.zeros_like(t)
        hits = torch.zeros((), dtype=torch.int64, device=yf.device)
        recent = torch.zeros((), dtype=torch.float32, device=yf.device)
        s = SingleLoopState(xf, yf, vf, zero(xf), zero(yf), zero(yf), xf, yf, vf, 0.0, 0, lx, ly, hits, recent,
                            pair_mode=batched if fd else None, gy_from_pair=None if fd else False)
        if inner_batch is not None and fd:
            with B.frozen():
                s = decide(s, inner_batch)[0]
        return s

    @torch.compiler.disable
    def decide(s: SingleLoopState, inner_batch):
        """FdeHBO's per-run decisions (fields of the state), taken once, eagerly, from one
        sample of ``inner_batch`` (an iterator's sample is put back in front of it): the
        pair mode by the FLOP rule of ``derivatives.choose_pair_batched`` (unless the user
        fixed ``batched``), and whether g has running statistics (one plain forward, buffers
        frozen, random stream as found).  Under torch.compile this is a graph break at the
        first step only.  Returns (state, batch)."""
        first = draw(inner_batch, "inner_batch")
        if isinstance(inner_batch, collections.abc.Iterator):
            inner_batch = itertools.chain([first], inner_batch)
        g = _flat(g_flat_src, s.layout_x, s.layout_y)
        pair = s.pair_mode
        if s.layout_x.shards is not None or s.layout_y.shards is not None:
            pair = False                # no vmap over collectives: two evaluations
        state = R.capture(s.xf)
        try:
            if pair is None:
                pair = choose_pair_batched(g, s.xf, s.yf, s.vf, first, fd_step(s.yf, s.vf, s.layout_y))
            calls = B.train_buffer_calls()
            with torch.no_grad(), U.compute_dtypes() as compute:
                g(s.xf, s.yf, first)
            stats = B.train_buffer_calls() != calls
        finally:
            R.restore(state)
        half = sorted(str(d) for d in compute if torch.finfo(d).bits < 32)
        if half and delta is None:
            # δ's default is balanced for y's dtype: in bfloat16 compute the products lose
            # most digits (measured 0.23 relative error; bench/mixed_precision.py)
            raise ValueError(
                f"{name}: the model computes in {', '.join(half)} (FSDP2 MixedPrecisionPolicy param_dtype) while "
                f"the default finite-difference step delta is chosen for y's dtype ({s.yf.dtype}): the "
                f"finite-difference products would lose most digits (measured 0.23 relative error in bfloat16). "
                f"Pass delta explicitly (delta = 0.1/‖v‖ measured 1.2e-2), use a method without finite "
                f"differences (tb.first_order(), tb.pzobo(...), tb.bome: 4e-3 to 1.4e-2 measured), or compute "
                f"in float32 (no param_dtype)")
        return s._replace(pair_mode=bool(pair), gy_from_pair=not stats), inner_batch

    def fd_step(yf, vf, ly):
        """δ_t: the user's delta (a float), or the scale-aware default of derivatives.fd_delta
        as a 0-d float32/float64 tensor that stays on the device (no host read, so the step
        compiles to one graph and never synchronises; the same value as its float)."""
        if delta is not None:
            return delta
        work = torch.float64 if yf.dtype == torch.float64 else torch.float32
        if ly.shards is not None:       # norms over every rank's shard: one all-reduce
            sq = S.global_sqnorms(ly, yf, vf)
            numel = sum(int(spec[2].numel()) if spec is not None else int(torch.Size(sh).numel())
                        for spec, sh in zip(ly.shards, ly.shapes))
            return fd_delta_from_norms(sq[0].sqrt().to(work), sq[1].sqrt().to(work), yf.dtype, numel)
        return fd_delta_from_norms(torch.linalg.vector_norm(yf.to(work)), torch.linalg.vector_norm(vf.to(work)),
                                   yf.dtype, yf.numel())

    def evaluate(s: SingleLoopState, first: bool, d_cur, inner_batch, outer_batch, sink):
        """All gradient evaluations of one step: at the current iterate (point 0) and (t ≥ 1)
        at the previous one (point 1) on the current samples, as eq. (6), (7), (10) require.
        Each gradient goes to ``sink(point, n_points)(name, tensor)`` as it is computed
        (names ``gy``, ``fx``, ``fy``, ``hv``, ``jv``: ∇y g on ζ, ∇x f, ∇y f, ∇yy g·v, ∇xy g·v).
        Returns (the current point's losses (g, f), the pair mode that ran)."""
        pair_mode = [s.pair_mode]
        lx, ly = s.layout_x, s.layout_y
        g = _flat(g_flat_src, lx, ly)
        f = _flat(f_flat_src, lx, ly)
        zeta = draw(inner_batch, "inner_batch")                              # ζ_t: the y update's sample
        psi_g, psi_f = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")   # ψ_t: the linear system's sample
        if independent_outer_sample:
            xi_g, xi_f = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")  # ξ̄_t: the outer gradient's sample
        else:
            xi_g, xi_f = psi_g, psi_f
        points = [(s.xf, s.yf, s.vf, d_cur)]
        if not first and not momentum_free:
            # (with every η the constant 1 the momentum brackets are multiplied by 0: the
            # previous iterate is not evaluated, prev rows = cur rows, half the cost)
            points.append((s.x_prev, s.y_prev, s.v_prev, s.delta_prev))

        # FdeHBO with ζ_t = ψ_t (one batch for both): ∇y g(·; ζ) from the ± pair's gradients,
        # (∇y g(y+δv) + ∇y g(y−δv))/2 = ∇y g(y) + O(δ²) (float32 error measured at the level
        # of the gradient's own rounding, bench/RESULTS.md §7): no separate forward of g.  Only
        # for objectives without running statistics (state.gy_from_pair, decided once), since
        # that evaluation is the one that updates them.  Under torch.func transforms and
        # torch.compile the mean's second backward is unavailable: ∇y g is evaluated directly.
        pair_gy = (fd and zeta is psi_g and s.gy_from_pair is True and not use_func_mechanism())

        def at(point, current: bool, put):
            """Evaluate one point; hand each gradient to ``put(name, tensor)`` as soon as it
            is computed (so it can be consumed and freed before the next evaluation runs);
            return the losses (g, f) of the point."""
            xf, yf, vf, dl = point
            # running statistics move once per step, from the y update's evaluation at the
            # current iterate; every other evaluation of the step leaves buffers as they are
            if not pair_gy:
                with (B.updating() if current else contextlib.nullcontext()):
                    g_val, (gy,) = gradient(g, xf, yf, zeta, argnums=1)            # ∇y g(·; ζ)
                put("gy", gy)
                del gy
            f_val, (fx_i, fy_i) = gradient(f, xf, yf, psi_f)                       # ∇f(·; ψ)
            if xi_f is not psi_f:
                fx_i = gradient(f, xf, yf, xi_f, argnums=0)[1][0]                  # ∇x f(·; ξ̄)
            put("fx", fx_i)
            put("fy", fy_i)
            del fx_i, fy_i
            if fd:
                # eq. (9), (11): one reverse pass of (g(y+δv) − g(y−δv))/2δ gives both
                both = xi_g is psi_g
                pr = fd_products(g, xf, yf, vf, psi_g, delta=dl, batched=pair_mode[0],
                                 wrt=(0, 1) if both else (1,), with_grad_y=pair_gy,
                                 exact_zero=ly.shards is None)   # a zero local shard ≠ a zero v
                if pair_gy:
                    put("gy", pr.grad_y)
                    g_val = pr.value
                if pr.batched is False:
                    pair_mode[0] = False       # a vmap fallback is remembered for the run
                put("hv", pr.hvp)
                jv_i = pr.mixed
                del pr
                if not both:
                    jv_i = fd_products(g, xf, yf, vf, xi_g, delta=dl, batched=pair_mode[0], wrt=(0,),
                                       exact_zero=ly.shards is None).mixed
            else:
                jv_i, hv_i = exact_products(g, xf, yf, vf, psi_g)                  # one backward
                put("hv", hv_i)
                del hv_i
                if xi_g is not psi_g:
                    jv_i = exact_products(g, xf, yf, vf, xi_g)[0]
            put("jv", jv_i)
            work = torch.promote_types(g_val.dtype, f_val.dtype)
            return torch.stack([g_val.to(work), f_val.to(work)])

        # one sample = one batch and one random stream: the current and the previous
        # iterate replay the same dropout masks on ζ, ψ (and ξ̄), as eq. (6), (7), (10) need
        calls = [lambda p=p, i=i: at(p, i == 0, sink(i, len(points))) for i, p in enumerate(points)]
        losses = R.replaying(R.capture(s.xf), calls)
        return losses[0], pair_mode[0]

    def rows_sink(s: SingleLoopState, func: bool):
        """The sink of :func:`evaluate` that fills the fused kernels' stacked rows and the
        :class:`_Evaluations` it returns (``ev()``).  Eager: rows allocated once and written
        as each gradient returns, so it is freed at once (no list of rows, stack and
        concatenation beside each other: 8 extra vectors of x at peak).  Under torch.func
        transforms / torch.compile (``func``): pure, the rows stacked at the end."""
        slot = {"gy": ("y", 0), "hv": ("y", 2), "fy": ("y", 4), "fx": ("x", 0), "jv": ("x", 2)}
        if func:
            got = {k: [None, None] for k in slot}

            def sink(i, n):
                def put(name, t):
                    got[name][i] = t
                return put

            def ev(loss):
                stack = lambda two: torch.stack(two if two[1] is not None else [two[0]] * 2)  # prev = cur
                return _Evaluations(stack(got["gy"]), stack(got["hv"]), stack(got["jv"]), stack(got["fx"]),
                                    stack(got["fy"]), loss)
            return sink, ev
        rows = {"y": s.yf.new_empty((6,) + tuple(s.yf.shape)),     # gy, gy', Hv, Hv', fy, fy'
                "x": s.xf.new_empty((4,) + tuple(s.xf.shape))}     # fx, fx', Jv, Jv'

        def sink(i, n):
            def put(name, t):
                side, base = slot[name]
                for j in ((0, 1) if n == 1 else (i,)):           # prev = cur: t = 0, or every η = 1
                    rows[side][base + j].copy_(t)
            return put

        def ev(loss):
            ry, rx = rows["y"], rows["x"]
            return _Evaluations(ry[0:2], ry[2:4], rx[2:4], rx[0:2], ry[4:6], loss)
        return sink, ev

    def stack_rows(ev: _Evaluations):
        """The stacked gradient buffers of torchbilevel.kernels (products layout, fd=False):
        rows_y = [gy_cur, gy_prev, Hv_cur, Hv_prev, fy_cur, fy_prev],
        rows_x = [fx_cur, fx_prev, Jv_cur, Jv_prev]; the buffers themselves when ``ev`` holds
        views of them (:func:`evaluate`), no copy."""
        by, bx = ev.gy._base, ev.fx._base
        if (by is not None and bx is not None and by.dim() == 2 and by.shape[0] == 6 and bx.dim() == 2
                and bx.shape[0] == 4 and ev.gy.data_ptr() == by.data_ptr()
                and ev.gy_prod.data_ptr() == by[2].data_ptr() and ev.fy.data_ptr() == by[4].data_ptr()
                and ev.fx.data_ptr() == bx.data_ptr() and ev.gx_prod.data_ptr() == bx[2].data_ptr()):
            return by, bx          # the row buffers of evaluate (not views of another buffer)
        rows_y = torch.cat([ev.gy, ev.gy_prod, ev.fy]).to(ev.gy.dtype)
        rows_x = torch.cat([ev.fx, ev.gx_prod]).to(ev.fx.dtype)
        return rows_y.contiguous(), rows_x.contiguous()

    def diagnose(ev: _Evaluations) -> str:
        parts = [("the inner gradient ∇y g (y update)", ev.gy),
                 ("the linear-system products " + ("(finite-difference ∇yy g·v and ∇xy g·v)" if fd
                                                   else "(exact ∇yy g·v and ∇xy g·v)"),
                  torch.cat([ev.gy_prod.flatten(), ev.gx_prod.flatten()])),
                 ("the outer gradient ∇f", torch.cat([ev.fx.flatten(), ev.fy.flatten()]))]
        for what, t in parts:
            if not bool(torch.isfinite(t).all()):
                return what
        return "the update (step sizes too large: the iterates overflowed)"

    def warn_radius(recent, w_sq, t) -> bool:
        """Warn (once per run: the caller records it in the state) when the projection bound
        in most recent steps; True if it warned."""
        frac, norm_w = (float(a) for a in torch.stack([recent.float(), w_sq.float().sqrt()]).tolist())
        frac /= 1.0 - (1.0 - 1.0 / RADIUS_WINDOW) ** (t + 1)     # the average starts at 0: unbias it
        if frac > 0.5:
            warnings.warn(
                f"{name}: the projection of v on the ball of radius={radius:g} bound in {frac:.0%} of the "
                f"last ~{RADIUS_WINDOW} steps (step {t}; ‖v‖ would be {norm_w:.3g} unprojected). Theorem 1 "
                f"needs radius ≥ ‖v*‖ with ∇yy g·v* = ∇y f (≈ ‖∇y f‖/μ_g): a clipped v biases the "
                f"hypergradient. Estimate ‖v*‖ with a few CG steps (tb.hypergrad(problem, "
                f"tb.aid(tb.cg(steps=20)), has_aux=True) gives aux.v) and pass radius ≈ 2‖v*‖.",
                RuntimeWarning, stacklevel=5)
            return True
        return False

    def step(s: SingleLoopState, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        """One step of Alg. 1 (FdeHBO) / Alg. 2 (FMBO); returns the new state, never
        modifies ``s`` (a FloatingPointError leaves it usable, and the random stream where
        it was).  ``has_aux=True`` returns ``(state, StepInfo)``: g(x_t, y_t; ζ_t) (FdeHBO
        taking ∇y g from the ± pair: the pair's mean (g(y_t+δv_t) + g(y_t−δv_t))/2 on ψ_t = ζ_t),
        f(x_t, y_t; ψ_t), ‖h^f_t‖, δ_t (FdeHBO), whether the projection bound, ‖w_{t+1}‖, and
        the linear system's report at v_t on ψ_t (``step_info.one_step_solve``).

        ``donate=True`` hands ``s`` over: the new state is written into its buffers, each
        gradient accumulated into the momenta as its evaluation returns (no stacked rows, no
        second state), and ``s`` is consumed (see :mod:`torchbilevel.optim.donation`)."""
        if not isinstance(s, SingleLoopState):
            raise TypeError(f"state must come from init(), got {type(s).__name__}")
        donate = D.check(donate, name, s)
        with R.restored_on_error(s.xf), B.transaction(), B.frozen(), \
                (contextlib.nullcontext() if fd else second_order(name)):
            inner_batch, outer_batch = problem.check_uses(s.x, s.y, inner_batch, outer_batch)
            if fd and (s.pair_mode is None or s.gy_from_pair is None) and not in_functorch_transform():
                s, inner_batch = decide(s, inner_batch)
            return (_donated_step if donate else _step)(s, inner_batch, outer_batch, has_aux)

    def _step(s: SingleLoopState, inner_batch, outer_batch, has_aux: bool = False):
        t = s.step
        first = t == 0
        d_cur = fd_step(s.yf, s.vf, s.layout_y) if fd else 1.0
        sink, rows = rows_sink(s, use_func_mechanism())
        losses, pair_mode = evaluate(s, first, d_cur, inner_batch, outer_batch, sink)
        ev = rows(losses)
        if problem.reduce is not None and not sharded(s):   # (sharded: already the mean over ranks)
            # data parallel: every gradient row of the step in one flat buffer, one all-reduce
            ev = _Evaluations(*problem.average(*ev))
        rows_y, rows_x = stack_rows(ev)
        # the linear system's report at v_t, read before the update (which may reuse v_t's buffer)
        solve = one_step_solve(s.vf, ev.gy_prod[0], ev.fy[0], s.layout_y) if has_aux else None
        # "The first step, with no previous iterate, uses the plain stochastic gradients":
        # η = 1 zeroes the momentum bracket (prev rows equal cur rows there).
        e = (lambda sch, nm: 1.0) if first else (lambda sch, nm: value_at(sch, t, nm, unit=True))
        y_new, w, h_g, h_R, w_sq = K.inner_update(
            s.yf, s.vf, s.h_g, s.h_R, rows_y, beta=value_at(lr_y, t, "lr_y"), lam=value_at(lr_v, t, "lr_v"),
            eta_g=e(eta_y, "eta_y"), eta_R=e(eta_v, "eta_v"), scale_cur=1.0, scale_prev=1.0,
            fd=False, backend=backend)
        if s.layout_y.shards is not None and radius != float("inf"):
            w_sq = S.global_sqnorms(s.layout_y, w)[0].to(w_sq.dtype)     # ‖w‖² over every rank's shard
        v_new = K.project_ball(w, w_sq, radius, backend=backend)
        x_new, h_f = K.outer_update(
            s.xf, s.h_f, rows_x, alpha=value_at(lr_x, t, "lr_x"), eta_f=e(eta_x, "eta_x"),
            scale_cur=1.0, scale_prev=1.0, fd=False, backend=backend)
        new = SingleLoopState(x_new, y_new, v_new, h_f, h_g, h_R, s.xf, s.yf, s.vf,
                              d_cur, t + 1, s.layout_x, s.layout_y, s.ball_hits, s.ball_recent,
                              pair_mode=pair_mode, gy_from_pair=s.gy_from_pair, warned=s.warned)
        return finish(s, new, w_sq, ev.losses, solve, has_aux, lambda: diagnose(ev))

    def _donated_step(s: SingleLoopState, inner_batch, outer_batch, has_aux: bool = False):
        """The step written into the donated state's buffers.  The momenta are scaled by
        (1 − η) first, then each gradient is added with its sign and weight the moment it
        returns (eq. (6), (7), (10) term by term: h ← (1−η)h + a_t − (1−η)a_{t−1}); the
        iterates move in place; the new previous iterate is the old iterate's buffer."""
        t = s.step
        first = t == 0
        d_cur = fd_step(s.yf, s.vf, s.layout_y) if fd else 1.0
        D.take(s)                        # consumed from here on, whatever happens
        keep = (lambda sch, nm: 0.0) if first else (lambda sch, nm: 1.0 - value_at(sch, t, nm, unit=True))
        k = {"f": keep(eta_x, "eta_x"), "g": keep(eta_y, "eta_y"), "R": keep(eta_v, "eta_v")}
        h = {"f": s.h_f, "g": s.h_g, "R": s.h_R}
        for key, hk in h.items():
            hk.zero_() if k[key] == 0.0 else hk.mul_(k[key])
        # name -> (momentum, sign): h_g += ∇y g; h_R += ∇yy g·v − ∇y f (eq. (5)); h_f += ∇x f − ∇xy g·v (eq. (3))
        target = {"gy": ("g", 1.0), "hv": ("R", 1.0), "fy": ("R", -1.0), "fx": ("f", 1.0), "jv": ("f", -1.0)}
        data_parallel = problem.reduce is not None and not sharded(s)
        finite = {}                      # stage -> 0-d bool, read only after a failure
        kept = {}                        # has_aux: ∇y f and ∇yy g·v at the current point

        def sink(i, n):
            def put(name, term):
                if data_parallel:        # one all-reduce per gradient (no buffer of the step's rows)
                    (term,) = problem.average(term)
                if check_finite:
                    finite[name] = finite.get(name, True) & torch.isfinite(term).all()
                if has_aux and i == 0 and name in ("fy", "hv"):
                    kept[name] = term
                key, sign = target[name]
                weight = sign if i == 0 else -sign * k[key]     # the previous point: −(1−η)·a_{t−1}
                if weight != 0.0:
                    h[key].add_(term.to(h[key].dtype), alpha=weight)
            return put

        losses, pair_mode = evaluate(s, first, d_cur, inner_batch, outer_batch, sink)
        if data_parallel:
            (losses,) = problem.average(losses)
        solve = one_step_solve(s.vf, kept["hv"], kept["fy"], s.layout_y) if has_aux else None
        kept.clear()
        # y_{t+1} = y_t − β h^g_t, w = v_t − λ h^R_t (Alg. 1 l. 4-5), x_{t+1} = x_t − α h^f_t (l. 7),
        # each into the previous iterate's buffer (free now); the old iterate becomes the previous one
        y_new = into(s.y_prev, s.yf, s.h_g, -value_at(lr_y, t, "lr_y"))
        w = into(s.v_prev, s.vf, s.h_R, -value_at(lr_v, t, "lr_v"))
        x_new = into(s.x_prev, s.xf, s.h_f, -value_at(lr_x, t, "lr_x"))
        w_sq = (S.global_sqnorms(s.layout_y, w)[0] if s.layout_y.shards is not None else K.reference.sqnorm(w))
        w_sq = w_sq.to(K.reference.compute_dtype(w.dtype))
        if radius != float("inf"):       # Alg. 1 l. 6, in place: w·r/max(‖w‖, r)
            w.mul_(K.reference.ball_factor(w_sq, radius, w_sq.dtype))
        f = D.fresh
        new = SingleLoopState(f(x_new), f(y_new), f(w), f(s.h_f), f(s.h_g), f(s.h_R), f(s.xf), f(s.yf), f(s.vf),
                              d_cur, t + 1, s.layout_x, s.layout_y, f(s.ball_hits), f(s.ball_recent),
                              pair_mode=pair_mode, gy_from_pair=s.gy_from_pair, warned=s.warned)
        return finish(s, new, w_sq, losses, solve, has_aux, lambda: donated_diagnosis(finite))

    def into(prev, cur, h, alpha):
        """cur + alpha·h written into ``prev``'s buffer (out of place where the two share it,
        as after init, where the previous iterate is the iterate itself)."""
        if prev.untyped_storage().data_ptr() == cur.untyped_storage().data_ptr():
            return torch.add(cur, h, alpha=alpha)
        return torch.add(cur, h, alpha=alpha, out=prev)

    def donated_diagnosis(finite) -> str:
        names = {"gy": "the inner gradient ∇y g (y update)",
                 "hv": "the linear-system products " + ("(finite-difference ∇yy g·v)" if fd else "(exact ∇yy g·v)"),
                 "jv": "the linear-system products " + ("(finite-difference ∇xy g·v)" if fd else "(exact ∇xy g·v)"),
                 "fx": "the outer gradient ∇f", "fy": "the outer gradient ∇f"}
        for key in ("gy", "hv", "jv", "fx", "fy"):
            if key in finite and not bool(finite[key]):
                return names[key]
        return "the update (step sizes too large: the iterates overflowed)"

    def sharded(s) -> bool:
        return s.layout_x.shards is not None or s.layout_y.shards is not None

    def finish(s, new, w_sq, losses, solve, has_aux, where):
        """The radius bookkeeping, the finite check (one host read) and the reply, shared by
        both steps; ``s`` is the state passed in (for the message), ``where()`` names the
        stage after a failure."""
        t = s.step
        hits, recent, warned = new.ball_hits, new.ball_recent, new.warned
        if radius != float("inf") and hits is not None:
            bound = (w_sq > radius * radius)
            hits = hits + bound.to(hits.dtype)
            recent = recent + (bound.to(recent.dtype) - recent) / RADIUS_WINDOW
            if (not warned and (t + 1) % RADIUS_WINDOW == 0 and not in_functorch_transform()
                    and not torch.compiler.is_compiling()):
                warned = warn_radius(recent, w_sq, t)
        if check_finite and not in_functorch_transform():
            # one fused reduction and one host read per step
            probe = w_sq.float() + new.xf.float().sum() + new.yf.float().sum()
            if not bool(torch.isfinite(probe)):
                if D.consumed(s):
                    raise FloatingPointError(
                        f"{name} step {t}: NaN/inf arose in {where()}; the state was donated (donate=True) "
                        f"and holds the failed update: resume from a checkpoint, or step without donation "
                        f"where a failure must leave the state usable")
                bad = G.locate(None, where(), **{f"state.{k}": getattr(s, k)
                                                 for k in ("xf", "yf", "vf", "h_f", "h_g", "h_R")})
                raise FloatingPointError(f"{name} step {t}: NaN/inf arose in {bad}; "
                                         "the state passed in is unchanged")
        new = new._replace(ball_hits=hits, ball_recent=recent, warned=warned)
        return reply(new, has_aux, lambda: StepInfo(
            inner_loss=losses[0], outer_loss=losses[1], hypergrad_norm=norm(new.h_f, s.layout_x),
            delta=torch.as_tensor(new.delta_prev, dtype=torch.float64 if new.yf.dtype == torch.float64
                                  else torch.float32, device=new.yf.device) if fd else None,
            projected=w_sq > radius * radius, v_norm=w_sq.sqrt(),
            solve=solve))

    state_dict, load_state_dict = checkpoint(name)

    return Algorithm(init, step, state_dict, load_state_dict, name)
