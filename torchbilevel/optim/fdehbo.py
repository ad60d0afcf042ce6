"""FdeHBO and FMBO (Yang, Xiao, Ji, NeurIPS 2023): fully single-loop momentum methods.

FdeHBO (Alg. 1) is Hessian/Jacobian-free: the products ∇yy g·v and ∇xy g·v come from
central differences of ∇g at y ± δv (eq. (9), (11)).  FMBO (Alg. 2) computes them
exactly.  Both project v on a ball of radius r (line 6).  Note: eq. (12) as printed uses
h^g_{t-1} inside the h^R recursion; the recursion on h^R_{t-1} is meant (as in eq. (7)),
and that is what is implemented.
"""
from __future__ import annotations

from typing import Optional

from .single_loop import single_loop

_DOC_ARGS = """
    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (outer), β (inner), λ (linear system); numbers > 0
            or callables of the step t (``tb.schedules.theorem1()`` gives Theorem 1's).
        eta_x, eta_y, eta_v: momentum weights η^f, η^g, η^R in [0, 1] (1 = no momentum),
            numbers or callables of t.
        radius: r_v, radius of the ball v is projected on (Theorem 1 needs r_v ≥ C_fy/μ_g);
            ``float('inf')`` disables the projection.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton imports),
            ``"torch"`` or ``"triton"`` for the fused update.
        independent_outer_sample: draw ξ̄_t (outer hypergradient) independently of ψ_t
            (linear system), as the paper's analysis does; costs 4 (FdeHBO) more gradient
            evaluations of g per step.  Default: ξ̄_t = ψ_t, so the y ± δv evaluations give
            both products (6 full gradients + 2 inner y-gradients per step).
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: with iterator batches each step draws ζ_t (y update) and ψ_t (linear system)
    from ``inner_batch``, and ψ_t's outer part from ``outer_batch``; the previous iterate is
    re-evaluated on the current samples, as eq. (6), (7), (10) require.  The first step
    (no previous iterate) uses the plain stochastic gradients.

    Returns an :class:`torchbilevel.Algorithm`: ``state = algo.init(x, y)``,
    ``state = algo.step(state, inner_batch, outer_batch)``; ``state.x``, ``state.y`` are dicts.
"""


def fdehbo(problem, *, lr_x, lr_y, lr_v, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius,
           delta: Optional[float] = None, backend: str = "auto", batched: Optional[bool] = None,
           independent_outer_sample: bool = False, check_finite: bool = True):
    """FdeHBO (Alg. 1 of the FdeHBO paper): single loop, recursive momentum on y, v and x,
    finite-difference Hessian/Jacobian-vector products, v projected on a ball.

    batched: take the two finite-difference points y ± δv through one ``vmap`` over the
        sign with x unbatched, so the x-only part of g (a network body) runs forward and
        backward once for both (default True; measured 1.0 vs 2.2 gradient evaluations on
        LeNet, bench/RESULTS.md).  False evaluates g twice in plain autograd, for
        objectives vmap cannot trace (``.item()``, data-dependent control flow).
    delta: the finite-difference step δ > 0; default None picks δ_t each step so that
        ‖δ_t v_t‖ = ε^(1/3)(1 + ‖y_t‖) (ε: machine epsilon of y's dtype, δ kept in float32;
        see ``torchbilevel.derivatives.fd_delta``).  Accurate where g is smooth along
        y ± δv (linear / softmax heads); across ReLU kinks the FD error is O(1).
    """ + _DOC_ARGS
    return single_loop(problem, fd=True, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, eta_x=eta_x, eta_y=eta_y,
                       eta_v=eta_v, radius=radius, delta=delta, backend=backend, batched=batched,
                       independent_outer_sample=independent_outer_sample, check_finite=check_finite,
                       name="fdehbo")


def fmbo(problem, *, lr_x, lr_y, lr_v, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius,
         backend: str = "auto",
         independent_outer_sample: bool = False, check_finite: bool = True):
    """FMBO (Alg. 2 of the FdeHBO paper): FdeHBO with exact products — one backward of
    ⟨∇y g, v⟩ gives ∇yy g·v and ∇xy g·v together (eq. (12), (13))."""
    return single_loop(problem, fd=False, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, eta_x=eta_x, eta_y=eta_y,
                       eta_v=eta_v, radius=radius, delta=None, backend=backend, batched=None,
                       independent_outer_sample=independent_outer_sample, check_finite=check_finite,
                       name="fmbo")


fmbo.__doc__ += _DOC_ARGS
