"""Single-level baseline: train the inner variables with the outer ones frozen.

Shaped like the library's algorithms (``init`` / ``step`` with a NamedTuple
state holding ``x`` and ``y``), so the experiment runner treats it as one more
method; e.g. plain training on noisy labels, or on the clean subset only.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["FrozenOuterState", "frozen_outer"]


class FrozenOuterState(NamedTuple):
    """``x`` stays as given; ``y`` is trained by (momentum) gradient descent."""

    x: dict
    y: dict
    momentum: dict


def _draw(batch):
    return next(batch) if hasattr(batch, "__next__") else batch


def frozen_outer(loss: Callable, lr: float, momentum: float = 0.0):
    """Algorithm minimising ``loss(x, y, batch)`` over ``y`` alone.

    ``step(state, inner_batch, outer_batch)`` takes one (heavy-ball) gradient
    step on ``y`` with the inner batch; the outer batch is ignored.
    """

    class FrozenOuter:
        def init(self, x: dict, y: dict) -> FrozenOuterState:
            zeros = {k: torch.zeros_like(v) for k, v in y.items()}
            return FrozenOuterState(x, y, zeros)

        def step(self, state: FrozenOuterState, inner_batch, outer_batch) -> FrozenOuterState:
            y = {k: v.detach().requires_grad_(True) for k, v in state.y.items()}
            grads = torch.autograd.grad(loss(state.x, y, _draw(inner_batch)), list(y.values()))
            buf = {k: momentum * state.momentum[k] + g for k, g in zip(y, grads)}
            new_y = {k: y[k].detach() - lr * buf[k] for k in y}
            return FrozenOuterState(state.x, new_y, buf)

    return FrozenOuter()
