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
``eta·a + (1−eta)·(h + a − b) = a + (1−eta)·h − (1−eta)·b``: fewer passes,
and exactly ``a`` when ``eta = 1`` (finite inputs). The gradient rows hold
finished products (∇yy g·v, ∇xy g·v), exact (FMBO) or finite-difference
(FdeHBO, formed by ``torchbilevel.derivatives.fd_products`` before the call).
Only fresh temporaries are written in place (no ``out=``), so the functions
also run under autograd and ``torch.func`` transforms.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in for a given storage dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def sqnorm(w: torch.Tensor) -> torch.Tensor:
    """Σ w² of the stored w, accumulated in its compute dtype, as a 0-d tensor."""
    wc = _store(w, compute_dtype(w.dtype))
    return torch.dot(wc, wc)


def inner_update(y, v, h_g, h_R, grads, *, beta, lam, eta_g, eta_R):
    """Reference of :func:`torchbilevel.kernels.inner_update`; returns (y_new, w, h_g_new, h_R_new, w_sqnorm)."""
    dtype = y.dtype
    g = _store(grads, compute_dtype(dtype))  # upcast the stacked rows once
    keep_g, keep_R = 1.0 - eta_g, 1.0 - eta_R
    r_cur = torch.sub(g[2], g[4])  # eq. (5)/(8): ∇yy g·v − ∇y f
    r_prev = torch.sub(g[3], g[5])  # the same at t−1
    h_g_new = torch.add(g[0], h_g, alpha=keep_g).sub_(g[1], alpha=keep_g)  # eq. (6): gy + (1−η_g)(h_g − gy_prev)
    h_R_new = r_cur.add_(h_R, alpha=keep_R).sub_(r_prev, alpha=keep_R)  # eq. (7)/(12): R + (1−η_R)(h_R − R_prev)
    y_new = torch.add(y, h_g_new, alpha=-beta)  # Alg. 1 line 4: y − β h_g
    w = _store(torch.add(v, h_R_new, alpha=-lam), dtype)  # Alg. 1 line 5: w = v − λ h_R
    return _store(y_new, dtype), w, _store(h_g_new, dtype), _store(h_R_new, dtype), sqnorm(w)


def outer_update(x, h_f, grads, *, alpha, eta_f):
    """Reference of :func:`torchbilevel.kernels.outer_update`; returns (x_new, h_f_new)."""
    dtype = x.dtype
    g = _store(grads, compute_dtype(dtype))
    keep = 1.0 - eta_f
    # eq. (10)/(13) as F_cur + (1−η_f)h_f − (1−η_f)F_prev, with F = ∇x f − ∇xy g·v (eq. (3)) expanded
    h_f_new = torch.add(g[0], h_f, alpha=keep).sub_(g[1], alpha=keep)  # ∇x f terms + momentum
    h_f_new.sub_(g[2]).add_(g[3], alpha=keep)  # − ∇xy g·v_cur + (1−η_f) ∇xy g·v_prev
    x_new = torch.add(x, h_f_new, alpha=-alpha)  # Alg. 1 line 7: x − α h_f
    return _store(x_new, dtype), _store(h_f_new, dtype)


def project_ball(w, w_sqnorm, radius):
    """Reference of :func:`torchbilevel.kernels.project_ball`; returns the new v."""
    cd = compute_dtype(w.dtype)
    if radius == float("inf"):
        return w.clone()
    return _store(torch.mul(_store(w, cd), ball_factor(w_sqnorm, radius, cd)), w.dtype)  # factor in the compute dtype


def ball_factor(w_sqnorm, radius, dtype=None):
    """The 0-d factor of the projection on the ball of radius r (FdeHBO Alg. 1 line 6):
    v = w·min(1, r/‖w‖) = w·r/max(‖w‖, r), exactly 1 when ‖w‖ ≤ r, finite at w = 0; in
    ``dtype`` (default: the dtype of ``w_sqnorm``)."""
    norm = torch.sqrt(w_sqnorm.reshape(()).to(dtype or w_sqnorm.dtype))
    return torch.div(norm.new_full((), radius), torch.clamp_min(norm, radius))  # true division: r/r == 1
