"""The shape every algorithm shares (optax-like): pure ``init`` and ``step`` functions
over an explicit NamedTuple state, plus checkpoint helpers."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple


class Algorithm(NamedTuple):
    """``state = init(x, y)``; ``state = step(state, inner_batch, outer_batch)``.

    ``state, info = step(state, inner_batch, outer_batch, has_aux=True)`` also returns a
    :class:`torchbilevel.StepInfo`: what the step computed anyway (losses where it
    evaluated them, the norm of the direction x moved along, the linear system's report,
    FdeHBO's δ, whether the ball projection bound), as 0-d tensors, with no extra
    evaluation and no host read; ``tb.progress(info)`` gives Python floats for a progress
    bar from one host read.  Each algorithm's docstring says which point each figure is at.

    ``state = step(state, inner_batch, outer_batch, donate=True)`` hands the old state over:
    the step writes the new state into its buffers and adds little more than one evaluation
    above the state (FdeHBO, FMBO, SOBA, F2SA, BOME; the others raise ValueError).  The old
    state is consumed (a step or ``state_dict`` of it raises); see
    :mod:`torchbilevel.optim.donation` for the contract.

    ``state_dict(state)`` returns a dict that ``torch.save`` writes (including the state
    of random generators the algorithm owns); ``load_state_dict(d)`` returns the state and
    restores those generators, so a resumed run continues bit-identically on CPU.

    The library does not own your batch iterators: when ``inner_batch`` / ``outer_batch``
    are iterators, save their position next to ``state_dict(state)`` and re-create them
    there on resume (a seeded sampler whose i-th batch depends only on (seed, i) makes this
    one integer; tests/test_checkpoint.py shows it).  Objectives must be pure functions of
    their arguments for the same reason (and for ``tb.itd(..., checkpoint=True)``, which
    evaluates g again during the backward pass).
    """
    init: Callable[..., Any]
    step: Callable[..., Any]
    state_dict: Callable[[Any], dict]
    load_state_dict: Callable[[dict], Any]
    name: str
