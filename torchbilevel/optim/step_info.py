"""What one step of an algorithm computed anyway: ``algo.step(..., has_aux=True)`` returns
``(state, StepInfo)``, and :func:`progress` turns a StepInfo into floats for a progress bar
with one host read.

Every figure is a tensor the step already had (a loss value returned with a gradient, the
norm of a vector it applied): asking for it evaluates neither f nor g again and reads
nothing on the host.  A field is None where the method did not compute that figure.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..solvers import SolveInfo

__all__ = ["StepInfo", "progress", "reply", "norm", "tree_norm", "sgd_solve", "nonpositive", "one_step_solve"]


class StepInfo(NamedTuple):
    """What one step computed (0-d tensors on the step's device, or None).

    Attributes:
        inner_loss: g at a point the step evaluated anyway, on that evaluation's sample — for
            most methods g(x_t, y_t; ζ_t) from the y update's gradient at the current iterate
            (each algorithm's docstring says which point).  With a data-parallel problem
            (``tb.distributed.data_parallel``) the losses are means over ranks (they join an
            all-reduce the step makes anyway), except the double loop's inner loss from
            stocBiO's linearisation (this rank's value); sharded runs report the global value.
        outer_loss: f at a point the step evaluated anyway (as inner_loss).
        hypergrad_norm: ‖d‖ for the direction d the outer iterate moved along,
            x_{t+1} = x_t − α_t d: the method's hypergradient estimate *after* its own
            variance reduction (FdeHBO's h^f_t, MRBO's STORM momentum, SABA's SAGA
            direction), and in ``tb.double_loop`` the estimator's hypergradient *before* the
            outer rule (SGD or Adam).
        solve: the linear solve's :class:`torchbilevel.solvers.SolveInfo`: the double loop with
            ``tb.aid`` or ``tb.stocbio`` (its Neumann series), MRBO and VRBO (their stocBiO
            estimate's); for the methods that take gradient steps on the linear system (FdeHBO,
            FMBO, SOBA, MA-SOBA, SABA, SRBA, FSLA, AmIGO) the report of those steps
            (:func:`sgd_solve`); None where no linear system is solved (F2SA, BOME, ITD, PZOBO,
            first order) and for TTSA (its randomly truncated series).
        delta: FdeHBO's finite-difference step δ_t at the current iterate.
        projected: whether the projection of v on the ball of radius r bound at this step
            (‖w_{t+1}‖ > r), a 0-d bool: FdeHBO, FMBO, MA-SOBA (False with radius=inf, and
            always for SOBA, which has no projection); None for the other methods.
        v_norm: ‖w_{t+1}‖, the norm of the new linear-system iterate before its projection
            (the single-loop engine: FdeHBO, FMBO, SOBA, MA-SOBA), the figure to compare with
            the radius.
        multiplier: the method's Lagrange/penalty multiplier at this step: BOME's λ_t, F2SA's
            penalty λ_k.
    """
    inner_loss: Optional[Tensor] = None
    outer_loss: Optional[Tensor] = None
    hypergrad_norm: Optional[Tensor] = None
    solve: Optional["SolveInfo"] = None
    delta: Optional[Tensor] = None
    projected: Optional[Tensor] = None
    v_norm: Optional[Tensor] = None
    multiplier: Optional[Tensor] = None


def reply(state, has_aux: bool, info: Callable[[], StepInfo]):
    """``state``, or ``(state, info())`` when ``has_aux``: the figures are gathered only when
    asked for (a norm is a kernel launch a plain step does not pay)."""
    return (state, info()) if has_aux else state


def norm(vec: Tensor, layout=None) -> Tensor:
    """‖vec‖ of a flat buffer as a 0-d float32 (float64 for float64) tensor; over every
    rank's shard when ``layout`` (a ``tree.Raveled``) is sharded (one all-reduce)."""
    work = torch.float64 if vec.dtype == torch.float64 else torch.float32
    if layout is not None and layout.shards is not None:
        from .. import sharding as S
        return S.global_sqnorms(layout, vec)[0].sqrt().to(work)
    return torch.linalg.vector_norm(vec.to(work))


def tree_norm(tree, spec=None) -> Tensor:
    """‖tree‖ over all entries of a dict of tensors (float32, float64 for float64); with
    ``spec`` (``sharding.Specs``) of a sharded dict, over every rank's shard (one
    all-reduce; replicated entries counted once)."""
    ts = list(tree.values())
    work = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    sq = lambda group: sum((t.to(work).pow(2).sum() for t in group), torch.zeros((), dtype=work, device=ts[0].device))
    if spec is None or spec.shards is None:
        return sq(ts).sqrt()
    import torch.distributed as dist
    shard = sq([t for t, sh in zip(ts, spec.shards) if sh is not None])
    dist.all_reduce(shard)
    return (shard + sq([t for t, sh in zip(ts, spec.shards) if sh is None])).sqrt()


def sgd_solve(steps: int, start_sq: Tensor, end_sq: Tensor, b_sq: Tensor, nonpositive: Tensor):
    """The :class:`torchbilevel.solvers.SolveInfo` of ``steps`` gradient steps on the linear
    system, v ← v − λ(∇yy g·v − ∇y f) (or a momentum direction built from it), from what
    the steps computed anyway: ``start_sq`` / ``end_sq`` are ‖∇yy g·v − ∇y f‖² at the first
    and the last iterate the product was evaluated at (each on its own sample; the last is
    the iterate *before* the last step: the returned v has no product), ``b_sq`` = ‖∇y f‖²,
    ``nonpositive`` the count of iterates with vᵀ∇yy g v ≤ 0 (v ≠ 0; see
    :func:`nonpositive`).  Relative residuals as the solvers': ‖r‖/‖b‖ (0 where b = 0);
    ``truncated`` is False (these steps never stop early)."""
    from ..solvers import SolveInfo
    ok = b_sq > 0
    rel = lambda sq: torch.where(ok, sq / torch.where(ok, b_sq, torch.ones_like(b_sq)), torch.zeros_like(sq)).sqrt()
    dev = b_sq.device
    return SolveInfo(torch.tensor(steps, dtype=torch.int64, device=dev), rel(end_sq), rel(start_sq),
                     nonpositive.to(torch.int64), torch.zeros((), dtype=torch.bool, device=dev))


def nonpositive(v: Tensor, hv: Tensor, layout=None) -> Tensor:
    """0-d bool: vᵀ∇yy g v ≤ 0 at a non-zero v (the linear system's operator is not
    positive definite along v: the implicit-function formula's assumption fails there).
    Over every rank's shard when ``layout`` is sharded (one all-reduce)."""
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    if layout is not None and layout.shards is not None:
        from .. import sharding as S
        d = S.dots((v.to(work), hv.to(work), layout), (v.to(work), v.to(work), layout))
        return (d[0] <= 0) & (d[1] > 0)
    return (torch.dot(v.to(work), hv.to(work)) <= 0) & (v != 0).any()


def one_step_solve(v: Tensor, hv: Tensor, b: Tensor, layout=None):
    """:func:`sgd_solve` of a single-loop method's one step on the linear system at v (flat
    buffers: v, its product ∇yy g·v and the right-hand side ∇y f the step computed)."""
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    r, b = hv.to(work) - b.to(work), b.to(work)
    if layout is not None and layout.shards is not None:
        from .. import sharding as S
        r_sq, b_sq = S.global_sqnorms(layout, r, b).to(work)
    else:
        r_sq, b_sq = r.pow(2).sum(), b.pow(2).sum()
    return sgd_solve(1, r_sq, r_sq, b_sq, nonpositive(v, hv, layout))


def _figures(info: StepInfo):
    """(name, value) of every figure present, solve's fields as ``solve_<field>``."""
    for name in StepInfo._fields:
        value = getattr(info, name)
        if value is None:
            continue
        if name == "solve":
            for k in value._fields:
                sub = getattr(value, k)
                if sub is not None:
                    yield f"solve_{k}", sub
        else:
            yield name, value


def progress(info: StepInfo) -> Dict[str, float]:
    """The figures of ``info`` as Python floats (bools as 0.0/1.0, the solve's fields as
    ``solve_iterations``, ``solve_residual``, ...), from ONE host read: the tensors are
    stacked on the device and copied once.  Absent figures (None) are left out.

    A progress bar over a user's own loop (``pip install tqdm``)::

        import torch
        from tqdm import tqdm
        import torchbilevel as tb

        A = torch.randn(20, 5, dtype=torch.float64)
        b = torch.randn(20, dtype=torch.float64)
        inner = lambda x, y, batch: 0.5 * ((A @ y["w"] - b) ** 2).mean() + 0.5 * (x["l"].exp() * y["w"] ** 2).sum()
        outer = lambda x, y, batch: 0.5 * ((A @ y["w"] - b - 1.0) ** 2).mean()
        algo = tb.fdehbo(tb.Bilevel(outer=outer, inner=inner), lr_x=0.05, lr_y=0.1, lr_v=0.1, radius=10.0)
        state = algo.init({"l": torch.zeros(5, dtype=torch.float64)}, {"w": torch.zeros(5, dtype=torch.float64)})
        shown = ("outer_loss", "inner_loss", "hypergrad_norm", "solve_residual", "projected")
        bar = tqdm(range(200))
        for t in bar:
            state, info = algo.step(state, None, None, has_aux=True)
            if t % 10 == 0:       # one host read per refresh; steps in between read nothing
                figures = tb.progress(info)
                bar.set_postfix({k: figures[k] for k in shown})

    (``bar.set_postfix(tb.progress(info))`` shows every figure.)  To average over steps,
    keep the StepInfos (tensors) and stack them at refresh time.
    """
    names, tensors, out = [], [], {}
    for name, value in _figures(info):
        if isinstance(value, Tensor):
            names.append(name)
            tensors.append(value.detach().reshape(()))
        elif isinstance(value, (bool, numbers.Real)):
            out[name] = float(value)
        else:
            raise TypeError(f"progress: {name} is a {type(value).__name__}, expected a 0-d tensor or a number")
    if tensors:
        device = tensors[0].device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        values = torch.stack([t.to(device=device, dtype=dtype) for t in tensors]).tolist()   # the host read
        out.update(zip(names, values))
    return {name: out[name] for name, _ in _figures(info)}
