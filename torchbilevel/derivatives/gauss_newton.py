"""Generalized Gauss-Newton products for an inner objective declared as
:class:`torchbilevel.OutputLoss` (g = loss(outputs, x) + regularizer):

    G v = Jᵀ ∇²loss (J v) + ∇yy regularizer · v        (Schraudolph 2002, eq. (7); J = ∂outputs/∂y)

positive semi-definite when the loss is convex in the outputs, so CG on G converges where
∇yy g of a deep network is indefinite.  The mixed product ∇xy g·v stays exact (the full g).

One forward of the network: its graph is kept and every product is backward passes
through it — J v by the double-vjp trick (the vjp u ↦ Jᵀu is linear in u; its vjp along v
is J v), ∇²loss in output space, Jᵀ by one more vjp — so dropout masks and BatchNorm batch
statistics are the same for every product of a solve.
"""
from __future__ import annotations

import torch
from torch.func import grad, grad_and_value, vjp

from .exact import Linearization, dispatch

__all__ = ["gauss_newton_linearize"]


def _zeros_for_none(grads, like):
    return [torch.zeros_like(t) if gi is None else gi for gi, t in zip(grads, like)]


def _autograd_gn(inner, x, y, batch) -> Linearization:
    xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
    yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    xs, ys = list(xr.values()), list(yr.values())
    reg = inner.regularizer
    with torch.enable_grad():
        out = inner.outputs(xr, yr, batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"OutputLoss: outputs(x, y, batch) must return one Tensor, got {type(out).__name__}")
        od = out.detach().requires_grad_(True)
        lval_d = inner.loss(od, {k: t.detach() for k, t in xr.items()}, batch)
        lg = torch.autograd.grad(lval_d, od, create_graph=True)[0]          # ∇loss in output space
        r = reg(xr, yr, batch) if reg is not None else None
        val = inner.loss(out, xr, batch) + (r if r is not None else 0.0)
        gys = _zeros_for_none(torch.autograd.grad(val, ys, create_graph=True, allow_unused=True), ys)
        u = torch.zeros_like(out, requires_grad=True)
        jtu = torch.autograd.grad(out, ys, u, create_graph=True, allow_unused=True)   # Jᵀu, linear in u
        rgy = (torch.autograd.grad(r, ys, create_graph=True, allow_unused=True)
               if r is not None and r.requires_grad else [None] * len(ys))
    jl = [i for i, t in enumerate(jtu) if t is not None and t.requires_grad]
    rl = [i for i, t in enumerate(rgy) if t is not None and t.requires_grad]
    gl = [i for i, t in enumerate(gys) if t.requires_grad]

    def vs_of(v):
        return [v[k] for k in yr]

    def hvp(v):
        vs = vs_of(v)
        with torch.enable_grad():
            if jl:
                (Jv,) = torch.autograd.grad([jtu[i] for i in jl], u, [vs[i] for i in jl], retain_graph=True)
            else:
                Jv = torch.zeros_like(out)
            HJv = (torch.autograd.grad(lg, od, Jv, retain_graph=True)[0] if lg.requires_grad
                   else torch.zeros_like(out))
            Gv = _zeros_for_none(torch.autograd.grad(out, ys, HJv, retain_graph=True, allow_unused=True), ys)
            if rl:
                Rv = torch.autograd.grad([rgy[i] for i in rl], ys, [vs[i] for i in rl], retain_graph=True,
                                         allow_unused=True)
                Gv = [a if b is None else a + b for a, b in zip(Gv, Rv)]
        return {k: t.detach() for k, t in zip(yr, Gv)}

    def mixed(v):
        vs = vs_of(v)
        if not gl:
            return {k: torch.zeros_like(t) for k, t in xr.items()}
        with torch.enable_grad():
            out_x = torch.autograd.grad([gys[i] for i in gl], xs, [vs[i] for i in gl], retain_graph=True,
                                        allow_unused=True)
        return {k: (torch.zeros_like(t) if o is None else o.detach()) for (k, t), o in zip(xr.items(), out_x)}

    return Linearization({k: t.detach() for k, t in zip(yr, gys)}, hvp, mixed, val.detach())


def _func_gn(inner, x, y, batch) -> Linearization:
    # torch.func mechanism (inside vmap/grad): the same products from vjps of one forward
    out, pull = vjp(lambda yy: inner.outputs(x, yy, batch), y)
    _, jpull = vjp(lambda uu: pull(uu)[0], torch.zeros_like(out))              # u ↦ Jᵀu; its vjp is J
    _, lpull = vjp(grad(lambda o: inner.loss(o, x, batch)), out)                   # ∇²loss in output space
    reg = inner.regularizer
    rpull = vjp(lambda yy: grad(reg, argnums=1)(x, yy, batch), y)[1] if reg is not None else None
    gy, xpull, val = vjp(lambda xx: grad_and_value(inner, argnums=1)(xx, y, batch), x, has_aux=True)

    def hvp(v):
        Gv = pull(lpull(jpull(v)[0])[0])[0]
        if rpull is not None:
            Rv = rpull(v)[0]
            Gv = {k: Gv[k] + Rv[k] for k in Gv}
        return Gv

    return Linearization(gy, hvp, lambda v: xpull(v)[0], val)


def gauss_newton_linearize(inner, x, y, batch, mode: str = "auto") -> Linearization:
    """A :class:`Linearization` whose ``hvp`` is the Gauss-Newton product G v and whose
    ``mixed`` is the exact ∇xy g·v, for ``inner`` an :class:`torchbilevel.OutputLoss`.
    ``mode`` as for :func:`torchbilevel.derivatives.linearize`."""
    return dispatch(mode, _autograd_gn, _func_gn)(inner, x, y, batch)
