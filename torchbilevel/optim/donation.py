"""Buffer donation: ``algo.step(state, inner_batch, outer_batch, donate=True)`` hands the old
state's buffers to the step, which writes the new state into them (JAX's ``donate_argnums``
is the model).

Why: a step that may not touch its input allocates the whole new state beside the old one,
and the fused update needs every gradient of the step at once; a donated step accumulates
each gradient into the momenta as its evaluation returns and updates the iterates in place,
so it adds little more than one evaluation above the state (bench/RESULTS.md §16).

The contract, checked here:

* the old state is consumed: its tensors are marked, and a step, ``state_dict`` or
  ``load_state_dict`` that meets a marked tensor raises ValueError (the old state object,
  its ``state.x`` dicts and a ``state_dict`` taken before the donated step alias the new
  state's buffers: saving that dict would write the newer values under the older step count);
* the returned state holds new tensor objects over the same storage, so it can be donated
  again, saved, or stepped without donation;
* a state shares buffers with the state it was stepped from *without* donation (FdeHBO,
  FMBO and SOBA keep the old iterate as the previous iterate): donating the newer state
  also consumes the older one (``s1 = step(s0); step(s1, donate=True)`` overwrites s0's
  iterate, and stepping s0 then raises);
* what a run computes with donation is the same every time (resume from a ``state_dict``,
  two runs interleaved on one algorithm object: bit for bit); against the same run without
  donation it agrees to rounding, not bitwise: the gradients are accumulated term by term
  instead of in one fused pass over all of them;
* a step that raises part-way leaves the donated state consumed (its buffers hold a partial
  update): keep a checkpoint, or step without donation where a failure must leave the state
  usable.

Eager only: refused inside torch.func transforms and under torch.compile (whose graphs own
their buffers).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..problem import in_functorch_transform

__all__ = ["DONATING", "check", "take", "refuse", "check_unconsumed", "consumed", "fresh"]

#: the algorithms whose step writes the new state into a donated old state
DONATING = ("fdehbo", "fmbo", "soba", "f2sa", "bome")

_MARK = "_torchbilevel_donated"


def _tensors(state) -> Iterable[Tensor]:
    values = state.values() if isinstance(state, dict) else state
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, dict):
            yield from (t for t in v.values() if isinstance(t, Tensor))


def consumed(state) -> bool:
    """Was a tensor of ``state`` (a NamedTuple state or a state_dict) donated to a step?"""
    return any(getattr(t, _MARK, False) for t in _tensors(state))


def check_unconsumed(state, what: str = "state") -> None:
    """ValueError when a tensor of ``state`` (a NamedTuple state or a state_dict) was donated."""
    if consumed(state):
        raise ValueError(
            f"this {what} was donated to a step (donate=True), or shares buffers with a state that was "
            f"(the state it was stepped from without donation keeps its iterate as the previous one): its "
            f"buffers now hold the state that step returned. Use the returned state; save a state_dict only "
            f"of a state you have not donated since (or donate=False where the old state must stay valid)")


def check(donate, name: str, state) -> bool:
    """Validate ``donate`` for algorithm ``name`` and the state passed in; returns it as a bool."""
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be True or False, got {donate!r}")
    check_unconsumed(state)
    if not donate:
        return False
    if name not in DONATING:
        refuse(name)
    if in_functorch_transform() or torch.compiler.is_compiling():
        raise ValueError(f"{name}: donate=True runs eagerly; inside torch.func transforms and under "
                         "torch.compile step without donation (the compiled graph owns its buffers)")
    return True


def refuse(name: str):
    raise ValueError(f"{name}: donate=True is not supported: its step has no in-place update. "
                     f"Algorithms that take it: {', '.join(DONATING)}")


def take(state) -> None:
    """Mark every tensor of the donated ``state`` consumed (before the step writes into them)."""
    for t in _tensors(state):
        setattr(t, _MARK, True)


def fresh(t):
    """A new tensor object over ``t``'s storage, not marked (None and non-tensors pass)."""
    return t.detach() if isinstance(t, Tensor) else t
