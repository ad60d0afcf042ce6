"""Sharded parameters (FSDP2): the algorithm keeps local shards, the objectives see DTensors.

A model sharded with ``torch.distributed.fsdp.fully_shard`` gives ``tb.nn.split`` dicts of
DTensors (``Shard(0)`` over a 1-D mesh); each rank holds 1/N of every parameter.  The
gradient-only methods keep only those local shards in their flat buffers (``tree.ravel``
records each key's mesh, placements and global shape in ``Raveled.shards``): every
iterate, momentum and previous iterate of the state is 1/N per rank.  At the objectives'
boundary, :func:`objective` all-gathers the local views into full tensors for the user's
objectives (the backward reduce-scatters the gradient to the shards; ``tb.nn.call`` runs
the module at those tensors, bypassing FSDP's own hooks), and the value is the mean over
ranks of the per-rank objectives:

    g(x, y) = (1/N) Σ_r g_r(x, y)         (each rank r evaluates its own batch shard)

so the gradient w.r.t. a local shard is that shard of (1/N) Σ_r ∇g_r — exactly the
data-parallel mean of ``tb.distributed.data_parallel``, already reduced: a sharded run
never all-reduces gradient rows again.  Entries that are plain tensors (replicated on every
rank, such as hyperparameters) get their gradient summed over ranks in the backward (one
all-reduce for all of them).  Whole-vector quantities (norms for the ball projection, the
finite-difference step's rms(y)) are reduced with :func:`global_sqnorms`: one all-reduce
for every norm a stage needs.

Memory: an evaluation gathers one fully_shard unit at a time, as FSDP's own forward and
backward do (torchbilevel.units); the algorithm's state (for FdeHBO nine vectors of the
size of x and y) stays sharded.

Only gradients are taken through these collectives: a second derivative (Hessian-vector
products, unrolled differentiation) is refused before any work (:func:`refuse`).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import units as U

__all__ = ["dots", "is_sharded", "refuse", "objective", "global_sqnorms", "to_local", "GRADIENT_ONLY", "Specs", "specs",
           "localize", "to_user"]

GRADIENT_ONLY = ("tb.fdehbo", "tb.f2sa", "tb.bome", "tb.first_order() and tb.pzobo(...) (in tb.hypergrad or "
                 "tb.double_loop)")


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def is_sharded(*trees) -> bool:
    """True if any value of the dicts (or any ``Raveled`` layout) holds a sharded tensor."""
    for tr in trees:
        if tr is None:
            continue
        if hasattr(tr, "shards"):
            if tr.shards is not None:
                return True
        elif any(_is_dtensor(t) for t in tr.values()):
            return True
    return False


def refuse(method: str, *trees) -> None:
    """Raise before any work when ``method`` (which differentiates twice, or is not yet
    written for shards) meets sharded parameters."""
    if is_sharded(*trees):
        raise NotImplementedError(
            f"{method} on a sharded model (DTensor parameters from FSDP2's fully_shard): it needs "
            f"second derivatives — FSDP's collectives have no double backward. Methods that run "
            f"sharded (gradients only): {', '.join(GRADIENT_ONLY)}.")


def to_local(tree: Mapping[str, Tensor]) -> dict:
    """Local shards of the DTensors of ``tree`` (other tensors as they are), detached."""
    return {k: (t.to_local() if _is_dtensor(t) else t).detach() for k, t in tree.items()}


def check_consistent(name: str, tree: Mapping[str, Tensor]) -> None:
    """Every rank must shard the same keys: one all-reduce of a flag per key, before any
    work.  ValueError naming ``name`` and the keys otherwise.  Called where every rank of
    the group runs the same call (a sharded dict, or a data-parallel problem)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flags = torch.tensor([float(_is_dtensor(t)) for t in tree.values()], dtype=torch.float64)
    total = flags.clone()
    dist.all_reduce(total)
    world = dist.get_world_size()
    bad = [k for k, f, s in zip(tree, flags.tolist(), total.tolist()) if s not in (0.0, float(world))]
    if bad:
        raise ValueError(f"{name}: {bad} are sharded (DTensor) on some ranks and plain tensors on others: "
                         "shard the model the same way on every rank (fully_shard before tb.nn.split)")


class Specs(NamedTuple):
    """What :func:`objective` needs of a dict's layout: its keys and per-key shard specs
    (``tree.Raveled`` has the same two fields)."""
    keys: tuple
    shards: Optional[tuple]


def specs(tree: Mapping[str, Tensor]) -> Specs:
    """The :class:`Specs` of a dict (None shards when it holds no DTensor)."""
    if not any(_is_dtensor(t) for t in tree.values()):
        return Specs(tuple(tree), None)
    return Specs(tuple(tree), tuple((t.device_mesh, tuple(t.placements), t.shape, t.stride())
                                    if _is_dtensor(t) else None for t in tree.values()))


