"""Per-unit gathering of FSDP2-sharded parameters, as FSDP's own forward and backward do.

``fully_shard`` makes units (each module it was applied to, owning the parameters no inner
unit owns).  FSDP's forward all-gathers a unit's parameters just before that unit runs and
frees them after its forward (``reshard_after_forward``); its backward gathers them again.
``tb.nn.call`` does the same on the DTensors it is *given* (never the module's own
parameters), so that a rank holds the full parameters of one unit at a time:

- :func:`unit_hooks` — forward pre/post hooks on every unit for the duration of one call:
  the pre-hook puts ``gather(d)`` in place of each DTensor ``d`` the unit owns, the post-hook
  puts ``d`` back, so nothing but autograd still refers to the gathered tensor;
- :func:`regathering` — a ``saved_tensors_hooks`` context: an operator that saves a gathered
  parameter for its backward (``addmm`` saves the weight) saves a recipe instead, and its
  backward gathers again.  Only values are re-gathered: the gradient still flows through the
  first gather's edge (its backward reduce-scatters, summed over ranks), so the result is
  the same bits as one gather held for the whole call.

Mixed precision (``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=...))``):
the unit's parameters are cast to ``param_dtype`` after the gather (their gradient is cast
back to the shard's dtype before the reduce-scatter: reductions in float32 for float32
shards) and the unit's floating-point inputs are cast to ``param_dtype`` when the policy
says ``cast_forward_inputs``, as FSDP2's own pre-forward does.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .tracing import in_functorch_transform

__all__ = ["is_dtensor", "gather", "regathering", "unit_hooks", "explained", "Unit", "units_of", "owned", "LazyGathered", "compute_dtypes"]


def is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


class _Live(NamedTuple):
    ref: "weakref.ref"       # the gathered tensor (alive while a module or the user holds it)
    source: object           # the DTensor it was gathered from
    dtype: Optional[torch.dtype]
    offset: int              # its storage offset


_STATE = threading.local()    # per thread: storage pointer -> _Live, of gathered tensors alive


def _live() -> dict:
    if not hasattr(_STATE, "live"):
        _STATE.live = {}
    return _STATE.live


def _rows(d) -> Optional[tuple]:
    """(group, world, rows per rank, global rows) of a DTensor in FSDP2's default layout
    (``Shard(0)`` on a 1-D mesh, torch.chunk's split); None for any other layout."""
    mesh, pl = d.device_mesh, d.placements
    if mesh.ndim != 1 or len(pl) != 1 or type(pl[0]).__name__ != "Shard" or pl[0].dim != 0:
        return None
    n = mesh.size()
    rows = d.shape[0]
    return mesh.get_group(), n, -(-rows // n), rows


# torch >= 2.10 names them all_gather_single / reduce_scatter_single (the *_tensor names warn)
_ALL_GATHER = getattr(torch.distributed, "all_gather_single", None) or getattr(torch.distributed,
                                                                              "all_gather_into_tensor", None)
_REDUCE_SCATTER = getattr(torch.distributed, "reduce_scatter_single", None) or getattr(torch.distributed,
                                                                                     "reduce_scatter_tensor", None)


def _all_gather(local: Tensor, group, world: int, chunk: int, rows: int) -> Tensor:
    """The full tensor from each rank's ``local`` rows: padded to ``chunk`` rows, one
    synchronous all_gather_into_tensor, the padding cut off (FSDP2 pads the same way)."""
    tail = tuple(local.shape[1:])
    if local.shape[0] != chunk:
        local = torch.cat([local, local.new_zeros((chunk - local.shape[0],) + tail)])
    out = local.new_empty((world * chunk,) + tail)
    _ALL_GATHER(out, local.contiguous(), group=group)
    return out[:rows] if rows != world * chunk else out


class _Gather(torch.autograd.Function):
    """Full tensor from the local shards; backward: the gradient reduce-scattered (summed
    over ranks) to this rank's rows."""

    @staticmethod
    def forward(ctx, local: Tensor, group, world: int, chunk: int, rows: int) -> Tensor:
        ctx.meta = (group, world, chunk, rows, local.shape[0])
        return _all_gather(local.detach(), group, world, chunk, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group, world, chunk, rows, mine = ctx.meta
        grad = grad.contiguous()
        if rows != world * chunk:
            grad = torch.cat([grad, grad.new_zeros((world * chunk - rows,) + tuple(grad.shape[1:]))])
        out = grad.new_empty((chunk,) + tuple(grad.shape[1:]))
        _REDUCE_SCATTER(out, grad, group=group)
        return out[:mine], None, None, None, None


def _full(d, grad: bool) -> Tensor:
    """The full tensor of DTensor ``d``: FSDP2's layout through one synchronous all-gather
    (its buffers freed as soon as the tensor is), any other layout through
    ``DTensor.full_tensor``."""
    rows = _rows(d)
    if rows is None:
        if not grad:
            return d.full_tensor()
        from torch.distributed.tensor import Partial
        return d.full_tensor(grad_placements=[Partial()] * len(d.placements))
    local = d.to_local()
    if not grad:
        return _all_gather(local.detach(), *rows)
    return _Gather.apply(local, *rows)


def gather(d, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The full tensor of DTensor ``d`` (its backward reduce-scatters the gradient, summed over
    ranks), cast to ``dtype`` after the gather; registered so that an operator saving it for
    its backward saves a recipe instead (:func:`regathering`)."""
    full = _full(d, grad=True)
    if dtype is not None and full.dtype != dtype:
        full = full.to(dtype)
        _STATE.compute = getattr(_STATE, "compute", frozenset()) | {dtype}
    live = _live()
    key = full.untyped_storage().data_ptr()

    def forget(_ref, key=key):
        e = live.get(key)
        if e is not None and e.ref is _ref:
            del live[key]
    live[key] = _Live(weakref.ref(full, forget), d, dtype, full.storage_offset())
    return full


@contextlib.contextmanager
def compute_dtypes():
    """Context yielding a set filled with the dtypes parameters were cast to after their
    gather (FSDP2's ``param_dtype``) by the evaluations inside, in this thread."""
    old = getattr(_STATE, "compute", frozenset())
    _STATE.compute = frozenset()
    seen = set()
    try:
        yield seen
    finally:
        seen.update(_STATE.compute)
        _STATE.compute = old | _STATE.compute


class _Regather(NamedTuple):
    source: object
    dtype: Optional[torch.dtype]
    size: tuple
    stride: tuple
    offset: int              # relative to the gathered tensor's own storage offset


def _pack(t: Tensor):
    if type(t) is not torch.Tensor or t.is_meta:
        return t
    live = _live()
    if not live:
        return t
    e = live.get(t.untyped_storage().data_ptr())
    if e is None or e.ref() is None or t.dtype != e.ref().dtype:
        return t
    return _Regather(e.source, e.dtype, tuple(t.size()), tuple(t.stride()), t.storage_offset() - e.offset)


def _unpack(p):
    if not isinstance(p, _Regather):
        return p
    with torch.no_grad():
        full = _full(p.source, grad=False)
        if p.dtype is not None and full.dtype != p.dtype:
            full = full.to(p.dtype)
        return full.as_strided(p.size, p.stride, full.storage_offset() + p.offset)


@contextlib.contextmanager
def regathering():
    """Context: gathered parameters saved for a backward are gathered again there instead of
    held (module docstring).  A no-op inside torch.func transforms (they refuse saved-tensor
    hooks; sharded evaluations never run under them) and when nested."""
    if in_functorch_transform() or getattr(_STATE, "active", False):
        yield
        return
    _STATE.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _STATE.active = False


class Unit(NamedTuple):
    """One fully_shard unit: the module, (submodule, attribute) pairs of the parameters it
    owns (tied uses included), its compute dtype and whether it casts its inputs."""
    module: nn.Module
    slots: tuple
    param_dtype: Optional[torch.dtype]
    cast_inputs: bool


_UNITS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def units_of(module: nn.Module) -> tuple:
    """The fully_shard units inside ``module`` (itself included), read once from FSDP2's
    records of which unit owns which parameter.  ValueError, before any work, for a layout
    the per-unit gather cannot follow: a parameter tied between a unit and a module outside
    it (used outside the forward that gathers it), or a sharded parameter no unit owns."""
    if module in _UNITS:
        return _UNITS[module][0]
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:          # pragma: no cover - builds without distributed
        return ()
    units = []
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        inside = set(m.modules())
        slots = []
        for group in getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]:
            for fp in (group.fsdp_params if group is not None else ()):
                info = fp._module_info
                pairs = [(info.module, info.param_name)] + list(zip(info.shared_modules, info.shared_param_names))
                outside = [type(mod).__name__ for mod, _ in pairs if mod not in inside]
                if outside:
                    raise ValueError(
                        f"per-unit gather: parameter {info.param_name!r} of the fully_shard unit "
                        f"{type(m).__name__} is tied to a module outside that unit ({outside}), where it would be "
                        f"used sharded. Apply fully_shard to a module that contains every use of the tied "
                        f"weight (usually the root only, not the embedding alone)")
                slots.append(tuple(pairs))
        mp = getattr(state, "_mp_policy", None)
        units.append(Unit(m, tuple(slots), getattr(mp, "param_dtype", None),
                          bool(getattr(mp, "cast_forward_inputs", False))))
    slots = {(id(mod), name) for u in units for slot in u.slots for mod, name in slot}
    for name, p in module.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        if is_dtensor(p) and (id(module.get_submodule(owner)), attr) not in slots:
            raise ValueError(
                f"per-unit gather: {name!r} is sharded but no fully_shard unit runs it (a weight tied "
                f"across a unit boundary is used outside the forward that gathers it). Apply fully_shard "
                f"to a module that contains every use of the tied weight (usually the root only, not the "
                f"embedding alone)")
    _UNITS[module] = (tuple(units), frozenset(slots))
    return _UNITS[module][0]


def owned(module: nn.Module) -> frozenset:
    """(id(submodule), attribute) of the parameter slots some unit of ``module`` gathers."""
    units_of(module)
    return _UNITS[module][1] if module in _UNITS else frozenset()


def _cast(obj, dtype):
    if isinstance(obj, Tensor):
        return obj.to(dtype) if torch.is_floating_point(obj) and obj.dtype != dtype else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def unit_hooks(module: nn.Module):
    """Context: every fully_shard unit of ``module`` gathers the DTensors it owns when its
    forward starts and drops them when it ends (for one ``tb.nn.call``)."""
    handles = []
    for u in units_of(module):
        stack = []

        def pre(mod, args, kwargs, u=u, stack=stack):
            put = []
            for slot in u.slots:
                d = slot[0][0]._parameters.get(slot[0][1])
                if not is_dtensor(d):
                    continue
                full = gather(d, u.param_dtype)
                for sub, name in slot:
                    put.append((sub, name, sub._parameters[name]))
                    sub._parameters[name] = full
            stack.append(put)
            if u.cast_inputs and u.param_dtype is not None:
                return _cast(args, u.param_dtype), _cast(kwargs, u.param_dtype)
            return None

        def post(mod, args, out, stack=stack):
            for sub, name, old in stack.pop():
                sub._parameters[name] = old
            return None

        handles.append(u.module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(u.module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def explained():
    """Context: the error of a DTensor met by a plain operator inside a per-unit call (a
    unit's parameters used outside its forward) re-raised as ValueError naming the fix."""
    try:
        yield
    except RuntimeError as err:
        if "mixed torch.Tensor and DTensor" not in str(err):
            raise
        raise ValueError(
            "per-unit gather: a fully_shard unit's parameter was used outside that unit's forward, where it "
            "is still a shard (its forward called as unit.forward(...) or through another method instead of "
            "unit(...), or a weight tied to a module outside the unit). Call each unit as unit(...), or apply "
            "fully_shard to a module enclosing every use of those parameters") from err


class LazyGathered(Mapping):
    """A dict of tensors as the user's objectives see a sharded one: reading an entry gathers
    it (full tensor, registered for :func:`regathering`), while ``tb.nn.call`` takes the
    DTensors themselves (:meth:`sharded`) and gathers one unit at a time."""

    def __init__(self, values: Mapping[str, Tensor]):
        self._values = dict(values)

    def __getitem__(self, k):
        t = self._values[k]
        return gather(t) if is_dtensor(t) else t

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def sharded(self) -> dict:
        """The values as given (DTensors not gathered)."""
        return dict(self._values)

    def __repr__(self):
        return f"LazyGathered({list(self._values)})"
