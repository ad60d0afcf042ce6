"""An inner objective declared as a convex loss of a network's outputs plus a regulariser,

    g(x, y; batch) = loss(outputs(x, y, batch), x, batch) + regularizer(x, y, batch),

so that the generalized Gauss-Newton matrix G = Jᵀ ∇²loss J + ∇yy regularizer (J the
Jacobian of the outputs in y; Schraudolph 2002) can stand in for the indefinite ∇yy g of a
deep network: G is positive semi-definite when the loss is convex in the outputs, so CG on
it converges (``tb.aid(solver, curvature="gauss_newton")``).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

__all__ = ["OutputLoss"]


class OutputLoss:
    """The inner objective g as ``loss(outputs(x, y, batch), x, batch) + regularizer(x, y, batch)``.

    Args:
        outputs: ``(x, y, batch) -> Tensor``, e.g. the logits of ``tb.nn.call(model, x, y, X)``.
        loss: ``(outputs, x, batch) -> scalar``, convex in the outputs (cross-entropy, squared
            error, logistic loss); it may depend on x directly (per-example weights of data
            reweighting), on y only through the outputs.
        regularizer: ``(x, y, batch) -> scalar`` or None (e.g. ``λ/2‖y‖²``, iMAML's
            ``λ/2‖y − x‖²``); its Hessian in y is used exactly.

    An ``OutputLoss`` is an ordinary objective: every method evaluates it as g; only
    ``tb.aid(..., curvature="gauss_newton")`` uses the split.
    """
    __slots__ = ("outputs", "loss", "regularizer")

    def __init__(self, outputs: Callable, loss: Callable, regularizer: Optional[Callable] = None):
        for name, fn in (("outputs", outputs), ("loss", loss)):
            if not callable(fn):
                raise TypeError(f"OutputLoss({name}=...) must be callable, got {type(fn).__name__}")
        if regularizer is not None and not callable(regularizer):
            raise TypeError(f"OutputLoss(regularizer=...) must be None or callable (x, y, batch) -> scalar, "
                            f"got {type(regularizer).__name__}")
        self.outputs, self.loss, self.regularizer = outputs, loss, regularizer

    def value(self, out: Tensor, x, y, batch) -> Tensor:
        """g from outputs already computed (one forward of the network shared)."""
        val = self.loss(out, x, batch)
        return val if self.regularizer is None else val + self.regularizer(x, y, batch)

    def __call__(self, x, y, batch) -> Tensor:
        out = self.outputs(x, y, batch)
        if not isinstance(out, Tensor):
            raise TypeError(f"OutputLoss: outputs(x, y, batch) must return one Tensor, got {type(out).__name__}")
        return self.value(out, x, y, batch)

    def __repr__(self) -> str:
        return (f"OutputLoss(outputs={getattr(self.outputs, '__name__', self.outputs)!s}, "
                f"loss={getattr(self.loss, '__name__', self.loss)!s}, "
                f"regularizer={getattr(self.regularizer, '__name__', self.regularizer)!s})")
