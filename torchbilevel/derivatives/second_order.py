"""Objectives without a double backward: the guard that names them when a second-order
method fails, and the record of cuDNN RNN modules seen (written by ``torchbilevel.nn.call``,
read here: the record lives in this lower layer so that derivatives never import nn).
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["second_order", "note_cudnn_rnn", "cudnn_rnns_seen", "math_attention_active", "math_sdpa"]

# Type names of RNN modules evaluated on CUDA with cuDNN in this process.  Process-wide on
# purpose: it only words an error message, and a module type seen by any thread is worth
# naming; no result depends on it.
_CUDNN_SEEN: set = set()


def note_cudnn_rnn(type_name: str) -> None:
    """Record that an RNN module of this type ran on CUDA with cuDNN (torchbilevel.nn.call)."""
    _CUDNN_SEEN.add(type_name)


def cudnn_rnns_seen() -> list:
    """Type names of RNN modules (nn.LSTM, ...) evaluated on CUDA with cuDNN through
    :func:`torchbilevel.nn.call` in this process: used to name them when a second-order
    method fails."""
    return sorted(_CUDNN_SEEN)


_NO_DOUBLE_BACKWARD = ("_cudnn_rnn_backward", "once_differentiable", "differentiate twice", "double backward")


_LOCAL = threading.local()       # per thread: inside a second_order(math_attention=True) block


def math_attention_active() -> bool:
    """True inside a block whose evaluations are differentiated twice (torchbilevel.nn.call
    reads it to warn once about attention modules)."""
    return getattr(_LOCAL, "math", False)


# sdpa_kernel sets process-wide backend flags and restores what it saw on entry: two
# threads' contexts interleaved restore each other's state out of order (measured: two
# threads running AID left the process on the math backend for good).  One count for the
# process: the first entry sets the math backend, the last exit restores the flags.
_SDPA_LOCK = threading.Lock()
_SDPA_HELD = {"users": 0, "ctx": None}


@contextlib.contextmanager
def math_sdpa():
    """``scaled_dot_product_attention`` on its math backend inside the block, safe across
    threads (see above); under torch.compile the plain ``sdpa_kernel`` (Dynamo traces it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if torch.compiler.is_compiling():
        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    with _SDPA_LOCK:
        if _SDPA_HELD["users"] == 0:
            ctx = sdpa_kernel([SDPBackend.MATH])
            ctx.__enter__()
            _SDPA_HELD["ctx"] = ctx
        _SDPA_HELD["users"] += 1
    try:
        yield
    finally:
        with _SDPA_LOCK:
            _SDPA_HELD["users"] -= 1
            if _SDPA_HELD["users"] == 0:
                ctx, _SDPA_HELD["ctx"] = _SDPA_HELD["ctx"], None
                ctx.__exit__(None, None, None)


@contextlib.contextmanager
def _math_attention(enabled: bool):
    if not enabled:
        yield
        return
    old = getattr(_LOCAL, "math", False)
    _LOCAL.math = True
    try:
        with math_sdpa():
            yield
    finally:
        _LOCAL.math = old


@contextlib.contextmanager
def second_order(method: str, math_attention: bool = True):
    """Context for a method that differentiates a gradient again (AID, ITD, stocBiO, FMBO):
    an objective without a double backward — a cuDNN RNN on CUDA (nn.LSTM, nn.GRU, nn.RNN),
    a custom ``@once_differentiable`` function — fails deep inside autograd; this turns
    that failure into a RuntimeError naming the module type (seen by
    :func:`torchbilevel.nn.call`), the method and the methods that need no double backward.

    ``math_attention``: evaluations inside run ``F.scaled_dot_product_attention`` on its math
    backend (``torch.nn.attention.sdpa_kernel``): the flash and memory-efficient kernels
    (flash is the default on CPU too) have no double backward, the math backend has — at the
    cost of materialising the (L x S) attention matrix per head (``tb.nn.call`` warns once
    when it evaluates an attention module here)."""
    try:
        with _math_attention(math_attention):
            yield
    except RuntimeError as err:
        text = str(err)
        if not (any(m in text for m in _NO_DOUBLE_BACKWARD)
                or ("derivative for" in text and "is not implemented" in text)):
            raise
        rnns = cudnn_rnns_seen()
        who = (f"{', '.join(rnns)} on CUDA (cuDNN RNN kernels)" if rnns else "an operation of the objective")
        hint = (" or keep the RNN but disable cuDNN for it (with torch.backends.cudnn.flags(enabled=False): ...)"
                if rnns else "")
        raise RuntimeError(
            f"{method} differentiates the gradient of g a second time (Hessian/Jacobian-vector products), "
            f"and {who} has no double backward. Use a method that needs only gradients: tb.fdehbo "
            f"(finite-difference products), tb.pzobo (zeroth order in x) or tb.first_order(){hint}. "
            f"Original error: {text.splitlines()[0] if text else type(err).__name__}") from err
