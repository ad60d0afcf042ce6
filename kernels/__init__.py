"""Fused update kernels for the single-loop methods (installed as ``torchbilevel.kernels``).

FdeHBO (Alg. 1 of the FdeHBO paper) and FMBO (Alg. 2) keep their state in flat
contiguous buffers; each step's elementwise bookkeeping — the finite-difference
combine (eq. (9), (11)), the recursive-momentum updates (eq. (6), (7), (10),
(12), (13)), the y/v/x steps and the ball projection (line 6) — runs as one
pass per side:

    y, w, h_g, h_R, w_sq = inner_update(y, v, h_g, h_R, grads_y, beta=..., lam=..., eta_g=...,
                                        eta_R=..., scale_cur=..., scale_prev=..., fd=True)
    v = project_ball(w, w_sq, radius)
    x, h_f = outer_update(x, h_f, grads_x, alpha=..., eta_f=..., scale_cur=..., scale_prev=..., fd=True)

Each function takes ``backend="auto" | "torch" | "triton"``: Triton kernels
(:mod:`.triton_update`) for CUDA tensors when triton imports, the plain-torch
reference (:mod:`.reference`) otherwise. triton is imported only when needed.
"""
from .dispatch import inner_update, outer_update, project_ball, triton_available, triton_launches

__all__ = ["inner_update", "outer_update", "project_ball", "triton_available", "triton_launches"]
