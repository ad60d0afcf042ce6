"""Where a call runs: inside a torch.func transform, or while torch.compile traces.

The lowest layer of the library (it imports only torch): buffers, problem, derivatives and
the estimators ask it which mechanism to use (torch.func or torch.autograd) and whether
values may be read on the host.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["in_functorch_transform", "use_func_mechanism", "sharded_step", "in_sharded_step"]

_LOCAL = threading.local()


@contextlib.contextmanager
def sharded_step(active: bool = True):
    """Context: a step of a method on local shards (torchbilevel.sharding), whose objectives
    already return the mean over ranks — ``Bilevel.average`` is then the identity (per
    thread)."""
    old = getattr(_LOCAL, "sharded", False)
    _LOCAL.sharded = active or old
    try:
        yield
    finally:
        _LOCAL.sharded = old


def in_sharded_step() -> bool:
    """True inside :func:`sharded_step`."""
    return getattr(_LOCAL, "sharded", False)


def in_functorch_transform() -> bool:
    """True inside torch.func transforms (vmap, grad, jvp, ...), where we must use the
    torch.func mechanism and cannot read values on the host.  (The dynamic-layer depth, not
    ``peek_interpreter_stack``: under torch.compile the latter reads as non-None everywhere,
    which silently disabled the finite checks of compiled code.)"""
    return torch._C._functorch.get_dynamic_layer_stack_depth() > 0


def use_func_mechanism() -> bool:
    """True where derivatives must go through torch.func rather than torch.autograd.grad:
    inside torch.func transforms, and while torch.compile traces (aot_autograd does not
    support double backward through ``torch.autograd.grad``)."""
    return in_functorch_transform() or torch.compiler.is_compiling()
