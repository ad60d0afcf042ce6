"""The bilevel problem: two objectives, and how batches are drawn for them.

    min_x  Φ(x) = f(x, y*(x))   s.t.  y*(x) = argmin_y g(x, y)

``f`` (outer) and ``g`` (inner) are plain functions ``(x, y, batch) -> scalar Tensor``
with ``x`` and ``y`` dicts of tensors.
"""
from __future__ import annotations

import collections.abc
import functools
import itertools
import numbers
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from . import buffers, randomness
from . import tree as T
from . import units
from .ranks import check_equal_batches
from .tracing import in_functorch_transform, in_sharded_step, use_func_mechanism

__all__ = ["Bilevel", "draw", "check_params", "check_positive", "check_steps", "check_unit",
           "in_functorch_transform", "use_func_mechanism"]

Objective = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Any], Tensor]


def _checked_scalar(fn, name):
    """Wrap an objective so that a non-tensor or non-scalar result raises a clear error."""
    def wrapped(x, y, batch):
        out = fn(x, y, batch)
        if not isinstance(out, Tensor):
            raise TypeError(f"the {name} objective must return a scalar torch.Tensor, got {type(out).__name__}")
        if out.numel() != 1:
            raise ValueError(f"the {name} objective must return a scalar, got shape {tuple(out.shape)}")
        return out.reshape(())
    wrapped.__wrapped__ = fn
    return wrapped


_UNCHECKED = object()        # check_uses: no outer batch given, x's use is not checked


