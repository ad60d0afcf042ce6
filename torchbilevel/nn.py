"""``nn.Module`` drop-in: split a module's parameters into outer (x) and inner (y) dicts,
evaluate the module on such dicts, and hand a hypergradient to any ``torch.optim``
optimiser through ``.grad``::

    x, y = tb.nn.split(model, inner=["head"])            # head.* are inner, the rest outer
    logits = tb.nn.call(model, x, y, images)             # functional_call, buffers included
    tb.nn.write_grad(model, dx); opt.step()              # outer step with torch.optim
    tb.nn.load(model, y_new)                              # copy an inner solution back

    phi, head = tb.nn.features(model, body=["body"], head=["head"])   # declared features
    problem = tb.Bilevel(outer=lambda z, y, b: F.cross_entropy(head(z, y), b[1]), inner=...,
                         features=phi)
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import buffers as B
from . import tree as T
from . import units as U
from .derivatives.second_order import cudnn_rnns_seen, math_attention_active, note_cudnn_rnn
from .wrappers import check_unwrapped, gathered, recomputable, warn_math_attention, without_fsdp_hooks

__all__ = ["split", "call", "write_grad", "load", "features", "Features", "cudnn_rnns_seen"]

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

    Every parameter selected (``x`` empty) is allowed: the outer variables then live outside
    the module (per-sample or per-domain weights, hyperparameters).

    Tied weights (one tensor under several names, e.g. an output head tied to the token
    embedding): the tensor is selected when any of its names matches ``inner`` and appears
    once, under the name that matched (else under its first name, in x).  :func:`call`
    applies it to every tied use.  A tie that straddles the split (head in y, the embedding
    in the body) is legal: both uses see y's tensor, so the body's embedding moves with y.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    pick = _selector(inner)
    x, y = {}, {}
    # tied weights (a GPT head sharing the embedding): one tensor, several names; it is
    # selected when any of its names matches, and lands on that side under the matching name
    names = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), (p, []))[1].append(name)
    for p, ns in names.values():
        if not (p.requires_grad or include_frozen):
            continue
        chosen = [n for n in ns if pick(n, p)]
        if chosen:
            y[chosen[0]] = p.detach()
        else:
            x[ns[0]] = p.detach()
    if not y:
        raise ValueError("inner selected no parameter of the module: check the names or the predicate")
    # every parameter inner is legitimate when x lives outside the module (data weights,
    # domain logits, hyperparameters): x is then empty and the caller supplies its own
    return x, y


def call(module: nn.Module, x: Mapping[str, Tensor], y: Mapping[str, Tensor], *args,
         buffers: Optional[Mapping[str, Tensor]] = None, **kwargs):
    """``module(*args, **kwargs)`` evaluated with parameters ``x ∪ y`` (torch.func.functional_call).

    Buffers (e.g. BatchNorm statistics) come from the module unless given in ``buffers``.
    Composes with torch.func transforms.

    Sharded models (FSDP2, ``fully_shard``): the module is evaluated at the tensors given,
    never at its own parameters.  DTensor values are gathered one fully_shard unit at a
    time, as FSDP's own forward does: each unit's parameters just before it runs, dropped
    after its forward, gathered again by its backward (their gradient is reduce-scattered
    back to the shards); FSDP's own hooks are bypassed for the call.  FSDP2's
    MixedPrecisionPolicy is honoured (parameters and inputs cast to ``param_dtype`` after the
    gather, gradients reduced in the shards' dtype).  Pass the dicts as given (``x``, ``y``):
    a parameter read outside the module (or a dict rebuilt from their entries) is gathered
    whole.
    Wrappers whose forward ignores the tensors given (DistributedDataParallel, FSDP1, a
    module compiled with ``torch.compile``) raise TypeError naming the module to pass instead.
    """
    overlap = set(x) & set(y)
    if overlap:
        raise ValueError(f"x and y share parameter names: {sorted(overlap)}")
    check_unwrapped(module)
    px, sx = gathered(module, x)
    py, sy = gathered(module, y)
    params = {**dict(module.named_buffers()), **(buffers or {}), **px, **py}
    _note_cudnn_rnns(module)
    attention = warn_math_attention(module) if math_attention_active() else contextlib.nullcontext()
    sharded = sx or sy

    @contextlib.contextmanager
    def again():
        # a checkpointed piece recomputed in the backward sees this call's tensors again
        from torch.nn.utils.stateless import _reparametrize_module
        with contextlib.ExitStack() as st:
            st.enter_context(without_fsdp_hooks(module))
            if sharded:
                st.enter_context(U.unit_hooks(module))
            st.enter_context(_reparametrize_module(module, params, tie_weights=True))
            yield
    with attention, recomputable(again), without_fsdp_hooks(module), contextlib.ExitStack() as st:
        if sharded:
            st.enter_context(U.unit_hooks(module))
            st.enter_context(U.regathering())
            st.enter_context(U.explained())
        return _call(module, params, args, kwargs)


def _call(module, params, args, kwargs):
    """functional_call with the buffer policy of torchbilevel.buffers (frozen or journaled)."""
    if not module.training:
        return functional_call(module, params, args, kwargs)
    if _buffer_names(module):
        B.note_train_buffers()
    if not B.is_frozen():
        # running statistics about to move: journal them so a failed step can put them back
        B.journal(t for n, t in params.items() if n in _buffer_names(module))
        return functional_call(module, params, args, kwargs)
    return _call_frozen(module, params, args, kwargs)


# The weak-keyed dictionaries below are process-wide on purpose: each caches a fact about a
# module's structure (its RNN, norm and buffer submodules, buffers its forward was seen to
# modify), the same for every thread and run that evaluates that module; no result depends
# on which thread filled them, and a module that is garbage-collected drops its entry.
# module -> type names of its RNN submodules (nn.LSTM, nn.GRU, nn.RNN)
_RNNS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _note_cudnn_rnns(module: nn.Module) -> None:
    if module not in _RNNS:
        _RNNS[module] = tuple(m for m in module.modules() if isinstance(m, nn.RNNBase))
    for m in _RNNS[module]:
        w = next(m.parameters(), None)
        if w is not None and w.is_cuda and torch.backends.cudnn.enabled:
            note_cudnn_rnn(f"nn.{type(m).__name__}")


# module -> its BatchNorm/InstanceNorm submodules in train mode with running statistics
_NORMS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
# module -> names of other buffers its forward was seen to modify in place
_MUTATED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


_BUFFER_NAMES: "weakref.WeakKeyDictionary[nn.Module, frozenset]" = weakref.WeakKeyDictionary()


def _buffer_names(module: nn.Module) -> frozenset:
    if module not in _BUFFER_NAMES:
        _BUFFER_NAMES[module] = frozenset(n for n, _ in module.named_buffers())
    return _BUFFER_NAMES[module]


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
    existing ``.grad``.  Raises KeyError for a name the module does not have (any name of
    a tied tensor is accepted)."""
    params = dict(module.named_parameters(remove_duplicate=False))
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
    """Copy ``values`` (e.g. an inner solution y) into the module's parameters in place
    (any name of a tied tensor is accepted)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, v in values.items():
        if name not in params:
            raise KeyError(f"module has no parameter named {name!r}")
        params[name].copy_(v)


class Features(NamedTuple):
    """What :func:`features` returns: ``phi(x, batch) -> z`` for ``tb.Bilevel(features=phi)``
    and ``head(z, y) -> output``, both evaluated with :func:`call` semantics."""
    phi: Callable
    head: Callable


def _submodules(module: nn.Module, names, what: str):
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a submodule name or a non-empty list of names, got {names!r}")
    subs = dict(module.named_modules())
    missing = [n for n in names if n not in subs or n == ""]
    if missing:
        raise ValueError(f"{what}: module has no submodule named {missing}; it has "
                         f"{sorted(n for n in subs if n and '.' not in n)}")
    return [(n, subs[n]) for n in names]


def _sequential(parts, params: Mapping[str, Tensor], inp):
    for name, sub in parts:
        prefix = name + "."
        own = {k[len(prefix):]: t for k, t in params.items() if k.startswith(prefix)}
        inp = call(sub, own, {}, inp)
    return inp


def features(module: nn.Module, body, head, inputs: Optional[Callable] = None) -> Features:
    """Declared features of a module whose forward is ``head(body(input))``: the pieces
    ``tb.Bilevel(..., features=phi)`` needs, without writing ``functional_call`` twice.

    Args:
        module: the model; its parameters are split as usual (``x, y =
            tb.nn.split(module, inner=head)``), with the full parameter names.
        body: name (or list of names, applied in order) of the submodule(s) computing the
            features from the input: ``phi(x, batch) = body(inputs(batch))`` with the
            parameters in ``x``.
        head: name (or list of names, applied in order) of the submodule(s) applied to the
            features: ``head(z, y)`` with the parameters in ``y``.
        inputs: ``batch -> input`` of the body; default: ``batch[0]`` for a tuple or list
            batch (``(inputs, targets)``), the batch itself otherwise.

    Returns :class:`Features` ``(phi, head)``.  Evaluation follows :func:`call` (buffers from
    the module, frozen inside the library's hypergradients, BatchNorm statistics updated
    by the algorithms' inner steps).  Only models whose forward is the composition of the
    named submodules are covered (an ``nn.Sequential`` body and head, or a model whose
    ``forward`` is ``self.head(self.body(x))``); otherwise write phi by hand with
    :func:`call`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    body_parts = _submodules(module, body, "body")
    head_parts = _submodules(module, head, "head")
    if inputs is None:
        inputs = lambda batch: batch[0] if isinstance(batch, (tuple, list)) else batch
    elif not callable(inputs):
        raise TypeError(f"inputs must be callable batch -> input, got {type(inputs).__name__}")

    def phi(x: Mapping[str, Tensor], batch):
        return _sequential(body_parts, x, inputs(batch))

    def head_fn(z, y: Mapping[str, Tensor]):
        return _sequential(head_parts, y, z)

    phi.__qualname__ = f"features({'+'.join(n for n, _ in body_parts)})"
    head_fn.__qualname__ = f"head({'+'.join(n for n, _ in head_parts)})"
    return Features(phi, head_fn)
