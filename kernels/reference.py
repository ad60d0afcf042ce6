"""Plain-torch reference of the fused single-loop updates (FdeHBO Alg. 1, FMBO Alg. 2).

These are the implementations the CPU path runs, and the specification the
Triton kernels are tested against. Same signatures and semantics as the public
functions in :mod:`torchbilevel.kernels` (without ``backend``); arguments are
assumed already validated there.

Arithmetic is done in :func:`compute_dtype` of the storage dtype (float32 for
float16/bfloat16/float32 storage, float64 for float64 storage): the stacked
gradients are upcast once, the 1-D state buffers are promoted on the fly by
the mixed-dtype elementwise ops, and the results are rounded to the storage
dtype once at the end. No input is written to.

The recursive-momentum updates use the algebraically identical form
``eta·a + (1−eta)·(h + a − b) = a + (1−eta)·(h − b)``, which needs one pass
less and returns exactly ``a`` when ``eta = 1`` (finite inputs).
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in for a given storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _sqnorm(w: torch.Tensor) -> torch.Tensor:
    """Σ w² of the stored w, accumulated in its compute dtype, as a 0-d tensor."""
    wc = _store(w, compute_dtype(w.dtype))
    return torch.dot(wc, wc)


def inner_update(y, v, h_g, h_R, grads, *, beta, lam, eta_g, eta_R, scale_cur, scale_prev, fd):
    """Reference of :func:`torchbilevel.kernels.inner_update`; returns (y_new, w, h_g_new, h_R_new, w_sqnorm)."""
    dtype = y.dtype
    g = _store(grads, compute_dtype(dtype))  # upcast the stacked rows once
    if fd:
        # rows 2,4 minus rows 3,5 -> (2, d) = [gp_cur - gm_cur, gp_prev - gm_prev]
        r = torch.sub(g[2:6:2], g[3:6:2])
        r[0].mul_(scale_cur)  # eq. (9): H_cur = (gp_cur − gm_cur) / (2δ_t)
        r[1].mul_(scale_prev)  # eq. (9): H_prev = (gp_prev − gm_prev) / (2δ_{t−1})
        r.sub_(g[6:8])  # eq. (8): R = H − ∇y f, cur and prev
    else:
        r = torch.sub(g[2:4], g[4:6])  # eq. (5): R = ∇yy g·v − ∇y f, cur and prev
    h_g_new = torch.sub(h_g, g[1])
    torch.add(g[0], h_g_new, alpha=1.0 - eta_g, out=h_g_new)  # eq. (6): gy_cur + (1−η_g)(h_g − gy_prev)
    h_R_new = torch.sub(h_R, r[1])
    torch.add(r[0], h_R_new, alpha=1.0 - eta_R, out=h_R_new)  # eq. (7)/(12): R_cur + (1−η_R)(h_R − R_prev)
    y_new = torch.add(y, h_g_new, alpha=-beta)  # Alg. 1 line 4: y − β h_g
    w = torch.add(v, h_R_new, alpha=-lam)  # Alg. 1 line 5: w = v − λ h_R
    w = _store(w, dtype)
    return _store(y_new, dtype), w, _store(h_g_new, dtype), _store(h_R_new, dtype), _sqnorm(w)


def outer_update(x, h_f, grads, *, alpha, eta_f, scale_cur, scale_prev, fd):
    """Reference of :func:`torchbilevel.kernels.outer_update`; returns (x_new, h_f_new)."""
    dtype = x.dtype
    g = _store(grads, compute_dtype(dtype))
    if fd:
        f = torch.sub(g[2:6:2], g[3:6:2])  # (2, p) = [gxp_cur − gxm_cur, gxp_prev − gxm_prev]
        torch.add(g[0], f[0], alpha=-scale_cur, out=f[0])  # eq. (11), (3): F_cur = ∇x f − J̃_cur
        torch.add(g[1], f[1], alpha=-scale_prev, out=f[1])  # eq. (11), (3): F_prev = ∇x f − J̃_prev
    else:
        f = torch.sub(g[0:2], g[2:4])  # eq. (3): F = ∇x f − ∇xy g·v, cur and prev
    h_f_new = torch.sub(h_f, f[1])
    torch.add(f[0], h_f_new, alpha=1.0 - eta_f, out=h_f_new)  # eq. (10)/(13): F_cur + (1−η_f)(h_f − F_prev)
    x_new = torch.add(x, h_f_new, alpha=-alpha)  # Alg. 1 line 7: x − α h_f
    return _store(x_new, dtype), _store(h_f_new, dtype)


def project_ball(w, w_sqnorm, radius):
    """Reference of :func:`torchbilevel.kernels.project_ball`; returns the new v."""
    cd = compute_dtype(w.dtype)
    if radius == float("inf"):
        return w.clone()
    norm = torch.sqrt(w_sqnorm.reshape(()).to(cd))
    # Alg. 1 line 6: v = w·min(1, r/‖w‖) = w·r/max(‖w‖, r); exactly w when ‖w‖ ≤ r, finite at w = 0
    factor = torch.div(norm.new_full((), radius), torch.clamp_min(norm, radius))  # true division: r/r == 1
    return _store(torch.mul(_store(w, cd), factor), w.dtype)  # factor kept in the compute dtype
