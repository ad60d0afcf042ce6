"""SOBA (Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables
stochastic and global variance reduction algorithms", NeurIPS 2022): one SGD step each on
y, on the linear-system variable v and on x, all at the current iterate.

    y_{t+1} = y_t − β_t ∇y g(x_t, y_t; ζ_t)
    v_{t+1} = v_t − λ_t (∇yy g(x_t, y_t; ψ_t)·v_t − ∇y f(x_t, y_t; ψ_t))
    x_{t+1} = x_t − α_t (∇x f(x_t, y_t; ψ_t) − ∇xy g(x_t, y_t; ψ_t)·v_t)

(the paper's D_y, D_v, D_x directions).  Against the paper and benchmark_bilevel's SOBA:

* the sign of v: theirs solves ∇yy g·v = −∇y f, ours +∇y f (the convention of the rest of
  the library), so their v is −v here and their ``+∇xy g·v`` our ``−∇xy g·v``; the iterates
  x, y are the same.
* samples: benchmark_bilevel evaluates ∇y g, ∇yy g·v and ∇xy g·v on one inner minibatch
  (one vjp) and ∇f on one outer minibatch; here y's gradient uses its own inner sample ζ_t
  and the linear system and the x direction share a second one, ψ_t (the FMBO engine's
  draws, FdeHBO paper Alg. 2): with iterator batches each step draws two inner minibatches
  and one outer.  With full batches the two coincide (issue 19 measured iterates equal to
  2e-16 against a line-by-line port of the reference).
* step sizes: the reference uses one step for y and v; here ``lr_v`` is separate
  (``lr_v = lr_y`` is the reference's).  This is FMBO (FdeHBO paper, Alg. 2) with every momentum
weight η = 1 and no projection of v, and it runs on the same engine
(:mod:`torchbilevel.optim.single_loop`): same samples, fused update, data parallel (one
all-reduce per step), guards, checkpoints.

Cost per step: one y-gradient of g (on ζ), one full gradient of f and one exact
∇yy g·v with ∇xy g·v from a single backward of ⟨∇y g, v⟩ (on ψ) — about 2 + 2 = 4 gradient
evaluations; no evaluation at the previous iterate (η = 1 needs none).
"""
from __future__ import annotations

from .single_loop import SingleLoopState, single_loop

_DOC_ARGS = """
    Args:
        problem: a :class:`torchbilevel.Bilevel`.
        lr_x, lr_y, lr_v: step sizes α (outer), β (inner), λ (linear system); numbers > 0
            or callables of the step t.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``, the fused update's backend.
        independent_outer_sample: draw the x direction's sample independently of the linear
            system's ψ_t (see :func:`torchbilevel.fmbo`).
        check_finite: raise FloatingPointError naming the stage, the state passed in
            unchanged, when a step produces NaN/inf; one host read per step.

    Samples: with iterator batches each step draws ζ_t (y update) and ψ_t (linear system and
    x direction) from ``inner_batch``, and ψ_t's outer part from ``outer_batch``; any other
    batch is used as a full batch.

    Returns an :class:`torchbilevel.Algorithm` whose state is a
    :class:`torchbilevel.SingleLoopState` (``state.x``, ``state.y``, ``state.v`` are dicts).
"""


def fresh_single_loop(problem, *, lr_x, lr_y, lr_v, backend: str, independent_outer_sample: bool,
                      check_finite: bool, name: str, radius=float("inf")):
    """The FMBO engine with η = 1 (no projection by default): with every η the constant 1 the engine
    evaluates the current iterate only (the momentum brackets would be multiplied by 0), so
    a step costs half an FMBO step with momentum.

    Returns (algorithm, step_at) where ``step_at(s, inner_batch, outer_batch, lr_x, has_aux)`` is the
    engine's step (``lr_x`` is accepted for MA-SOBA, which replaces the x update by its
    own, and ignored: the engine's x step uses the schedule given here).  ``radius``: the
    engine's projection of v on a ball (∞: none).
    """
    algo = single_loop(problem, fd=False, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, eta_x=1.0, eta_y=1.0, eta_v=1.0,
                       radius=radius, delta=None, backend=backend, batched=None,
                       independent_outer_sample=independent_outer_sample, check_finite=check_finite, name=name)

    def step_at(s: SingleLoopState, inner_batch, outer_batch, alpha: float, has_aux: bool = False):
        return algo.step(s, inner_batch, outer_batch, has_aux=has_aux)
    return algo, step_at


def soba(problem, *, lr_x, lr_y, lr_v, backend: str = "auto", independent_outer_sample: bool = False,
         check_finite: bool = True):
    """SOBA (Dagréou et al., NeurIPS 2022): single-loop SGD on y, v and x at the current
    iterate; equal to ``tb.fmbo(..., eta_x=1, eta_y=1, eta_v=1, radius=float('inf'))`` at
    half its cost per step (no previous-iterate evaluation).

    ``step(state, inner_batch, outer_batch, has_aux=True)`` returns ``(state,``
    :class:`torchbilevel.StepInfo` ``)``: ``inner_loss`` g(x_t, y_t; ζ_t) and ``outer_loss``
    f(x_t, y_t; ψ_t) (the y update's and the outer gradient's evaluations), ``hypergrad_norm``
    ‖∇x f − ∇xy g·v_t‖ on ψ_t (the direction x moves along), ``v_norm`` ‖v_{t+1}‖,
    ``projected`` False (no projection), ``solve`` the v step's report at v_t on ψ_t
    (relative residual ‖∇yy g·v_t − ∇y f‖/‖∇y f‖, whether v_tᵀ∇yy g v_t ≤ 0).
    ``step(..., donate=True)`` writes the new state into the old one's buffers (as FMBO's;
    :mod:`torchbilevel.optim.donation`).
    """
    algo, _ = fresh_single_loop(problem, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, backend=backend,
                                independent_outer_sample=independent_outer_sample,
                                check_finite=check_finite, name="soba")
    return algo


soba.__doc__ += _DOC_ARGS
