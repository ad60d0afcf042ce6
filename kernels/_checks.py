"""Argument validation shared by the public kernel entry points.

Cheap checks only (no device synchronisation, no reads of tensor data): types,
shapes, row counts, dtypes, devices, contiguity, and the range of the Python
scalars. Every error names the offending argument.
"""
from __future__ import annotations

import math
import numbers

import torch

#: storage dtypes accepted by every backend
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_state(name: str, t: torch.Tensor) -> None:
    """The first state buffer of a call: a contiguous, 1-D floating tensor (empty allowed: a
    rank's shard of a small parameter can be empty; it runs the plain-torch reference)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Another 1-D state buffer: same length, dtype and device as ``ref``, contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_grads(grads: torch.Tensor, rows: int, ref_name: str, ref: torch.Tensor) -> None:
    """The stacked gradient rows: a (rows, n) tensor matching ``ref``.

    Each row must be contiguous and rows must not overlap; a row stride larger
    than n (a row-padded buffer, ``buf[:, :n]``) is accepted.
    """
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
    expected = (rows, ref.numel())
    if tuple(grads.shape) != expected:
        raise ValueError(
            f"grads must have shape {expected} ({rows} stacked rows of length len({ref_name})), "
            f"got {tuple(grads.shape)}"
        )
    if grads.dtype != ref.dtype:
        raise ValueError(f"grads must have the dtype of {ref_name} ({ref.dtype}), got {grads.dtype}")
    if grads.device != ref.device:
        raise ValueError(f"grads must be on the device of {ref_name} ({ref.device}), got {grads.device}")
    n = ref.numel()
    if (grads.stride(1) != 1 and n > 1) or grads.stride(0) < n:
        raise ValueError(
            f"grads must hold contiguous, non-overlapping rows (strides (s, 1) with s >= {n}), "
            f"got strides {grads.stride()}"
        )


def check_products_layout(fd, scale_cur, scale_prev) -> None:
    """The compatibility keywords ``fd``, ``scale_cur``, ``scale_prev`` of the update functions.

    The grads rows always hold finished products (∇yy g·v, ∇xy g·v): ``fd`` must be
    False. The finite-difference row layout (``fd=True``: the raw ∇g(y ± δv) rows and
    the 1/(2δ) scales) had no caller once FdeHBO formed its products with
    ``torchbilevel.derivatives.fd_products``, and was removed. The scales are
    accepted (None or a finite real) and ignored.
    """
    if not isinstance(fd, bool):
        raise TypeError(f"fd must be a bool, got {type(fd).__name__}")
    if fd:
        raise ValueError(
            "fd=True (the finite-difference row layout with 1/(2δ) scales) was removed: pass "
            "finished products (∇yy g·v, ∇xy g·v, e.g. from torchbilevel.derivatives.fd_products) "
            "in the 6-row inner / 4-row outer layout, with fd=False or no fd at all"
        )
    for name, value in (("scale_cur", scale_cur), ("scale_prev", scale_prev)):
        if value is not None:
            real(name, value)


def real(name: str, value) -> float:
    """A finite Python real number, returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def weight(name: str, value) -> float:
    """A momentum weight eta in [0, 1]."""
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def radius(value) -> float:
    """The projection radius r_v: positive, ``math.inf`` meaning no projection."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"radius must be a Python real number, got {type(value).__name__}")
    value = float(value)
    if not value > 0.0:  # also rejects NaN
        raise ValueError(f"radius must be > 0, got {value}")
    return value


def check_sqnorm(w_sqnorm: torch.Tensor, w: torch.Tensor) -> None:
    """The squared norm handed to the projection: one floating element on w's device."""
    if not isinstance(w_sqnorm, torch.Tensor):
        raise TypeError(f"w_sqnorm must be a torch.Tensor, got {type(w_sqnorm).__name__}")
    if w_sqnorm.numel() != 1:
        raise ValueError(f"w_sqnorm must hold exactly one element, got shape {tuple(w_sqnorm.shape)}")
    if w_sqnorm.dtype not in FLOAT_DTYPES:
        raise ValueError(f"w_sqnorm must have a floating dtype, got {w_sqnorm.dtype}")
    if w_sqnorm.device != w.device:
        raise ValueError(f"w_sqnorm must be on the device of w ({w.device}), got {w_sqnorm.device}")
