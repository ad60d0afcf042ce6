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

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from .. import guards as G
from .. import kernels as K
from .. import tree as T
from ..derivatives import fd_delta_from_norms, gradient
from ..problem import (check_params, check_positive, check_problem, check_unit, draw,
                       in_functorch_transform, use_func_mechanism)
from .algorithm import Algorithm
from .schedule import value_at


class SingleLoopState(NamedTuple):
    """State of FdeHBO / FMBO in flat buffers.

    ``state.x``, ``state.y``, ``state.v`` give dicts (views of the flat buffers).
    Fields: flat iterates ``xf, yf, vf``; momenta ``h_f, h_g, h_R``; the previous iterate
    ``x_prev, y_prev, v_prev`` and its finite-difference step ``delta_prev``; ``step`` t;
    the dict layouts ``layout_x, layout_y``.
    """
    xf: Tensor
    yf: Tensor
    vf: Tensor
    h_f: Tensor
    h_g: Tensor
    h_R: Tensor
    x_prev: Tensor
    y_prev: Tensor
    v_prev: Tensor
    delta_prev: float
    step: int
    layout_x: T.Raveled
    layout_y: T.Raveled

    @property
    def x(self) -> T.Tree:
        return self.layout_x.unravel(self.xf)

    @property
    def y(self) -> T.Tree:
        return self.layout_y.unravel(self.yf)

    @property
    def v(self) -> T.Tree:
        return self.layout_y.unravel(self.vf)


def _flat(fn, lx, ly):
    """fn on flat buffers: (xf, yf, batch) -> fn(unravel(xf), unravel(yf), batch)."""
    return lambda xf, yf, batch: fn(lx.unravel(xf), ly.unravel(yf), batch)


