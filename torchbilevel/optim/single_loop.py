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

All state lives in flat contiguous buffers.  This module evaluates the gradients of a step;
what is done with them is :mod:`torchbilevel.optim.single_loop_update`: the fused
``torchbilevel.kernels`` update (Triton on CUDA, plain torch otherwise) over stacked rows,
or, with ``step(..., donate=True)``, the accumulation into the donated state's buffers.
"""
from __future__ import annotations

import collections.abc
import contextlib
import itertools
from typing import Optional

import torch

from .. import buffers as B
from .. import guards as G
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
from . import single_loop_update as step_update
from .single_loop_state import SingleLoopState, checkpoint


def _on_views(fn, lx, ly):
    """fn on the dict views of flat buffers laid out by ``lx``, ``ly``: fn itself, or on sharded
    layouts the mean over ranks of fn at the DTensors the local shards make up
    (torchbilevel.sharding.objective)."""
    if lx.shards is not None or ly.shards is not None:
        return S.objective(fn, lx, ly)
    return fn


def _flat(fn, lx, ly):
    """fn on flat buffers: (xf, yf, batch) -> fn(unravel(xf), unravel(yf), batch); on sharded
    layouts, the mean over ranks of fn at the DTensors the local shards make up
    (torchbilevel.sharding.objective)."""
    if lx.shards is not None or ly.shards is not None:
        fn = S.objective(fn, lx, ly)
    return lambda xf, yf, batch: fn(lx.unravel(xf), ly.unravel(yf), batch)


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
    cfg = step_update.Settings(name, fd, problem, lr_x, lr_y, lr_v, eta_x, eta_y, eta_v, radius, backend, check_finite)

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
        Each gradient goes to ``sink(point, n_points)(name, dict)`` as it is computed
        (names ``gy``, ``fx``, ``fy``, ``hv``, ``jv``: ∇y g on ζ, ∇x f, ∇y f, ∇yy g·v, ∇xy g·v),
        a dict shaped like x or y: the objectives are differentiated at the dict views of the
        flat buffers, so a gradient arrives key by key, never concatenated (a gradient with
        respect to a flat buffer is its pieces and their concatenation: twice the bytes).
        Returns (the current point's losses (g, f), the pair mode that ran)."""
        pair_mode = [s.pair_mode]
        lx, ly = s.layout_x, s.layout_y
        g, f = _on_views(g_flat_src, lx, ly), _on_views(f_flat_src, lx, ly)
        zeta = draw(inner_batch, "inner_batch")                              # ζ_t: the y update's sample
        psi_g, psi_f = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")   # ψ_t: the linear system's sample
        if independent_outer_sample:
            xi_g, xi_f = draw(inner_batch, "inner_batch"), draw(outer_batch, "outer_batch")  # ξ̄_t: the outer gradient's sample
        else:
            xi_g, xi_f = psi_g, psi_f
        points = [(lx.unravel(s.xf), ly.unravel(s.yf), ly.unravel(s.vf), d_cur)]
        if not first and not momentum_free:
            # (with every η the constant 1 the momentum brackets are multiplied by 0: the
            # previous iterate is not evaluated, prev rows = cur rows, half the cost)
            points.append((lx.unravel(s.x_prev), ly.unravel(s.y_prev), ly.unravel(s.v_prev), s.delta_prev))

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
            if xi_f is psi_f:
                f_val, (fx_i, fy_i) = gradient(f, xf, yf, psi_f)                   # ∇f(·; ψ)
            else:                     # ∇y f on ψ, ∇x f on ξ̄ (never ∇x f on ψ: it is not used)
                f_val, (fy_i,) = gradient(f, xf, yf, psi_f, argnums=1)
                fx_i = gradient(f, xf, yf, xi_f, argnums=0)[1][0]
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
        """The fused update over stacked rows: the new state beside the old."""
        d_cur = fd_step(s.yf, s.vf, s.layout_y) if fd else 1.0
        sink, rows = step_update.rows_sink(s, use_func_mechanism())
        losses, pair_mode = evaluate(s, s.step == 0, d_cur, inner_batch, outer_batch, sink)
        return step_update.finish(cfg, s, *step_update.fused_update(cfg, s, rows(losses), d_cur, pair_mode, has_aux),
                                  has_aux=has_aux)

    def _donated_step(s: SingleLoopState, inner_batch, outer_batch, has_aux: bool = False):
        """The step written into the donated state's buffers (single_loop_update.Donated)."""
        d_cur = fd_step(s.yf, s.vf, s.layout_y) if fd else 1.0
        acc = step_update.Donated(cfg, s, has_aux)
        losses, pair_mode = evaluate(s, s.step == 0, d_cur, inner_batch, outer_batch, acc.sink)
        new, w_sq, losses, solve, where = acc.commit(losses, d_cur, pair_mode)
        return step_update.finish(cfg, s, new, w_sq, losses, solve, where, has_aux=has_aux)

    state_dict, load_state_dict = checkpoint(name)

    return Algorithm(init, step, state_dict, load_state_dict, name)
