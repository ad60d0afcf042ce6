"""``nn.Module`` drop-in: split a module's parameters into outer (x) and inner (y) dicts,
evaluate the module on such dicts, and hand a hypergradient to any ``torch.optim``
optimiser through ``.grad``.

    x, y = tb.nn.split(model, inner=["head"])            # head.* are inner, the rest outer
    logits = tb.nn.call(model, x, y, images)             # functional_call, buffers included
    tb.nn.write_grad(model, dx); opt.step()              # outer step with torch.optim
    tb.nn.load(model, y_new)                              # copy an inner solution back
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import buffers as B
from . import tree as T

__all__ = ["split", "call", "write_grad", "load"]

Selector = Union[Iterable[str], Callable[[str, Tensor], bool]]


def _selector(sel: Selector) -> Callable[[str, Tensor], bool]:
    if callable(sel):
        return sel
    if isinstance(sel, str):
        sel = [sel]
    names = list(sel)
    if not all(isinstance(n, str) for n in names):
        raise TypeError("inner must be a list of parameter names / prefixes or a predicate (name, param) -> bool")
    return lambda name, p: any(name == n or name.startswith(n + ".") for n in names)


def split(module: nn.Module, inner: Selector, include_frozen: bool = False) -> Tuple[T.Tree, T.Tree]:
    """Split ``module``'s parameters into (x, y): y = those selected by ``inner``, x = the rest.

    Args:
        inner: parameter names or name prefixes (``"head"`` selects ``head.weight`` and
            ``head.bias``), or a predicate ``(name, param) -> bool``.
        include_frozen: also include parameters with ``requires_grad=False`` (default: skip).

    Returns detached aliases of the parameters (same storage, no autograd history): an
    optimiser step on the module is visible in x, and nothing here modifies the module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    pick = _selector(inner)
    x, y = {}, {}
    for name, p in module.named_parameters():
        if not (p.requires_grad or include_frozen):
            continue
        (y if pick(name, p) else x)[name] = p.detach()
    if not y:
        raise ValueError("inner selected no parameter of the module: check the names or the predicate")
    if not x:
        raise ValueError("inner selected every parameter: no outer parameters are left")
    return x, y


def call(module: nn.Module, x: Mapping[str, Tensor], y: Mapping[str, Tensor], *args,
         buffers: Optional[Mapping[str, Tensor]] = None, **kwargs):
    """``module(*args, **kwargs)`` evaluated with parameters ``x ∪ y`` (torch.func.functional_call).

    Buffers (e.g. BatchNorm statistics) come from the module unless given in ``buffers``.
    Composes with torch.func transforms.
    """
    overlap = set(x) & set(y)
    if overlap:
        raise ValueError(f"x and y share parameter names: {sorted(overlap)}")
    params = {**dict(module.named_buffers()), **(buffers or {}), **x, **y}
    if not (module.training and B.is_frozen()):
        return functional_call(module, params, args, kwargs)
    return _call_frozen(module, params, args, kwargs)


# module -> its BatchNorm/InstanceNorm submodules in train mode with running statistics
_NORMS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
# module -> names of other buffers its forward was seen to modify in place
_MUTATED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _norms(module: nn.Module) -> list:
    if module not in _NORMS:
        _NORMS[module] = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return [m for m in _NORMS[module] if m.training and m.track_running_stats]


def _call_frozen(module, params, args, kwargs):
    """functional_call with every buffer left as it was (torchbilevel.buffers.frozen): norm
    layers run with ``track_running_stats`` off (batch statistics, no update — the form
    torch.func documents for vmap), other buffers the forward modifies are put back."""
    norms = _norms(module)
    norm_bufs = {id(b) for m in norms for b in m.buffers(recurse=False)}
    bufs = {n: params[n] for n, t in module.named_buffers() if id(t) not in norm_bufs and n in params}
    seen = module in _MUTATED
    watch = bufs if not seen else {n: bufs[n] for n in _MUTATED[module] if n in bufs}
    saved = {n: (t._version, t.clone()) for n, t in watch.items()}
    for m in norms:
        m.track_running_stats = False
    try:
        return functional_call(module, params, args, kwargs)
    finally:
        for m in norms:
            m.track_running_stats = True
        changed = {n for n, (ver, _) in saved.items() if watch[n]._version != ver}
        with torch.no_grad():
            for n in changed:
                watch[n].copy_(saved[n][1])
        _MUTATED.setdefault(module, set()).update(changed)


def write_grad(module: nn.Module, grads: Mapping[str, Tensor], accumulate: bool = False) -> None:
    """Write a hypergradient into the ``.grad`` of the named parameters of ``module`` so that
    any ``torch.optim`` optimiser takes the outer step.  ``accumulate=True`` adds to an
    existing ``.grad``.  Raises KeyError for a name the module does not have."""
    params = dict(module.named_parameters())
    for name, g in grads.items():
        if name not in params:
            raise KeyError(f"module has no parameter named {name!r}")
        p = params[name]
        if g.shape != p.shape:
            raise ValueError(f"gradient for {name!r} has shape {tuple(g.shape)}, parameter {tuple(p.shape)}")
        g = g.detach().to(dtype=p.dtype, device=p.device)
        if accumulate and p.grad is not None:
            p.grad.add_(g)
        else:
            p.grad = g.clone()


@torch.no_grad()
def load(module: nn.Module, values: Mapping[str, Tensor]) -> None:
    """Copy ``values`` (e.g. an inner solution y) into the module's parameters in place."""
    params = dict(module.named_parameters())
    for name, v in values.items():
        if name not in params:
            raise KeyError(f"module has no parameter named {name!r}")
        params[name].copy_(v)
