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

def fdehbo(problem, *, lr_x, lr_y, lr_v, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius,
           delta: Optional[float] = None, backend: str = "auto", batched: Optional[bool] = None,
           independent_outer_sample: bool = False, check_finite: bool = True):
    """FdeHBO: fully single-loop, Hessian/Jacobian-free bilevel optimiser.

    Paper: Yang, Xiao, Ji, "Achieving O(ε^-1.5) Complexity in Hessian/Jacobian-free
    Stochastic Bilevel Optimization", NeurIPS 2023, Alg. 1. Recursive momentum on y, v
    and x (eq. (6), (7), (10)); the products ∇yy g·v and ∇xy g·v are central finite
    differences of ∇g at y ± δv (eq. (9), (11)); v is projected on a ball of radius r
    (line 6). Cost per step: about 5 gradient evaluations of g (measured 5.0 on LeNet
    hyper-representation, bench/RESULTS.md; 6 full gradients + 2 y-gradients if the ±
    points were evaluated separately), no second-order products, O(dim x + dim y) state.
    Complexity O(ε^-1.5) under the paper's assumptions (Theorem 1).

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (outer), β (inner), λ (linear system); numbers > 0
            or callables of the step t (``tb.schedules.theorem1()`` gives Theorem 1's).
            Choose ``lr_y`` as for plain gradient descent on g (≈ 1/L_g, L_g the
            smoothness of g in y) and ``lr_v`` the same (the linear system's operator
            is ∇yy g, with the same curvature); ``lr_x`` as for SGD on the outer loss,
            then lower it if the outer loss oscillates.
        eta_x, eta_y, eta_v: momentum weights η^f, η^g, η^R in [0, 1], numbers or callables
            of t. Default 1 = no momentum (plain stochastic steps); the paper's
            variance reduction comes from η < 1: with minibatches start at 0.5
            (the demo's setting), with full batches keep 1.
        radius: r, radius of the ball v is projected on (Alg. 1 line 6); required.
            Theorem 1 needs r ≥ ‖v*‖, v* solving ∇yy g·v = ∇y f, so r ≈ ‖∇y f‖/μ_g
            (μ_g: strong convexity of g in y). A quick estimate: a few CG steps,
            ``_, aux = tb.hypergrad(problem, tb.aid(tb.cg(steps=20)), has_aux=True)(x, y,
            inner_batch, outer_batch)``, then radius = 1.5-2 × the norm of ``aux.v``
            (the norm over all its tensors). Too small a radius clips v and biases the
            hypergradient: the step warns (RuntimeWarning naming radius) when the
            projection binds in most recent steps. ``float('inf')`` disables it.
        delta: the finite-difference step δ > 0; default None picks δ_t each step so that
            ‖δ_t v_t‖ = ε^(1/3)(1 + rms(y_t)) (ε: machine epsilon of y's dtype, rms(y) =
            ‖y‖/√dim y the size of a typical entry, δ kept in float32;
            see ``torchbilevel.derivatives.fd_delta``): it balances the O(δ²) truncation
            error against the O(ε/δ) rounding error, so leave it at None unless g is
            noisy along y ± δv. Accurate where g is smooth along y ± δv (linear /
            softmax heads); across ReLU kinks the FD error is O(1): use FMBO there.
            Mixed precision (FSDP2 ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``): the
            default is balanced for y's dtype, not the compute dtype, and the products
            lose most digits (measured 0.23 relative error of the hypergradient against
            float64, bench/mixed_precision.py), so the first step raises ValueError there;
            pass ``delta`` (0.1/‖v‖ measured 1.2e-2) or use tb.first_order(), tb.pzobo,
            tb.bome (4e-3 to 1.4e-2).
        batched: take the two finite-difference points y ± δv through one ``vmap`` over the
            sign with x unbatched, so the x-only part of g (a network body) runs forward and
            backward once for both (measured 1.0 vs 1.6 gradient evaluations of g on
            LeNet, bench/RESULTS.md).  False evaluates g twice in plain autograd (cheaper
            when y is most of the network, and for objectives vmap cannot trace:
            ``.item()``, data-dependent control flow, nn.LSTM weights in y).  The default
            None decides once, at the first step: vmap when its forward costs fewer than
            1.6 plain forwards of g by a FLOP count, else two evaluations, and falls back
            to two evaluations when vmap fails.  Either way both points see the same
            dropout masks.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton imports),
            ``"torch"`` or ``"triton"`` for the fused update (momentum recursions, the
            y/v/x steps and the ball projection over flat buffers; see
            ``torchbilevel.kernels``).
        independent_outer_sample: draw ξ̄_t (outer hypergradient) independently of ψ_t
            (linear system), as the paper's analysis does; costs more gradient
            evaluations of g per step.  Default: ξ̄_t = ψ_t, so one evaluation of the
            products serves both.
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: with iterator batches each step draws ζ_t (y update) and ψ_t (linear system)
    from ``inner_batch``, and ψ_t's outer part from ``outer_batch``; the previous iterate is
    re-evaluated on the current samples, as eq. (6), (7), (10) require.  The first step
    (no previous iterate) uses the plain stochastic gradients.

    Returns:
        An :class:`torchbilevel.Algorithm`: ``state = algo.init(x, y)``,
        ``state = algo.step(state, inner_batch, outer_batch)``; ``state.x``, ``state.y``,
        ``state.v`` are dicts; ``algo.state_dict(state)`` / ``algo.load_state_dict(d)``
        checkpoint it.  ``state, info = algo.step(state, inner_batch, outer_batch,
        has_aux=True)`` also returns a :class:`torchbilevel.StepInfo` of figures the step
        computed anyway (no extra evaluation, no host read; ``tb.progress(info)`` for a
        progress bar): ``inner_loss`` g(x_t, y_t; ζ_t) — when ∇y g comes from the ± pair
        (ζ_t = ψ_t, no running statistics, eager: not under torch.compile or torch.func
        transforms), the pair's mean (g(y_t + δ_t v_t) + g(y_t − δ_t v_t))/2 = g(y_t) + O(δ²)
        on ψ_t; ``outer_loss`` f(x_t, y_t; ψ_t);
        ``hypergrad_norm`` ‖h^f_t‖ (the momentum direction x moves along); ``delta`` δ_t;
        ``projected`` whether ‖w_{t+1}‖ > r; ``v_norm`` ‖w_{t+1}‖ (v before projection);
        ``solve`` the linear system at v_t on ψ_t (relative residual ‖H̃v_t − ∇y f‖/‖∇y f‖
        with the step's finite-difference H̃v_t, whether v_tᵀH̃v_t ≤ 0; see
        ``torchbilevel.optim.step_info.one_step_solve``).  With a data-parallel problem the
        losses are means over ranks.
        ``donate=True`` (``algo.step(state, ib, ob, donate=True)``) writes the new state into the
        old one's buffers, each gradient added to the momenta as it returns: a step then adds
        1.4x the parameter bytes above the state (y a head; 3.5x with y the whole model) instead
        of 6.2x (11x), agrees with the plain step to rounding, and consumes the old state
        (:mod:`torchbilevel.optim.donation`; bench/RESULTS.md §16).
    """
    return single_loop(problem, fd=True, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, eta_x=eta_x, eta_y=eta_y,
                       eta_v=eta_v, radius=radius, delta=delta, backend=backend, batched=batched,
                       independent_outer_sample=independent_outer_sample, check_finite=check_finite,
                       name="fdehbo")


