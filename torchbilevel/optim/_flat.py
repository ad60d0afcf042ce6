"""Plumbing shared by the flat-buffer methods that do not run on the FdeHBO/FMBO engine
(MRBO, F2SA, BOME): state in flat contiguous buffers, the guarded step, checkpoints.

Each method keeps its iterates raveled once (``tree.ravel``) and unravels views only at
the objectives' boundary; its state is a NamedTuple of flat tensors, the step count and
the dict layouts ``layout_x``, ``layout_y``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import buffers as B
from .. import guards as G
from .. import randomness as R
from .. import sharding as S
from .. import tree as T
from ..problem import check_params, in_functorch_transform
from ..tracing import in_sharded_step, sharded_step
from . import donation as D
from .single_loop import _flat as flat_fn  # (xf, yf, batch) -> fn(unravel(xf), unravel(yf), batch)
from .single_loop import _on_views as views_fn  # fn at the dict views of flat buffers (sharded: over ranks)

__all__ = ["flat_fn", "views_fn", "add_into", "ravel_consuming", "view", "init_flat", "guarded", "check_step", "checkpoint",
           "work_dtype"]


def view(field: str, layout: str, doc: str = "") -> property:
    """A property giving the flat buffer ``field`` as a dict shaped by ``layout`` (DTensors
    over the local shards when the layout is sharded, like the user's dicts)."""
    return property(lambda s: getattr(s, layout).user(getattr(s, field)), doc=doc)


def add_into(target: dict, term: dict, alpha: float) -> dict:
    """target[k] += alpha·term[k] in place for every key (dicts of views of a flat buffer, or of
    gradients); returns ``target``.  Key by key, the same operation as on the flat buffers."""
    for k, t in term.items():
        target[k].add_(t, alpha=alpha)
    return target


def ravel_consuming(layout, tree: dict, minus: dict = None):
    """One flat buffer (``layout``'s order) holding ``tree`` (a dict of gradients, or
    ``tree − minus`` entry by entry), each entry removed from the dict(s) as it is copied, so
    it is freed at once: no concatenation beside the whole dict.  The dicts are emptied."""
    first = next(iter(tree.values()))
    out = torch.empty(layout.numel, dtype=first.dtype, device=first.device)
    views = layout.unravel(out)
    for k in layout.keys:
        if minus is None:
            views[k].copy_(tree.pop(k))
        else:
            torch.sub(tree.pop(k), minus.pop(k), out=views[k])
    return out


def init_flat(name: str, x, y, check_finite: bool, sharded: bool = False):
    """Validate x, y and ravel them into fresh flat buffers: (xf, yf, layout_x, layout_y).
    ``sharded``: the method runs on a sharded model (gradients only, whole-vector
    reductions through torchbilevel.sharding); otherwise DTensor inputs are refused before
    any work (a method that needs second derivatives)."""
    check_params(x, y)
    if not sharded:
        S.refuse(name, x, y)
    elif S.is_sharded(x, y):
        S.check_consistent("x", x)
        S.check_consistent("y", y)
    if check_finite and not in_functorch_transform():
        bad = G.check_inputs(x=S.to_local(x), y=S.to_local(y))
        if bad is not None:
            raise FloatingPointError(f"{name} init: {bad} holds NaN/inf")
    xf, lx = T.ravel(x)     # ravel copies: the state never aliases the caller's tensors
    yf, ly = T.ravel(y)
    return xf, yf, lx, ly


def guarded(cls, body, problem, name: str):
    """``step(s, inner_batch, outer_batch, has_aux=False, donate=False)`` running ``body``
    with module buffers frozen (the body opens ``torchbilevel.buffers.updating()`` around
    its one inner-gradient evaluation), after the check that g depends on y; if it raises,
    the random stream is rewound and the running statistics it moved are put back.
    ``body(s, inner_batch, outer_batch, has_aux[, donate])`` returns the new state, or
    ``(state, StepInfo)`` when ``has_aux`` (:func:`torchbilevel.optim.step_info.reply`);
    ``donate`` is passed (as a keyword) to the bodies of the methods that update in place
    (:data:`torchbilevel.optim.donation.DONATING`), refused for the others."""
    def step(s, inner_batch, outer_batch, has_aux: bool = False, donate: bool = False):
        if not isinstance(s, cls):
            raise TypeError(f"state must come from init(), got {type(s).__name__}")
        donate = D.check(donate, name, s)
        sharded = s.layout_x.shards is not None or s.layout_y.shards is not None
        with R.restored_on_error(s.xf), B.transaction(), B.frozen(), sharded_step(sharded):
            inner_batch, outer_batch = problem.check_uses(s.x, s.y, inner_batch, outer_batch)
            if donate:
                return body(s, inner_batch, outer_batch, has_aux, donate=True)
            return body(s, inner_batch, outer_batch, has_aux)
    return step


def check_step(name: str, t: int, new_buffers, trace: Optional[G.StageTrace], fallback: str,
               donated: bool = False, **state) -> None:
    """One fused reduction and one host read: raise FloatingPointError naming where NaN/inf
    arose (a non-finite field of the state passed in, else the first non-finite recorded
    stage, else ``fallback``) unless every buffer of ``new_buffers`` is finite.  ``donated``:
    the state was donated and holds the failed update (the message says so)."""
    if in_functorch_transform():
        return
    probe = torch.stack([b.float().sum() for b in new_buffers]).sum()
    if in_sharded_step() and dist.is_available() and dist.is_initialized():
        dist.all_reduce(probe)           # NaN/inf on one rank's shard: every rank raises (none waits)
    if not bool(torch.isfinite(probe)):
        where = G.locate(trace, fallback, **{f"state.{k}": v for k, v in state.items()})
        if donated:
            raise FloatingPointError(
                f"{name} step {t}: NaN/inf arose in {where}; the state was donated (donate=True) and holds the "
                f"failed update: resume from a checkpoint, or step without donation where a failure must leave "
                f"the state usable")
        raise FloatingPointError(f"{name} step {t}: NaN/inf arose in {where}; the state passed in is unchanged")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 storage, float32 otherwise (reductions of half-precision buffers)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def checkpoint(cls, name: str):
    """(state_dict, load_state_dict) for a flat NamedTuple state ``cls``: plain dicts,
    tensors and numbers (``torch.load(weights_only=True)`` reads them back)."""
    layouts = tuple(k for k in cls._fields if k.startswith("layout"))

    def state_dict(s) -> dict:
        if not isinstance(s, cls):
            raise TypeError(f"state must come from init(), got {type(s).__name__}")
        D.check_unconsumed(s)
        d = {k: getattr(s, k) for k in cls._fields if k not in layouts}
        for k in layouts:
            d[k] = S.layout_to_dict(getattr(s, k))
        d["algorithm"] = name
        return d

    def load_state_dict(d: dict):
        if not isinstance(d, dict) or d.get("algorithm") != name:
            raise ValueError(f"not a {name} checkpoint (expected the dict of state_dict())")
        D.check_unconsumed(d, "state_dict")
        lay = {k: S.layout_from_dict(d[k]) for k in layouts}
        return cls(**{k: d[k] for k in cls._fields if k not in layouts}, **lay)

    return state_dict, load_state_dict
