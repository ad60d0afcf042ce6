"""Outer-variable update rules for the double-loop algorithms (optax-style, explicit state).

"sgd": x ← x − lr·d.   "adam": Kingma & Ba (2015) Alg. 1 with bias correction (the
papers' experiments use Adam for the outer step).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import tree as T


class OuterState(NamedTuple):
    """State of the outer update: Adam's first and second moments (None for sgd)."""
    m: Optional[T.Tree]
    v: Optional[T.Tree]
    count: int


OUTER_RULES = ("sgd", "adam")


def outer_init(rule: str, x) -> OuterState:
    if rule == "adam":
        return OuterState(T.zeros_like(x), T.zeros_like(x), 0)
    return OuterState(None, None, 0)


def outer_update(rule: str, state: OuterState, x, d, lr: float,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """Return (x_new, state_new); never modifies x, d or state."""
    if rule == "sgd":
        return T.axpy(-lr, d, x), OuterState(None, None, state.count + 1)
    b1, b2 = betas
    c = state.count + 1
    m = T.lincomb(b1, state.m, 1 - b1, d)                               # m ← β1 m + (1−β1) d
    v = T.tree_map(lambda vi, di: b2 * vi + (1 - b2) * di * di, state.v, d)   # v ← β2 v + (1−β2) d²
    step = lr * math.sqrt(1 - b2 ** c) / (1 - b1 ** c)                   # bias-corrected step
    x_new = T.tree_map(lambda xi, mi, vi: xi - step * mi / (torch.sqrt(vi) + eps * math.sqrt(1 - b2 ** c)), x, m, v)
    return x_new, OuterState(m, v, c)
