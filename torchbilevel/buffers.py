"""When module buffers (BatchNorm running statistics) may change.

A hypergradient is a pure transform: evaluating derivative products, finite-difference
points, perturbed paths or a re-evaluation of a previous iterate must not move the running
statistics a user later evaluates with.  Training updates them once per inner gradient
step.  The library marks its evaluations with these two contexts and
:func:`torchbilevel.nn.call` obeys them:

* :func:`frozen` — the forward still normalises with the batch statistics in train mode
  (that is the objective being differentiated) but no buffer changes: BatchNorm-type
  modules run with ``track_running_stats`` off for the call (which is also what makes them
  work under ``torch.func.vmap``), and any other buffer that the forward modifies in place
  is put back.
* :func:`updating` — the module behaves as in ordinary training (each train-mode forward
  updates its running statistics once).  Inside torch.func transforms (vmap over tasks)
  buffers cannot be updated in place, so they stay frozen there.

Outside any library call, ``tb.nn.call`` behaves like the module itself (updating).
Objectives that call a module directly (``model(X)`` rather than ``tb.nn.call``) are not
seen by these contexts.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .tracing import in_functorch_transform

__all__ = ["frozen", "updating", "is_frozen", "transaction", "journal", "note_train_buffers", "train_buffer_calls"]

class _ThreadState(threading.local):
    """What the contexts below set, per thread: two threads running two problems never see
    each other's frozen flag, buffer count or journal (tests/test_layers.py).  A
    ``threading.local``, not a ContextVar: torch.compile traces attribute reads and writes
    of it inside one graph (dynamo refuses ContextVar.set)."""

    def __init__(self):
        self.frozen = False     # inside frozen(): evaluations leave buffers untouched
        self.calls = 0          # train-mode evaluations of modules with buffers (tb.nn.call)
        self.journal = None     # inside transaction(): id(buffer) -> (buffer, copy), else None


_STATE = _ThreadState()


@contextlib.contextmanager
def _set(value: bool):
    old = _STATE.frozen
    _STATE.frozen = value
    try:
        yield
    finally:
        _STATE.frozen = old


def frozen():
    """Context: evaluations inside leave module buffers untouched (see the module docstring)."""
    return _set(True)


def updating():
    """Context: evaluations inside update running statistics as training does."""
    return _set(False)


def is_frozen() -> bool:
    """True when buffers must not change: inside :func:`frozen`, or inside a torch.func
    transform (where an in-place update of an unbatched buffer is impossible)."""
    if _STATE.frozen:
        return True
    return in_functorch_transform()


@contextlib.contextmanager
def transaction():
    """Context: if the block raises, every buffer that :func:`torchbilevel.nn.call` updated
    inside it (running statistics of the inner steps already taken) is put back as it was on
    entry, so that a failed step (FloatingPointError) leaves the model as it leaves the
    state.  One copy of each touched buffer per step."""
    outer = _STATE.journal
    book = _STATE.journal = {} if outer is None else outer
    try:
        yield
    except BaseException:
        if outer is None:
            with torch.no_grad():
                for buf, copy in book.values():
                    buf.copy_(copy)
        raise
    finally:
        if outer is None:
            _STATE.journal = None


def journal(tensors) -> None:
    """Record ``tensors`` (buffers about to be updated in place) in the open
    :func:`transaction`, once each; nothing outside a transaction."""
    book = _STATE.journal
    if book is None:
        return
    for t in tensors:
        if id(t) not in book:
            book[id(t)] = (t, t.detach().clone())


def note_train_buffers() -> None:
    """Count one train-mode evaluation of a module that has buffers (tb.nn.call)."""
    _STATE.calls += 1


def train_buffer_calls() -> int:
    """How many train-mode evaluations of modules with buffers tb.nn.call has made: an
    algorithm compares it across its first step to learn whether its objective has running
    statistics to maintain."""
    return _STATE.calls