def fmbo(problem, *, lr_x, lr_y, lr_v, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius,
         backend: str = "auto",
         independent_outer_sample: bool = False, check_finite: bool = True):
    """FMBO: fully single-loop bilevel optimiser with exact second-order products.

    Paper: Yang, Xiao, Ji, "Achieving O(ε^-1.5) Complexity in Hessian/Jacobian-free
    Stochastic Bilevel Optimization", NeurIPS 2023, Alg. 2. FdeHBO with exact products:
    one backward of ⟨∇y g, v⟩ gives ∇yy g·v and ∇xy g·v together (eq. (12), (13)).
    Cost per step: about 5 gradient evaluations of g (measured 5.0 on LeNet
    hyper-representation, bench/RESULTS.md: parity with FdeHBO), one Hessian-vector and
    one Jacobian-vector product per evaluated point, O(dim x + dim y) state. Use it
    instead of FdeHBO when g is not smooth along y (ReLU or max-pool layers in y).
    It takes the keywords of :func:`torchbilevel.fdehbo` except ``delta`` and ``batched``.

    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (outer), β (inner), λ (linear system); numbers > 0
            or callables of the step t (``tb.schedules.theorem1()`` gives Theorem 1's).
            Choose ``lr_y`` as for plain gradient descent on g (≈ 1/L_g, L_g the
            smoothness of g in y) and ``lr_v`` the same (the linear system's operator
            is ∇yy g, with the same curvature); ``lr_x`` as for SGD on the outer loss,
            then lower it if the outer loss oscillates.
        eta_x, eta_y, eta_v: momentum weights η^f, η^g, η^R in [0, 1], numbers or callables
            of t. Default 1 = no momentum (plain stochastic steps); the paper's
            variance reduction comes from η < 1: with minibatches start at 0.5
            (the demo's setting), with full batches keep 1.
        radius: r, radius of the ball v is projected on (Alg. 1 line 6); required.
            Theorem 1 needs r ≥ ‖v*‖, v* solving ∇yy g·v = ∇y f, so r ≈ ‖∇y f‖/μ_g
            (μ_g: strong convexity of g in y). A quick estimate: a few CG steps,
            ``_, aux = tb.hypergrad(problem, tb.aid(tb.cg(steps=20)), has_aux=True)(x, y,
            inner_batch, outer_batch)``, then radius = 1.5-2 × the norm of ``aux.v``
            (the norm over all its tensors). Too small a radius clips v and biases the
            hypergradient: the step warns (RuntimeWarning naming radius) when the
            projection binds in most recent steps. ``float('inf')`` disables it.
        backend: ``"auto"`` (Triton kernels for CUDA tensors when triton imports),
            ``"torch"`` or ``"triton"`` for the fused update (momentum recursions, the
            y/v/x steps and the ball projection over flat buffers; see
            ``torchbilevel.kernels``).
        independent_outer_sample: draw ξ̄_t (outer hypergradient) independently of ψ_t
            (linear system), as the paper's analysis does; costs more gradient
            evaluations of g per step.  Default: ξ̄_t = ψ_t, so one evaluation of the
            products serves both.
        check_finite: raise FloatingPointError naming the stage (state untouched) when a
            step produces NaN/inf; one host read per step.

    Samples: with iterator batches each step draws ζ_t (y update) and ψ_t (linear system)
    from ``inner_batch``, and ψ_t's outer part from ``outer_batch``; the previous iterate is
    re-evaluated on the current samples, as eq. (6), (7), (10) require.  The first step
    (no previous iterate) uses the plain stochastic gradients.

    Returns:
        An :class:`torchbilevel.Algorithm`: ``state = algo.init(x, y)``,
        ``state = algo.step(state, inner_batch, outer_batch)``; ``state.x``, ``state.y``,
        ``state.v`` are dicts; ``algo.state_dict(state)`` / ``algo.load_state_dict(d)``
        checkpoint it.  ``algo.step(..., has_aux=True)`` returns ``(state, StepInfo)`` as
        FdeHBO's (``inner_loss`` g(x_t, y_t; ζ_t), ``outer_loss`` f(x_t, y_t; ψ_t),
        ``hypergrad_norm`` ‖h^f_t‖, ``projected``, ``v_norm``, ``solve`` with the exact
        ∇yy g·v_t), without ``delta``.  ``donate=True`` as FdeHBO's (1.1x / 3.7x the parameter
        bytes above the state, y a head / the whole model; 6.2x / 11x without).
    """
    return single_loop(problem, fd=False, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, eta_x=eta_x, eta_y=eta_y,
                       eta_v=eta_v, radius=radius, delta=None, backend=backend, batched=None,
                       independent_outer_sample=independent_outer_sample, check_finite=check_finite,
                       name="fmbo")