class Bilevel:
    """A bilevel problem ``min_x f(x, y*(x))``, ``y*(x) = argmin_y g(x, y)``.

    Args:
        outer: ``f(x, y, batch) -> scalar Tensor``, the upper-level (validation) loss.
        inner: ``g(x, y, batch) -> scalar Tensor``, the lower-level (training) loss,
            assumed strongly convex in ``y`` by the theory of every method here.

        features: optional ``phi(x, batch) -> z`` (a tensor or a dict of tensors), the part
            of the objectives that depends on x alone (a network body under a head y, the
            shared representation of hyper-representation and meta-learning).  Then ``f`` and
            ``g`` take ``(z, y, batch)`` and the problem means
            ``g(x, y, batch) = g(phi(x, batch), y, batch)`` (same for f).  Every method gives
            the result of that composed form; declaring phi lets them evaluate it once per
            distinct (x, batch) in a hypergradient call or a step instead of once per
            evaluation of g: ITD differentiates through phi once, PZOBO runs phi once per
            direction and then head-only inner steps, the double loop's inner steps and
            AID's products run on the head only (measured on LeNet hyper-representation in
            bench/RESULTS.md).  Batches are told apart by identity: a batch object passed
            again (full batch, ``itertools.repeat``) reuses its features within the call;
            fresh minibatches get fresh features.  Nothing is kept between calls.
        reduce: optional hook ``flat Tensor -> Tensor`` averaging a 1-D buffer over a
            data-parallel group (set by :func:`torchbilevel.distributed.data_parallel`;
            None: single process).  Every data-dependent derivative the library evaluates
            goes through :meth:`average`, which calls it.

    ``x`` and ``y`` are ``dict[str, Tensor]``.  ``problem.outer`` / ``problem.inner``
    are the objectives wrapped so that each call checks it returned a scalar tensor
    (TypeError / ValueError otherwise); the originals are ``outer_fn`` / ``inner_fn``.
    With ``features``, ``problem.outer`` / ``problem.inner`` are the composed objectives of
    ``(x, y, batch)`` and ``problem.head_outer`` / ``problem.head_inner`` the checked
    ``f`` / ``g`` of ``(z, y, batch)``.
    """
    __slots__ = ("outer", "inner", "outer_fn", "inner_fn", "reduce", "features", "head_outer", "head_inner",
                 "_inner_uses_y", "_uses_x", "shards", "_ranks_checked")

    def __init__(self, outer: Objective, inner: Objective, *, features: Optional[Callable] = None,
                 reduce: Optional[Callable[[Tensor], Tensor]] = None):
        for name, fn in (("outer", outer), ("inner", inner)):
            if not callable(fn):
                raise TypeError(f"Bilevel({name}=...) must be callable (x, y, batch) -> scalar Tensor, "
                                f"got {type(fn).__name__}")
        if features is not None and not callable(features):
            raise TypeError(f"Bilevel(features=...) must be None or callable (x, batch) -> Tensor or dict of "
                            f"Tensors, got {type(features).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"Bilevel(reduce=...) must be None or callable (Tensor -> Tensor), got {type(reduce).__name__}")
        self.outer_fn, self.inner_fn = outer, inner
        self.features = features
        self.head_outer = _checked_scalar(outer, "outer")
        self.head_inner = _checked_scalar(inner, "inner")
        if features is None:
            self.outer, self.inner = self.head_outer, self.head_inner
        else:
            self.outer = _checked_scalar(_composed(outer, features), "outer")
            self.inner = _checked_scalar(_composed(inner, features), "inner")
        self.reduce = reduce
        self._inner_uses_y = False
        self._uses_x = False
        self._ranks_checked = False      # sharding.localize: every rank shards the same keys (once)
        # (Specs of x, Specs of y) when the objectives run on local shards of a sharded model
        # (set by torchbilevel.sharding.localize), else None
        self.shards = None

    def with_reduce(self, reduce) -> "Bilevel":
        """The same problem (objectives and features) with another data-parallel hook."""
        return Bilevel(self.outer_fn, self.inner_fn, features=self.features, reduce=reduce)

    def check_inner_uses_y(self, x, y, inner_batch):
        """Raise ValueError if the inner objective g has no gradient path from y to its value
        (then there is no inner problem: AID and stocBiO would return an all-zero implicit
        term, ITD plain ∇x f).  Checked once per problem, on the first eager call of a method,
        with one forward and one backward of g (buffers and the random stream untouched).
        A zero ∇y g at an optimum is legitimate and passes: only the graph is inspected.

        Returns the batch to use: an iterator's first sample is put back in front of it."""
        return self.check_uses(x, y, inner_batch, _UNCHECKED)[0]

    def check_uses(self, x, y, inner_batch, outer_batch):
        """:meth:`check_inner_uses_y`, and (given ``outer_batch``) ValueError if
        neither objective has a gradient path from x: a hypergradient would be a silent zero
        — the sign of a model wrapper whose forward ignores the tensors it is given.  Once per
        problem; an f evaluation only when g does not use x.  Returns the two batches to use
        (iterators' first samples put back)."""
        if self._inner_uses_y and (outer_batch is _UNCHECKED or self._uses_x) or in_functorch_transform() \
                or torch.compiler.is_compiling():
            return inner_batch, outer_batch
        first = draw(inner_batch, "inner_batch")
        if isinstance(inner_batch, collections.abc.Iterator):
            inner_batch = itertools.chain([first], inner_batch)
        sharded = any(hasattr(t, "placements") for t in list(x.values()) + list(y.values()))
        if self.reduce is not None or sharded:
            check_equal_batches(first, outer_batch)
        xs = {k: t.detach().requires_grad_(True) for k, t in x.items()}
        ys = {k: t.detach().requires_grad_(True) for k, t in y.items()}
        # a sharded model: the objectives see the DTensors as tb.nn.call gathers them, one
        # fully_shard unit at a time (torchbilevel.units), never the whole model at once
        xo, yo = (units.LazyGathered(xs), units.LazyGathered(ys)) if sharded else (xs, ys)
        state = randomness.capture(x, y)
        try:
            with torch.enable_grad(), buffers.frozen(), units.regathering():
                val = self.inner(xo, yo, first)
                gs = (torch.autograd.grad(val, list(ys.values()) + list(xs.values()), allow_unused=True)
                      if val.requires_grad else [None] * (len(ys) + len(xs)))
                used = any(gi is not None for gi in gs[:len(ys)])
                uses_x = any(gi is not None for gi in gs[len(ys):])
                if used and not uses_x and outer_batch is not _UNCHECKED:
                    ob = draw(outer_batch, "outer_batch")
                    if isinstance(outer_batch, collections.abc.Iterator):
                        outer_batch = itertools.chain([ob], outer_batch)
                    fv = self.outer(xo, yo, ob)
                    uses_x = fv.requires_grad and any(
                        gi is not None for gi in torch.autograd.grad(fv, list(xs.values()), allow_unused=True))
        finally:
            randomness.restore(state)
        if not used:
            raise ValueError("the inner objective g does not depend on y (no gradient path from y to its value): "
                             "there is no inner problem to differentiate through. Check that g uses its "
                             "second argument (e.g. tb.nn.call(model, x, y, ...)) and does not detach it; a "
                             "wrapped model (DistributedDataParallel, FSDP1, torch.compile) evaluates its own "
                             "parameters: pass the module inside it")
        self._inner_uses_y = True
        if outer_batch is not _UNCHECKED:
            if not uses_x:
                raise ValueError("neither objective depends on x (no gradient path from x to f or g): every "
                                 "hypergradient would be zero. Check that f or g uses its first argument (e.g. "
                                 "tb.nn.call(model, x, y, ...)) and does not detach it; a wrapped model "
                                 "(DistributedDataParallel, FSDP1, torch.compile) evaluates its own parameters: "
                                 "pass the module inside it")
            self._uses_x = True
        return inner_batch, outer_batch

    def average(self, *items):
        """``items`` (dicts of tensors, tensors or None) averaged over the data-parallel
        group: one call of the ``reduce`` hook on one flat buffer holding all of them.
        Returns a tuple like ``items``; without a hook, ``items`` themselves (no copy); inside
        a sharded step (its objectives are already means over ranks) too."""
        if self.reduce is None or in_sharded_step():
            return items
        if in_functorch_transform():
            raise RuntimeError("a data-parallel problem (reduce hook) does not compose with torch.func "
                               "transforms (vmap, grad): collectives cannot run on batched tensors")
        leaves = [t for it in items if it is not None
                  for t in (it.values() if isinstance(it, collections.abc.Mapping) else (it,))]
        if not leaves:
            return items
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in leaves])
        flat = self.reduce(torch.cat([t.reshape(-1).to(dtype) for t in leaves]))
        out, pos = [], 0

        def take(t):
            nonlocal pos
            part = flat[pos:pos + t.numel()].view(t.shape).to(t.dtype)
            pos += t.numel()
            return part

        for it in items:
            if it is None:
                out.append(None)
            elif isinstance(it, collections.abc.Mapping):
                out.append({k: take(t) for k, t in it.items()})
            else:
                out.append(take(it))
        return tuple(out)

    def __repr__(self):
        name = lambda fn: getattr(fn, "__qualname__", repr(fn))
        hook = "" if self.reduce is None else f", reduce={self.reduce!r}"
        feats = "" if self.features is None else f", features={name(self.features)}"
        return f"Bilevel(outer={name(self.outer_fn)}, inner={name(self.inner_fn)}{feats}{hook})"


