"""What stands between ``tb.nn.call`` and the module's forward: wrappers whose forward ignores
the tensors functional_call gives (refused), FSDP2's hooks (bypassed for the call), DTensor
values (gathered one fully_shard unit at a time, torchbilevel.units), and attention differentiated twice (warned about once).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from typing import Mapping

import torch
from torch import Tensor, nn

from . import units as U

__all__ = ["check_unwrapped", "gathered", "without_fsdp_hooks", "warn_math_attention"]


def check_unwrapped(module: nn.Module) -> None:
    """TypeError for wrappers whose forward does not see the tensors functional_call gives
    (it would evaluate the wrapper's own parameters: a silent zero hypergradient)."""
    inner = None
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        inner, how = "module.module", "DistributedDataParallel"
    elif type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        inner, how = "module._orig_mod", "a torch.compile'd module"
    else:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:      # pragma: no cover - builds without distributed
            FullyShardedDataParallel = ()
        if FullyShardedDataParallel and isinstance(module, FullyShardedDataParallel):
            inner, how = "fully_shard(model) (FSDP2) instead of FullyShardedDataParallel", "FSDP1"
    if inner is not None:
        raise TypeError(f"tb.nn.call got {how}: its forward evaluates its own (flattened or synchronised) "
                        f"parameters and ignores the x and y given, which would make every hypergradient "
                        f"zero. Pass {inner} to tb.nn.split and tb.nn.call (data parallelism: "
                        f"tb.distributed.data_parallel(problem); sharding: fully_shard)")


# module -> whether its forward calls scaled_dot_product_attention (found at its first
# evaluation inside a second-order block; nn.MultiheadAttention known from its type)
_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
# process-wide on purpose: the warning is given once per process, whichever thread meets it
_WARNED_MATH_ATTENTION = [False]


class _SeesAttention(torch.overrides.TorchFunctionMode):
    """Notes whether F.scaled_dot_product_attention is called (any module: a transformers
    GPT-2 or BERT attention class, a hand-written one), passing every call through."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.seen = True
        return func(*args, **(kwargs or {}))


def _warn_math_attention() -> None:
    _WARNED_MATH_ATTENTION[0] = True
    warnings.warn("an attention module is differentiated twice (a second-order method): "
                  "scaled_dot_product_attention runs on its math backend there, since the flash and "
                  "memory-efficient kernels have no double backward. It materialises the attention "
                  "matrix (batch x heads x L x S) and is slower; the gradient-only methods (tb.fdehbo, "
                  "tb.pzobo, tb.first_order(), tb.f2sa, tb.bome) keep the fast kernels.", RuntimeWarning,
                  stacklevel=4)


@contextlib.contextmanager
def warn_math_attention(module: nn.Module):
    """Context around one evaluation of ``module`` inside a second-order block: warn once per
    process when the module calls scaled_dot_product_attention (found by watching its first
    such evaluation; nn.MultiheadAttention from its type)."""
    if _WARNED_MATH_ATTENTION[0]:
        yield
        return
    known = _ATTENTION.get(module)
    if known is None and any(isinstance(m, nn.MultiheadAttention) for m in module.modules()):
        known = _ATTENTION[module] = True
    if known is not None:
        if known:
            _warn_math_attention()
        yield
        return
    watch = _SeesAttention()
    with watch:
        yield
    _ATTENTION[module] = watch.seen
    if watch.seen:
        _warn_math_attention()


def gathered(module: nn.Module, params: Mapping[str, Tensor]) -> tuple:
    """``(params, sharded)``: the values to evaluate ``module`` at, where a DTensor that a
    fully_shard unit of ``module`` owns stays a DTensor (that unit gathers it when it runs:
    torchbilevel.units) and any other DTensor is all-gathered now (backward: reduce-scatter,
    summed over ranks — torchbilevel.sharding scales by 1/N); ``sharded``: any DTensor met.
    A :class:`torchbilevel.units.LazyGathered` dict gives its DTensors ungathered."""
    values = params.sharded() if isinstance(params, U.LazyGathered) else params
    if not any(U.is_dtensor(t) for t in values.values()):
        return dict(params), False
    slots = U.owned(module)
    out = {}
    for k, t in values.items():
        if U.is_dtensor(t):
            owner, _, attr = k.rpartition(".")
            if (id(module.get_submodule(owner)), attr) not in slots:
                t = U.gather(t)
        out[k] = t
    return out, True


# module -> its FSDP2 submodules (itself included), found once per module
_FSDP: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _fsdp_modules(module: nn.Module) -> tuple:
    if module not in _FSDP:
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:          # pragma: no cover - builds without distributed
            FSDPModule = ()
        _FSDP[module] = tuple(m for m in module.modules() if FSDPModule and isinstance(m, FSDPModule))
    return _FSDP[module]


def _is_fsdp_hook(h) -> bool:
    return type(getattr(h, "__self__", None)).__name__ == "FSDPState"


@contextlib.contextmanager
def without_fsdp_hooks(module: nn.Module):
    """Context: FSDP2's forward hooks (all-gather of its own sharded parameters, reshard)
    removed from every FSDP module in ``module`` and put back afterwards, so that the
    forward runs on the tensors functional_call gives."""
    saved = []
    for mod in _fsdp_modules(module):
        for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
            drop = [k for k, h in hooks.items() if _is_fsdp_hook(h)]
            saved.append((hooks, [(k, hooks.pop(k)) for k in drop]))
    try:
        yield
    finally:
        for hooks, items in saved:
            for k, h in items:
                hooks[k] = h


# Activation checkpointing (torch.utils.checkpoint, use_reentrant=False, as transformers'
# gradient_checkpointing_enable can use): the backward recomputes a checkpointed piece by
# calling it again, after tb.nn.call has put the module's own parameters back, so the
# recomputation would see those instead of the x and y given (a wrong hypergradient, no
# error).  While a call runs, every checkpoint it opens gets a recompute context that puts
# the call's tensors in place again.  Installed once, per thread through a stack of calls.
_CALLS = threading.local()
_CHECKPOINT_PATCHED = [False]


def _install_checkpoint_hook() -> None:
    import torch.utils.checkpoint as C
    if _CHECKPOINT_PATCHED[0]:
        return
    orig = C._checkpoint_without_reentrant_generator

    def generator(fn, preserve_rng_state=True, context_fn=C.noop_context_fn, *args, **kwargs):
        stack = getattr(_CALLS, "stack", None)
        if not stack or torch.compiler.is_compiling():
            return orig(fn, preserve_rng_state, context_fn, *args, **kwargs)
        again = stack[-1]

        def contexts():
            fwd, rec = context_fn()
            return fwd, _both(rec, again)
        return orig(fn, preserve_rng_state, contexts, *args, **kwargs)
    C._checkpoint_without_reentrant_generator = generator
    _CHECKPOINT_PATCHED[0] = True


@contextlib.contextmanager
def _both(first, make_second):
    with first, make_second():
        yield


@contextlib.contextmanager
def recomputable(again):
    """Context around one tb.nn.call: a checkpoint opened inside recomputes under
    ``again()`` (a context putting the call's tensors back in the module)."""
    _install_checkpoint_hook()
    if not hasattr(_CALLS, "stack"):
        _CALLS.stack = []
    _CALLS.stack.append(again)
    try:
        yield
    finally:
        _CALLS.stack.pop()