def to_user(local: Mapping[str, Tensor], spec: Specs) -> dict:
    """Local tensors (keyed as ``spec``) wrapped back into DTensors where ``spec`` is sharded
    (no communication, no autograd)."""
    from torch.distributed.tensor import DTensor
    if spec.shards is None:
        return dict(local)
    return {k: (local[k] if sh is None else DTensor.from_local(local[k].detach(), sh[0], sh[1], run_check=False,
                                                                 shape=sh[2], stride=sh[3]))
            for k, sh in zip(spec.keys, spec.shards)}


def localize(problem, x, y):
    """For dict-based methods (tb.hypergrad, tb.double_loop): ``(problem_l, x_l, y_l, sx, sy)``
    — the problem on local shards (objectives as in :func:`objective`, no reduce hook: the
    mean over ranks is already in the objectives), the local dicts and their specs."""
    from .problem import Bilevel
    sx, sy = specs(x), specs(y)
    if not problem._ranks_checked:       # one all-reduce per key, once per problem, not per call
        check_consistent("x", x)
        check_consistent("y", y)
        problem._ranks_checked = True
    local = Bilevel(objective(problem.outer, sx, sy), objective(problem.inner, sx, sy))
    local.shards = (sx, sy)
    # the caller checked the user's problem (check_uses) on the full tensors: a new local
    # problem per call must not check again (each check draws a sample from an iterator)
    local._inner_uses_y = local._uses_x = True
    return local, to_local(x), to_local(y), sx, sy


