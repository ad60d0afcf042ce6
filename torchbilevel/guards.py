"""Non-finite guards: which stage of a hypergradient or an algorithm step produced NaN/inf.

Every public transform and step checks its result for NaN/inf with one host read
(``check_finite=True``, the default) and raises ``FloatingPointError`` with the state
and inputs untouched.  To name the stage, the estimators :func:`record` their
intermediate results (inner iterate, outer gradient, linear-system solution, mixed
product) while a :func:`tracing` context is open.  Recording stores references only;
the values are inspected after a failure, so a finite call pays nothing but a few list
appends.  Outside a trace (``check_finite=False``) :func:`record` does nothing.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .tracing import in_functorch_transform

__all__ = ["StageTrace", "tracing", "record", "locate", "check_inputs",
           "INNER", "OUTER", "LINEAR", "MIXED", "PATHS", "UPDATE", "UNROLL_BACKWARD"]

# Stage names, in the order a hypergradient computes them.
INNER = "the inner iterate (inner gradient steps on ∇y g)"
PATHS = "the perturbed inner paths y_N(x + μu) (inner gradient steps on ∇y g)"
OUTER = "the outer objective f or its gradient ∇f (outer gradient)"
LINEAR = "the linear-system solution v (∇yy g·v = ∇y f: Hessian-vector products or ∇y f)"
MIXED = "the mixed product ∇xy g·v (hypergradient)"
UNROLL_BACKWARD = "the backward pass through the unrolled inner steps (hypergradient)"
UPDATE = "the outer update (step size too large: x overflowed)"


class StageTrace:
    """Stages recorded during one guarded call, in order: ``[(stage, finite), ...]`` with
    ``finite`` a 0-d bool tensor on the device (whether every item the stage recorded was
    finite when recorded).  Flags, not the tensors: a trace must not keep a step's
    gradients alive (a lean step frees each one as soon as it is used)."""
    __slots__ = ("stages",)

    def __init__(self):
        self.stages: List[Tuple[str, Tensor]] = []

    def first_nonfinite(self) -> Optional[str]:
        """The first recorded stage holding NaN/inf (reads values: call after a failure)."""
        for stage, finite in self.stages:
            if not bool(finite):
                return stage
        return None


# One stack per thread (a trace only ever affects the wording of an error message, and two
# threads running two problems must not append to each other's).
_LOCAL = threading.local()


def _traces() -> List[StageTrace]:
    if not hasattr(_LOCAL, "traces"):
        _LOCAL.traces = []
    return _LOCAL.traces


@contextlib.contextmanager
def tracing(enabled: bool = True) -> Iterator[Optional[StageTrace]]:
    """Open a trace that :func:`record` appends to (yields None when disabled or inside a
    torch.func transform, where nothing is checked)."""
    if not enabled or in_functorch_transform():
        yield None
        return
    trace = StageTrace()
    traces = _traces()
    traces.append(trace)
    try:
        yield trace
    finally:
        traces.pop()


def record(stage: str, *items) -> None:
    """Note that ``items`` (dicts of tensors, tensors or None) are the output of ``stage``
    in the innermost open trace (whether they are finite now, as a device flag: no host
    read, no reference kept); a no-op when none is open."""
    traces = _traces()
    if traces:
        flags = [torch.isfinite(t.detach()).all() for it in items for t in _leaves(it)]
        if flags:
            traces[-1].stages.append((stage, flags[0] if len(flags) == 1 else torch.stack(flags).all()))


def _leaves(item):
    if item is None:
        return []
    if isinstance(item, Mapping):
        return [t for t in item.values() if isinstance(t, Tensor)]
    return [item] if isinstance(item, Tensor) else []


def _finite(*items) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for it in items for t in _leaves(it))


def check_inputs(**trees) -> Optional[str]:
    """``"x['a']"``-style name of the first non-finite entry among the given dicts, or None."""
    for name, tree in trees.items():
        if tree is None:
            continue
        if isinstance(tree, Tensor):
            if not _finite(tree):
                return name
            continue
        for k, t in tree.items():
            if isinstance(t, Tensor) and not _finite(t):
                return f"{name}[{k!r}]"
    return None


def locate(trace: Optional[StageTrace], fallback: str, **inputs) -> str:
    """Describe where NaN/inf first appears: a non-finite input (named), else the first
    non-finite recorded stage, else ``fallback``."""
    bad = check_inputs(**inputs)
    if bad is not None:
        return f"the inputs: {bad} holds NaN/inf before any computation"
    stage = trace.first_nonfinite() if trace is not None else None
    return stage if stage is not None else fallback
