"""Full-hypergradient zeroth-order baseline (HOZOG-style), for comparisons only.

Estimates the whole hypergradient by Gaussian smoothing of the outer objective
Φ(x) = f(x, y_N(x)), where y_N(x) is N warm-started inner gradient steps:
    ĝ = (1/Q) Σ_j [Φ(x + μ u_j) − Φ(x)] / μ · u_j,   u_j ~ N(0, I)
(Hessian-free paper, 000, eq. (3) applied to Φ, as HOZOG does). This is the
baseline PZOBO is compared with; it is not a library method.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

__all__ = ["HozogState", "hozog"]


class HozogState(NamedTuple):
    """Outer iterate ``x`` and the warm-start inner iterate ``y``."""

    x: dict
    y: dict


def _draw(batch):
    return next(batch) if hasattr(batch, "__next__") else batch


def _inner_path(inner: Callable, x: dict, y: dict, batch, steps: int, lr: float) -> dict:
    for _ in range(steps):
        yy = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        grads = torch.autograd.grad(inner(x, yy, batch), list(yy.values()))
        y = {k: yy[k].detach() - lr * g for k, g in zip(yy, grads)}
    return y


def zeroth_order_hypergrad(outer: Callable, inner: Callable, x: dict, y: dict,
                           inner_batch, outer_batch, steps: int, lr: float,
                           directions: int, mu: float, generator: torch.Generator | None = None):
    """Gaussian-smoothing estimate of ∇Φ(x) and the inner iterate y_N(x).

    Every perturbed inner path starts from the same ``y`` and sees the same
    batches as the unperturbed one.
    """
    y_n = _inner_path(inner, x, y, inner_batch, steps, lr)
    with torch.no_grad():
        phi = outer(x, y_n, outer_batch)
    estimate = {k: torch.zeros_like(v) for k, v in x.items()}
    for _ in range(directions):
        u = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
             for k, v in x.items()}
        x_u = {k: x[k] + mu * u[k] for k in x}
        y_u = _inner_path(inner, x_u, y, inner_batch, steps, lr)
        with torch.no_grad():
            # Hessian-free paper (000) eq. (3): [h(x + μu) − h(x)] / μ · u
            coef = (outer(x_u, y_u, outer_batch) - phi) / (mu * directions)
        for k in estimate:
            estimate[k] += coef * u[k]
    return estimate, y_n


def hozog(outer: Callable, inner: Callable, lr_x: float, inner_steps: int, lr_y: float,
          directions: int = 1, mu: float = 0.01, seed: int = 0):
    """Algorithm: x ← x − lr_x · ĝ(x) with :func:`zeroth_order_hypergrad`.

    ``outer`` / ``inner`` are the objectives ``(x, y, batch) -> scalar``. One
    batch of each kind is drawn per step (full batch when not an iterator).
    """
    generator = torch.Generator().manual_seed(seed)

    class Hozog:
        def init(self, x: dict, y: dict) -> HozogState:
            return HozogState(x, y)

        def step(self, state: HozogState, inner_batch, outer_batch) -> HozogState:
            ib, ob = _draw(inner_batch), _draw(outer_batch)
            grad, y_n = zeroth_order_hypergrad(outer, inner, state.x, state.y, ib, ob,
                                               inner_steps, lr_y, directions, mu, generator)
            x = {k: state.x[k] - lr_x * grad[k] for k in state.x}
            return HozogState(x, y_n)

    return Hozog()