def _rows(spec, n_rows: int):
    """(start, stop) of this rank's rows of a ``Shard(0)`` tensor on a 1-D mesh (torch.chunk's
    split, as FSDP2 shards)."""
    mesh, placements = spec[0], spec[1]
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]).__name__ != "Shard" or placements[0].dim != 0:
        raise NotImplementedError("sharded PZOBO supports FSDP2's default layout only: Shard(0) on a 1-D mesh")
    n, r = mesh.size(), mesh.get_local_rank()
    chunk = -(-n_rows // n)
    start = min(r * chunk, n_rows)
    return start, min(start + chunk, n_rows)


def local_part(spec, full: Tensor, lead: int = 1) -> Tensor:
    """This rank's shard of ``full`` (a tensor of the global shape, after ``lead`` leading
    dimensions); ``full`` itself when ``spec`` is None (a replicated entry)."""
    if spec is None:
        return full
    start, stop = _rows(spec, full.shape[lead])
    return full.narrow(lead, start, stop - start)


def sum_over_ranks(parts: Mapping[str, Tensor], spec: Specs) -> Tensor:
    """Σ over every rank of Σ_k parts[k] (keyed as ``spec``): sharded entries summed over
    ranks, replicated entries counted once (one all-reduce)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = sum(t if spec.shards is None or spec.shards[i] is not None else t / world
                for i, t in enumerate(parts[k] for k in spec.keys))
    if world > 1:
        total = total.clone()
        dist.all_reduce(total)
    return total


def layout_to_dict(lay) -> dict:
    """A ``tree.Raveled`` as plain data (``torch.load(weights_only=True)`` reads it): keys,
    local shapes, offsets, numel and, for a sharded layout, each key's placements, global
    shape and stride (the mesh is rebuilt on load: a 1-D mesh over the default group, as
    ``fully_shard`` makes by default)."""
    d = {"keys": list(lay.keys), "shapes": [list(sh) for sh in lay.shapes], "offsets": list(lay.offsets),
         "numel": lay.numel}
    if lay.shards is not None:
        def place(p):
            return ["shard", int(p.dim)] if hasattr(p, "dim") and type(p).__name__ == "Shard" else ["replicate"]
        d["shards"] = [None if sh is None else {"device": sh[0].device_type, "placements": [place(p) for p in sh[1]],
                                                "shape": list(sh[2]), "stride": list(sh[3])}
                       for sh in lay.shards]
    return d


def layout_from_dict(d: dict):
    """The inverse of :func:`layout_to_dict` (on every rank of the same world size)."""
    from .tree import Raveled
    shards = None
    if d.get("shards") is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        meshes = {}

        def mesh(device):
            if device not in meshes:
                meshes[device] = init_device_mesh(device, (dist.get_world_size(),))
            return meshes[device]
        shards = tuple(None if sh is None else
                       (mesh(sh["device"]), tuple(Shard(p[1]) if p[0] == "shard" else Replicate()
                                                  for p in sh["placements"]),
                        torch.Size(sh["shape"]), tuple(sh["stride"]))
                       for sh in d["shards"])
    return Raveled(tuple(d["keys"]), tuple(torch.Size(sh) for sh in d["shapes"]), tuple(d["offsets"]), d["numel"],
                   shards)


class _MeanOverRanks(torch.autograd.Function):
    """(1/N) Σ_r v_r in the forward; the backward gives each rank grad/N on its own v_r (the
    cross-rank sum of the parameter gradients is done by the gathers' reduce-scatters)."""

    @staticmethod
    def forward(ctx, value: Tensor, group, world: int) -> Tensor:
        ctx.world = world
        out = value.detach().clone()
        dist.all_reduce(out, group=group)
        return out / world

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.world, None, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity in the forward (a replicated tensor); its gradient summed over ranks."""

    @staticmethod
    def forward(ctx, flat: Tensor, group) -> Tensor:
        ctx.group = group
        return flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _user_views(local: Mapping[str, Tensor], shards: Optional[Sequence]):
    """``local`` (a dict of local views, keyed as the layout) as the user's objectives see it:
    each sharded key's local shard made a DTensor (no communication, differentiable back to
    the shard), in a :class:`torchbilevel.units.LazyGathered` dict — ``tb.nn.call`` gathers
    one fully_shard unit at a time, and an entry the objective reads itself (a ridge term)
    is gathered whole on reading.  Either way the gather's backward reduce-scatters the
    gradient (summed over ranks) back to the shard."""
    from torch.distributed.tensor import DTensor
    if shards is None:
        return dict(local)
    out = {}
    for (k, t), spec in zip(local.items(), shards):
        if spec is None:
            out[k] = t
        else:
            mesh, placements, shape, stride = spec
            out[k] = DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)
    return U.LazyGathered(out)


def objective(fn, lx, ly):
    """``(x_local, y_local, batch) -> (1/N) Σ_r fn_r(x, y, batch)``: ``fn`` of the user (taking
    dicts of DTensors, evaluated through ``tb.nn.call``) on the local views of the layouts
    ``lx``, ``ly`` (``tree.Raveled`` with ``shards``).  Its gradient w.r.t. the local views is
    the local part of the mean gradient over ranks (module docstring)."""
    group = None
    world = dist.get_world_size(group)

    def sharded_fn(x, y, batch):
        d = {"x": dict(x), "y": dict(y)}
        rep = [(w, k) for w, lay in (("x", lx), ("y", ly))
               for k, spec in zip(lay.keys, lay.shards or [None] * len(lay.keys)) if spec is None]
        if rep and torch.is_grad_enabled():
            # replicated entries: one identity whose backward sums their gradients over ranks
            leaves = [d[w][k] for w, k in rep]
            flat = _SumGradOverRanks.apply(torch.cat([t.reshape(-1) for t in leaves]), group)
            pos = 0
            for (w, k), t in zip(rep, leaves):
                d[w][k] = flat[pos:pos + t.numel()].view(t.shape)
                pos += t.numel()
        x, y = d["x"], d["y"]
        with U.regathering():        # a gathered tensor saved for the backward is gathered again there
            value = fn(_user_views(x, lx.shards), _user_views(y, ly.shards), batch)
        return _MeanOverRanks.apply(value, group, world)
    sharded_fn.__qualname__ = f"sharded({getattr(fn, '__qualname__', 'fn')})"
    return sharded_fn


def dots(*pairs) -> Tensor:
    """⟨a, b⟩ over all ranks for each ``(a, b, layout)`` (flat buffers laid out by a
    ``tree.Raveled``), as one tensor (one all-reduce for all of them when any layout is
    sharded): sharded entries summed over ranks, replicated entries counted once."""
    vals = torch.stack([torch.dot(a, b) for a, b, _ in pairs])
    if all(lay.shards is None for _, _, lay in pairs) or not (dist.is_available() and dist.is_initialized()):
        return vals
    world = dist.get_world_size()
    fix = []
    for a, b, lay in pairs:
        rep = [(o, int(torch.Size(sh).numel())) for sh, o, spec in zip(lay.shapes, lay.offsets,
                                                                       lay.shards or [None] * len(lay.keys))
               if spec is None]
        fix.append(sum((torch.dot(a[o:o + n], b[o:o + n]) for o, n in rep), torch.zeros((), dtype=vals.dtype)))
    vals = vals - (1.0 - 1.0 / world) * torch.stack(fix).to(vals.dtype)
    dist.all_reduce(vals)
    return vals


def global_sqnorms(layout, *flats: Tensor) -> Tensor:
    """Squared norms over all ranks of flat buffers laid out by ``layout`` (a
    ``tree.Raveled``), as one float64 tensor (one all-reduce for all of them): sharded
    entries summed over ranks, replicated entries counted once."""
    sq = torch.stack([f.double().pow(2).sum() for f in flats])
    if layout.shards is None or not (dist.is_available() and dist.is_initialized()):
        return sq
    world = dist.get_world_size()
    rep = [(o, int(torch.Size(s).numel())) for s, o, spec in zip(layout.shapes, layout.offsets, layout.shards)
           if spec is None]
    if rep:
        # replicated entries appear on every rank: count them once in the sum over ranks
        sq = sq - (1.0 - 1.0 / world) * torch.stack(
            [sum(f[o:o + n].double().pow(2).sum() for o, n in rep) for f in flats])
    dist.all_reduce(sq)
    return sq