def _composed(fn, features):
    """(x, y, batch) -> fn(features(x, batch), y, batch): the meaning of a declared problem."""
    def composed(x, y, batch):
        return fn(check_features(features(x, batch)), y, batch)
    composed.__qualname__ = f"{getattr(fn, '__qualname__', 'fn')}∘features"
    return composed


def check_features(z):
    """``z`` if it is a tensor or a non-empty dict of tensors, else TypeError."""
    if isinstance(z, Tensor):
        return z
    if isinstance(z, collections.abc.Mapping) and z and all(isinstance(t, Tensor) for t in z.values()):
        return z
    raise TypeError(f"features(x, batch) must return a Tensor or a non-empty dict of Tensors, got {type(z).__name__}")


__all__.append("check_features")


def check_problem(problem) -> Bilevel:
    """Raise TypeError unless ``problem`` is a :class:`Bilevel`."""
    if not isinstance(problem, Bilevel):
        raise TypeError(f"problem must be a torchbilevel.Bilevel, got {type(problem).__name__}")
    return problem


__all__.append("check_problem")


def draw(batch, name: str = "batch"):
    """A fresh sample from ``batch`` when it is an iterator (``next``), else ``batch`` itself.

    This is the library's batching rule: pass an iterator to get a new minibatch each
    time a method needs fresh samples; pass anything else for full-batch evaluation.
    ``name`` (``"inner_batch"`` / ``"outer_batch"``) is the argument named when an
    iterator runs out (ValueError, not a StopIteration that a surrounding loop or
    generator would silently swallow).
    """
    if isinstance(batch, collections.abc.Iterator):
        try:
            return next(batch)
        except StopIteration:
            raise ValueError(f"the {name} iterator was exhausted: pass an infinite iterator "
                             "(e.g. itertools.cycle or a generator with `while True`)") from None
    return batch


def check_params(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> None:
    """Validate the outer and inner parameter dicts (before any work is done).

    Both must be non-empty dicts of floating-point tensors of one dtype and device.
    """
    for name, d in (("x", x), ("y", y)):
        if not isinstance(d, collections.abc.Mapping):
            raise TypeError(f"{name} must be a dict[str, Tensor], got {type(d).__name__}")
        if len(d) == 0:
            raise ValueError(f"{name} is an empty dict: nothing to optimise")
        for k, t in d.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{k!r}] must be a torch.Tensor, got {type(t).__name__}")
            if not torch.is_floating_point(t):
                raise TypeError(f"{name}[{k!r}] has dtype {t.dtype}; torchbilevel needs floating-point "
                                f"parameters")
    dtypes = {t.dtype for t in x.values()} | {t.dtype for t in y.values()}
    if len(dtypes) > 1:
        raise TypeError(f"x and y must share one floating dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in x.values()} | {t.device for t in y.values()}
    if len(devices) > 1:
        raise ValueError(f"x and y must live on one device, got {sorted(map(str, devices))}")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_steps(value, name: str, minimum: int = 1) -> int:
    """An integer step count >= minimum, or ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive(value, name: str, allow_schedule: bool = False):
    """A finite number > 0 (or, when allowed, a callable schedule ``t -> number``)."""
    if allow_schedule and callable(value):
        return value
    if not _is_number(value):
        raise TypeError(f"{name} must be a positive number{' or a callable of the step t' if allow_schedule else ''}, "
                        f"got {value!r}")
    if not (value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_unit(value, name: str, allow_schedule: bool = False):
    """A number in [0, 1] (or, when allowed, a callable schedule ``t -> number``)."""
    if allow_schedule and callable(value):
        return value
    if not _is_number(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def check_finite(where: str, *trees: Mapping[str, Tensor]) -> None:
    """Raise FloatingPointError if any entry is NaN/inf (one host read; skipped inside
    torch.func transforms, where values cannot be inspected)."""
    if in_functorch_transform():
        return
    if not bool(T.all_finite(*trees)):
        raise FloatingPointError(f"non-finite values (NaN or inf) in {where}")


__all__.append("check_finite")
