"""Fused update kernels for the single-loop methods (installed as ``torchbilevel.kernels``).

FdeHBO (Alg. 1 of Yang, Xiao, Ji, NeurIPS 2023) and FMBO (Alg. 2) keep their state
in flat contiguous buffers. Once a step's gradients and products are evaluated
(autograd does that: FdeHBO's finite-difference ∇yy g·v and ∇xy g·v come from
``torchbilevel.derivatives.fd_products``, FMBO's exact ones from one backward),
the remaining elementwise bookkeeping — the recursive-momentum updates (eq. (6),
(7), (10), (12), (13)), the y/v/x steps and the ball projection (line 6) — runs
as one pass over memory per side:

    y, w, h_g, h_R, w_sq = inner_update(y, v, h_g, h_R, grads_y, beta=..., lam=..., eta_g=..., eta_R=...)
    v = project_ball(w, w_sq, radius)
    x, h_f = outer_update(x, h_f, grads_x, alpha=..., eta_f=...)

``grads_y`` stacks 6 rows (∇y g at the current and previous iterate, ∇yy g·v at
both, ∇y f at both), ``grads_x`` 4 rows (∇x f at both, ∇xy g·v at both). The
kernels do not form finite differences: their inputs are finished products.

Each function takes ``backend="auto" | "torch" | "triton"``: Triton kernels
(:mod:`.triton_update`) for CUDA tensors when triton imports, the plain-torch
reference (:mod:`.reference`) otherwise. triton is imported only when needed;
:func:`triton_launches` counts the Triton launches, so a run can check that the
Triton path ran.
"""
from .dispatch import inner_update, outer_update, project_ball, triton_available, triton_launches

__all__ = ["inner_update", "outer_update", "project_ball", "triton_available", "triton_launches"]