def _points(fun, batched: bool, *stacks):
    """Evaluate ``fun(*row)`` at each row of the stacked inputs: one vmap call or a loop.
    Returns stacked outputs (tuples stacked elementwise)."""
    if batched:
        return vmap(fun)(*stacks)
    outs = [fun(*row) for row in zip(*stacks)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


class _Evaluations(NamedTuple):
    gy: Tensor      # (2, d): ∇y g at cur, prev on ζ
    gy_prod: Tensor  # (4, d) fd: ∇y g at cur±, prev± ; (2, d) exact: ∇yy g·v at cur, prev
    gx_prod: Tensor  # (4, p) fd: ∇x g at cur±, prev± ; (2, p) exact: ∇xy g·v at cur, prev
    fx: Tensor      # (2, p): ∇x f at cur, prev
    fy: Tensor      # (2, d): ∇y f at cur, prev


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

    def init(x, y, v=None) -> SingleLoopState:
        """Initial state from dicts x, y (and optionally v; default 0).  Copies the inputs."""
        check_params(x, y)
        if check_finite and not in_functorch_transform():
            bad = G.check_inputs(x=x, y=y, v=v)
            if bad is not None:
                raise FloatingPointError(f"{name} init: {bad} holds NaN/inf")
        xf, lx = T.ravel(x)
        yf, ly = T.ravel(y)
        if v is None:
            vf = torch.zeros_like(yf)
        else:
            T.check_same_keys(v, y, "v and y")
            vf = T.ravel_like(ly, v).to(yf.dtype).clone()
        zero = lambda t: torch.zeros_like(t)
        return SingleLoopState(xf, yf, vf, zero(xf), zero(yf), zero(yf), xf, yf, vf, 0.0, 0, lx, ly)

    def fd_step(yf, vf) -> float:
        """δ_t: the user's delta, or the scale-aware default of derivatives.fd_delta."""
        if delta is not None:
            return delta
        work = torch.float64 if yf.dtype == torch.float64 else torch.float32
        d = fd_delta_from_norms(torch.linalg.vector_norm(yf.to(work)), torch.linalg.vector_norm(vf.to(work)),
                                yf.dtype)
        return float(d)          # one host read per step; pass delta= to avoid it

    def evaluate(s: SingleLoopState, first: bool, d_cur: float, use_vmap: bool, inner_batch, outer_batch):
        lx, ly = s.layout_x, s.layout_y
        g = _flat(g_flat_src, lx, ly)
        f = _flat(f_flat_src, lx, ly)
        zeta = draw(inner_batch)                          # ζ_t: the y update's sample
        psi_g, psi_f = draw(inner_batch), draw(outer_batch)   # ψ_t: the linear system's sample
        if independent_outer_sample:
            xi_g, xi_f = draw(inner_batch), draw(outer_batch)  # ξ̄_t: the outer gradient's sample
        else:
            xi_g, xi_f = psi_g, psi_f
        xs = s.xf.unsqueeze(0) if first else torch.stack([s.xf, s.x_prev])
        ys = s.yf.unsqueeze(0) if first else torch.stack([s.yf, s.y_prev])
        vs = s.vf.unsqueeze(0) if first else torch.stack([s.vf, s.v_prev])

        mode = "func" if use_vmap else "auto"       # autograd outside vmap: measured faster

        def grad_of(fn, argnums, batch):
            def at(xf, yf):
                gr = gradient(fn, xf, yf, batch, argnums=argnums, mode=mode)[1]
                return gr[0] if len(gr) == 1 else gr
            return at

        gy = _points(grad_of(g, (1,), zeta), use_vmap, xs, ys)
        fx, fy = _points(grad_of(f, (0, 1), psi_f), use_vmap, xs, ys)
        if xi_f is not psi_f:
            fx = _points(grad_of(f, (0,), xi_f), use_vmap, xs, ys)
        if fd:
            deltas = [d_cur] if first else [d_cur, s.delta_prev]
            # points z ± δ v for cur (and prev): rows cur+, cur−, prev+, prev−;
            # the perturbation is formed in float32 (float64 for float64 y), then stored
            work = torch.float64 if s.yf.dtype == torch.float64 else torch.float32
            sgn_d = torch.tensor([sg * dd for dd in deltas for sg in (1.0, -1.0)], dtype=work, device=s.yf.device)
            rep = lambda t: t.repeat_interleave(2, dim=0)
            yp = (rep(ys).to(work) + sgn_d.unsqueeze(1) * rep(vs).to(work)).to(s.yf.dtype)
            xp = rep(xs)
            if xi_g is psi_g:
                gxp, gyp = _points(grad_of(g, (0, 1), psi_g), use_vmap, xp, yp)
            else:
                gyp = _points(grad_of(g, (1,), psi_g), use_vmap, xp, yp)
                gxp = _points(grad_of(g, (0,), xi_g), use_vmap, xp, yp)
        else:
            def products(batch):
                def at(xf, yf, vf):
                    if use_vmap or use_func_mechanism():   # vmap, torch.func, torch.compile
                        _, pull = vjp(lambda a, b: grad(g, argnums=1)(a, b, batch), xf, yf)
                        return pull(vf)                    # one backward: (∇xy g·v, ∇yy g·v)
                    # autograd: ∇y g with its graph kept, then one backward gives both
                    xr, yr = xf.detach().requires_grad_(True), yf.detach().requires_grad_(True)
                    with torch.enable_grad():
                        (gyr,) = torch.autograd.grad(g(xr, yr, batch), [yr], create_graph=True)
                        jv, hv = torch.autograd.grad(gyr, [xr, yr], vf, allow_unused=True)
                    jv = torch.zeros_like(xf) if jv is None else jv.detach()
                    hv = torch.zeros_like(yf) if hv is None else hv.detach()
                    return jv, hv
                return at
            gxp, gyp = _points(products(psi_g), use_vmap, xs, ys, vs)
            if xi_g is not psi_g:
                gxp, _ = _points(products(xi_g), use_vmap, xs, ys, vs)
        return _Evaluations(gy, gyp, gxp, fx, fy)

    def stack_rows(ev: _Evaluations, first: bool):
        """The stacked gradient buffers of torchbilevel.kernels (prev rows = cur rows at t=0)."""
        dup = (lambda t: torch.cat([t, t])) if first else (lambda t: t)
        if fd:
            gyp = ev.gy_prod if not first else torch.cat([ev.gy_prod, ev.gy_prod])
            gxp = ev.gx_prod if not first else torch.cat([ev.gx_prod, ev.gx_prod])
            rows_y = torch.cat([dup(ev.gy), gyp, dup(ev.fy)])        # (8, d)
            rows_x = torch.cat([dup(ev.fx), gxp])                      # (6, p)
        else:
            rows_y = torch.cat([dup(ev.gy), dup(ev.gy_prod), dup(ev.fy)])   # (6, d)
            rows_x = torch.cat([dup(ev.fx), dup(ev.gx_prod)])               # (4, p)
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

    def step(s: SingleLoopState, inner_batch, outer_batch) -> SingleLoopState:
        """One step of Alg. 1 (FdeHBO) / Alg. 2 (FMBO); returns the new state, never
        modifies ``s`` (a FloatingPointError leaves it usable)."""
        if not isinstance(s, SingleLoopState):
            raise TypeError(f"state must come from init(), got {type(s).__name__}")
        t = s.step
        first = t == 0
        use_vmap = s.xf.is_cuda if batched is None else batched
        d_cur = fd_step(s.yf, s.vf) if fd else 1.0
        ev = evaluate(s, first, d_cur, use_vmap, inner_batch, outer_batch)
        if problem.reduce is not None:
            # data parallel: every gradient row of the step in one flat buffer, one all-reduce
            ev = _Evaluations(*problem.average(*ev))
        rows_y, rows_x = stack_rows(ev, first)
        # "The first step, with no previous iterate, uses the plain stochastic gradients":
        # η = 1 zeroes the momentum bracket (prev rows equal cur rows there).
        e = (lambda sch, nm: 1.0) if first else (lambda sch, nm: value_at(sch, t, nm, unit=True))
        scale_cur = 0.5 / d_cur if fd else 1.0
        scale_prev = (scale_cur if first else 0.5 / s.delta_prev) if fd else 1.0
        y_new, w, h_g, h_R, w_sq = K.inner_update(
            s.yf, s.vf, s.h_g, s.h_R, rows_y, beta=value_at(lr_y, t, "lr_y"), lam=value_at(lr_v, t, "lr_v"),
            eta_g=e(eta_y, "eta_y"), eta_R=e(eta_v, "eta_v"), scale_cur=scale_cur, scale_prev=scale_prev,
            fd=fd, backend=backend)
        v_new = K.project_ball(w, w_sq, radius, backend=backend)
        x_new, h_f = K.outer_update(
            s.xf, s.h_f, rows_x, alpha=value_at(lr_x, t, "lr_x"), eta_f=e(eta_x, "eta_x"),
            scale_cur=scale_cur, scale_prev=scale_prev, fd=fd, backend=backend)
        if check_finite and not in_functorch_transform():
            # one fused reduction and one host read per step
            probe = w_sq.float() + x_new.float().sum() + y_new.float().sum()
            if not bool(torch.isfinite(probe)):
                raise FloatingPointError(f"{name} step {t}: NaN/inf arose in {diagnose(ev)}; "
                                         "the state passed in is unchanged")
        return SingleLoopState(x_new, y_new, v_new, h_f, h_g, h_R, s.xf, s.yf, s.vf,
                               d_cur, t + 1, s.layout_x, s.layout_y)

    def state_dict(s: SingleLoopState) -> dict:
        """Plain dicts, tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
        d = {k: getattr(s, k) for k in SingleLoopState._fields if not k.startswith("layout")}
        for k in ("layout_x", "layout_y"):
            lay = getattr(s, k)
            d[k] = {"keys": list(lay.keys), "shapes": [list(sh) for sh in lay.shapes],
                    "offsets": list(lay.offsets), "numel": lay.numel}
        d["algorithm"] = name
        return d

    def load_state_dict(d: dict) -> SingleLoopState:
        if not isinstance(d, dict) or d.get("algorithm") != name:
            raise ValueError(f"not a {name} checkpoint (expected the dict of state_dict())")
        lay = {k: T.Raveled(tuple(d[k]["keys"]), tuple(torch.Size(sh) for sh in d[k]["shapes"]),
                            tuple(d[k]["offsets"]), d[k]["numel"]) for k in ("layout_x", "layout_y")}
        fields = {k: d[k] for k in SingleLoopState._fields if not k.startswith("layout")}
        return SingleLoopState(**fields, **lay)

    return Algorithm(init, step, state_dict, load_state_dict, name)
