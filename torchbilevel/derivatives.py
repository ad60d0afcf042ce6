"""Derivative products of the inner objective: exact (torch.func / autograd) and
finite-difference (FdeHBO paper, eq. (9) and (11)).

Notation: ``H v = ∇yy g · v`` (Hessian-vector product) and ``J v = ∇xy g · v``
(the x-gradient of ⟨∇y g, v⟩, a vector shaped like x).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from . import randomness as R
from . import tree as T
from .problem import use_func_mechanism

__all__ = ["Linearization", "linearize", "averaged", "grad_y", "grads", "hvp", "mixed", "hvp_and_mixed",
           "fd_delta", "fd_delta_from_norms", "fd_products", "vmap_unsupported", "second_order",
           "pair_flop_ratio", "choose_pair_batched", "PAIR_FLOP_RATIO"]


def grad_y(fn, x, y, batch) -> T.Tree:
    """∇y fn(x, y; batch): the gradient of a bilevel objective w.r.t. y, a dict shaped like y."""
    return grad(fn, argnums=1)(x, y, batch)


def grads(fn, x, y, batch):
    """(∇x fn, ∇y fn) at (x, y; batch), from one reverse pass."""
    return grad(fn, argnums=(0, 1))(x, y, batch)


class Linearization(NamedTuple):
    """The inner gradient at one point, with the operators that differentiate it again.

    ``grad_y`` is ∇y g(x, y); ``hvp(v)`` returns ∇yy g·v; ``mixed(v)`` returns ∇xy g·v.
    Built once per (x, y, batch) and applied many times (e.g. by CG): each application
    is one backward pass through the y-dependent operations only.
    """
    grad_y: T.Tree
    hvp: Callable[[T.Tree], T.Tree]
    mixed: Callable[[T.Tree], T.Tree]


def _autograd_linearization(g, x, y, batch) -> Linearization:
    # One forward of g and one backward with create_graph: the graph of ∇y g is kept
    # and every hvp/mixed call is a backward through it (DESIGN.md, hot path).
    xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
    yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    xs, ys = list(xr.values()), list(yr.values())
    with torch.enable_grad():
        val = g(xr, yr, batch)
        gys = torch.autograd.grad(val, ys, create_graph=True, allow_unused=True)
    gys = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(gys, ys)]
    live = [i for i, gi in enumerate(gys) if gi.requires_grad]

    def backward(v: Mapping[str, Tensor], inputs):
        vs = list(v.values()) if list(v) == list(yr) else [v[k] for k in yr]
        if not live:
            return [None] * len(inputs)
        with torch.enable_grad():
            return torch.autograd.grad([gys[i] for i in live], inputs, [vs[i] for i in live],
                                       retain_graph=True, allow_unused=True)

    def hvp(v):
        out = backward(v, ys)
        return {k: (torch.zeros_like(t) if o is None else o.detach()) for (k, t), o in zip(yr.items(), out)}

    def mixed(v):
        out = backward(v, xs)
        return {k: (torch.zeros_like(t) if o is None else o.detach()) for (k, t), o in zip(xr.items(), out)}

    gy = {k: gi.detach() for k, gi in zip(yr, gys)}
    return Linearization(gy, hvp, mixed)


def _func_linearization(g, x, y, batch) -> Linearization:
    # torch.func mechanism: composes with vmap/grad (used inside transforms).
    gy_fn = lambda xx, yy: grad(g, argnums=1)(xx, yy, batch)
    gy, vjp_y = vjp(lambda yy: gy_fn(x, yy), y)
    cache = {}

    def hvp(v):
        return vjp_y(v)[0]

    def mixed(v):
        if "vjp_x" not in cache:
            cache["vjp_x"] = vjp(lambda xx: gy_fn(xx, y), x)[1]
        return cache["vjp_x"](v)[0]

    return Linearization(gy, hvp, mixed)


def linearize(g, x, y, batch, mode: str = "auto") -> Linearization:
    """Build the operators ∇yy g(x, y)·v and ∇xy g(x, y)·v at one point.

    Args:
        g: the inner objective ``(x, y, batch) -> scalar``.
        mode: ``"autograd"`` keeps one autograd graph of ∇y g and backpropagates
            through it for each product (fastest, measured in bench/); ``"func"`` uses
            ``torch.func.vjp`` and composes with ``vmap``; ``"auto"`` picks ``"func"``
            inside torch.func transforms and under torch.compile, ``"autograd"`` otherwise.
    """
    if mode == "auto":
        mode = "func" if use_func_mechanism() else "autograd"
    if mode == "autograd":
        return _autograd_linearization(g, x, y, batch)
    if mode == "func":
        return _func_linearization(g, x, y, batch)
    raise ValueError(f"mode must be 'auto', 'autograd' or 'func', got {mode!r}")


def averaged(lin: Linearization, problem) -> Linearization:
    """``lin`` with its products averaged over ``problem``'s data-parallel group
    (:meth:`torchbilevel.Bilevel.average`: one all-reduce per product); ``lin`` itself when
    the problem has no reduce hook.  ``grad_y`` stays the rank-local gradient (no method
    here uses it; average it yourself if you need it)."""
    if getattr(problem, "reduce", None) is None:
        return lin
    return Linearization(lin.grad_y, lambda v: problem.average(lin.hvp(v))[0],
                         lambda v: problem.average(lin.mixed(v))[0])


def hvp(g, x, y, v, batch) -> T.Tree:
    """∇yy g(x, y)·v, exactly (one reverse-over-reverse pass, y part only)."""
    return vjp(lambda yy: grad(g, argnums=1)(x, yy, batch), y)[1](v)[0]


def mixed(g, x, y, v, batch) -> T.Tree:
    """∇xy g(x, y)·v = ∇x ⟨∇y g(x, y), v⟩, exactly."""
    return vjp(lambda xx: grad(g, argnums=1)(xx, y, batch), x)[1](v)[0]


def hvp_and_mixed(g, x, y, v, batch):
    """(∇yy g·v, ∇xy g·v) from a single vjp of ⟨∇y g(x, y), v⟩ w.r.t. (x, y)."""
    _, pullback = vjp(lambda xx, yy: grad(g, argnums=1)(xx, yy, batch), x, y)
    jv, hv = pullback(v)
    return hv, jv


def fd_delta_from_norms(y_norm: Tensor, v_norm: Tensor, dtype: torch.dtype, numel: int = 1) -> Tensor:
    """δ = ε^(1/3)·(1 + rms(y)) / ‖v‖ with rms(y) = ‖y‖/√numel (see :func:`fd_delta`),
    ‖v‖ clamped away from 0.  ε is the machine epsilon of the storage dtype (the gradients
    are rounded to it); the arithmetic runs in float32 (float64 for float64)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(torch.float32).tiny ** 0.5      # δ stays finite in float32 when v = 0
    rms = y_norm.to(work) / max(int(numel), 1) ** 0.5
    return eps ** (1.0 / 3.0) * (1.0 + rms) / torch.clamp(v_norm.to(work), min=tiny)


def fd_delta(y: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> Tensor:
    """Default finite-difference step δ (a 0-d tensor, no host synchronisation).

    Rule: the perturbation δ·v has norm ε^(1/3)·(1 + rms(y)), where rms(y) = ‖y‖/√dim(y)
    is the typical size of one entry of y and ε the machine epsilon of y's dtype (the
    gradients are rounded to it: ε^(1/3) ≈ 6e-6 in float64, 4.9e-3 in float32, 0.1 in
    float16, 0.2 in bfloat16).  A central difference has truncation error O(δ²) (the
    third derivative of g along the perturbation) and rounding error O(ε/δ) (the gradients
    at y ± δv, and y ± δv itself, rounded to ε relative to the size of their entries);
    ε^(1/3) balances the two on a unit scale, and the factor (1 + rms(y)) keeps the
    perturbation of each entry above the rounding of that entry when y's entries are large.
    The norm of y is the wrong scale: for a head with ‖y‖ = 100 spread over thousands of
    entries it made the perturbation 100x larger than any entry needs, and the float32
    products were off by 3e-3 through truncation alone.  δ itself is a float32 (float64)
    0-d tensor, never rounded to half precision.  ``v = 0`` gives a finite δ (and a zero
    product).
    """
    dtype = next(iter(y.values())).dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ny = T.norm({k: t.to(work) for k, t in y.items()})
    nv = T.norm({k: t.to(work) for k, t in v.items()})
    return fd_delta_from_norms(ny, nv, dtype, sum(t.numel() for t in y.values()))


class FDProducts(NamedTuple):
    """Finite-difference products and the step they used."""
    hvp: T.Tree        # ≈ ∇yy g·v, eq. (9)
    mixed: T.Tree      # ≈ ∇xy g·v, eq. (11)
    delta: Tensor
    batched: Optional[bool] = None   # the pair mode that ran (True: one vmap; False: two evaluations)
    grad_y: Optional[T.Tree] = None  # with_grad_y: (∇y g(y+δv) + ∇y g(y−δv))/2 = ∇y g(y) + O(δ²)


def fd_products(g, x, y, v, batch, delta=None, batched: Optional[bool] = None, wrt=(0, 1),
                with_grad_y: bool = False) -> FDProducts:
    """Finite-difference ∇yy g·v and ∇xy g·v from the same two evaluations of g.

    H̃ = (∇y g(x, y+δv) − ∇y g(x, y−δv)) / 2δ   (FdeHBO paper eq. (9))
    J̃ = (∇x g(x, y+δv) − ∇x g(x, y−δv)) / 2δ   (eq. (11))

    Both are the gradient of ONE scalar, D(x, y) = (g(x, y+δv) − g(x, y−δv)) / 2δ, so a
    single reverse pass gives both differences.  With ``batched=True`` the two points
    go through one ``torch.func.vmap`` over the sign ±1 with x unbatched: every
    operation that depends on x alone (a network body under a linear head) runs its
    forward and its backward once for both points.  Measured on LeNet with a linear head
    (CPU, 1 thread, bench/RESULTS.md): 1.0 gradient evaluations for both points vs 2.2 for
    two separate gradient evaluations (1.6 with ``batched=False``).

    Args:
        delta: the step δ (number or 0-d tensor); default :func:`fd_delta`.
        batched: True: vmap over the two points; False: two evaluations of g in plain
            autograd; None (default): vmap, falling back to two evaluations for objectives
            vmap cannot trace (``.item()``, data-dependent control flow, modules without a
            batching rule such as ``nn.LSTM`` with perturbed weights).  Either way both
            points see the same random stream (dropout masks): vmap with
            ``randomness="same"``, or the generator state replayed for the second
            evaluation (torchbilevel.randomness).  ``result.batched`` says which ran.
        wrt: which products to return: (0, 1) both, (1,) only H̃, (0,) only J̃ (the
            other field is None).
        with_grad_y: also return ``grad_y`` = (∇y g(y+δv) + ∇y g(y−δv))/2, the gradient at y
            up to O(δ²‖v‖²) (exact for g quadratic in y), from the same two evaluations
            and a second backward through the y-dependent part only: no separate forward
            of g at y (FdeHBO uses it when its y update and its products share a sample).
            Outside torch.func transforms only (None inside them).

    FD products are accurate when g is smooth along the segment y ± δv (a linear or
    softmax head, ridge/logistic losses).  Across ReLU kinks or max-pooling switches the
    error is O(1), not O(δ²): use exact products (FMBO, AID) for such inner variables.
    """
    if isinstance(y, Tensor):        # flat buffers: wrap in one-entry dicts and unwrap at the end
        tx = isinstance(x, Tensor)
        g_d = lambda xx, yy, b: g(xx["_"] if tx else xx, yy["_"], b)
        r = fd_products(g_d, {"_": x} if tx else x, {"_": y}, {"_": v}, batch, delta, batched, wrt, with_grad_y)
        unx = (lambda t: t["_"]) if tx else (lambda t: t)
        return FDProducts(None if r.hvp is None else r.hvp["_"], None if r.mixed is None else unx(r.mixed),
                          r.delta, r.batched, None if r.grad_y is None else r.grad_y["_"])
    d = fd_delta(y, v) if delta is None else delta
    any_y = next(iter(y.values()))
    dt = any_y.dtype
    work = torch.float64 if dt == torch.float64 else torch.float32
    d_t = torch.as_tensor(d, dtype=work, device=any_y.device)
    scale = 0.5 / d_t

    def shifted(yy, s):
        # y ± δv formed in float32 at least (float64 for float64 y), stored in y's dtype
        return {k: (yy[k].to(work) + (s * d_t) * v[k].to(work)).to(dt) for k in yy}

    def values_batched(xx, yy, b):
        # one vmap over the sign; randomness="same": both points see one dropout mask
        signs = torch.tensor([1.0, -1.0], dtype=work, device=any_y.device)
        vals = vmap(lambda s: g(xx, shifted(yy, s), b), randomness=R.VMAP_RANDOMNESS)(signs)
        return vals[0].to(work), vals[1].to(work)

    def values_pair(xx, yy, b):
        # two evaluations replaying one random stream (common random numbers)
        state = R.capture(yy)
        plus, minus = R.replaying(state, [lambda: g(xx, shifted(yy, 1.0), b),
                                          lambda: g(xx, shifted(yy, -1.0), b)])
        return plus.to(work), minus.to(work)

    mean_too = with_grad_y and not use_func_mechanism()

    def run(batched_):
        values = values_batched if batched_ else values_pair
        if mean_too and not batched_:
            return _pair_and_mean(g, x, y, lambda s: shifted(y, s), batch, tuple(wrt), scale, work)
        if mean_too:
            return _difference_and_mean(values, x, y, batch, tuple(wrt), scale)
        # "auto": autograd around the vmapped forward outside transforms (measured 0-10%
        # faster than torch.func.grad on LeNet, 15-30% with a large y, bench/large_y.py)
        D = lambda xx, yy, b: (lambda pm: (pm[0] - pm[1]) * scale)(values(xx, yy, b))
        return gradient(D, x, y, batch, argnums=tuple(wrt), mode="auto") + (None,)

    ran = batched
    if batched is None:
        ran = True
        # vmap first; objectives vmap cannot trace (a module without a batching rule such
        # as nn.LSTM with batched weights, .item(), data-dependent control flow) fall back
        # to two evaluations, replaying the random stream so the fallback sees what the
        # first attempt would have
        state = R.capture(y)
        try:
            _, grads_, mean = run(True)
        except (RuntimeError, NotImplementedError) as err:
            if not vmap_unsupported(err):
                raise
            R.restore(state)
            ran = False
            _, grads_, mean = run(False)
    else:
        _, grads_, mean = run(bool(batched))
    out = dict(zip(wrt, grads_))
    return FDProducts(out.get(1), out.get(0), d_t, bool(ran), mean)


def _pair_and_mean(g, x, y, shifted, batch, wrt, scale, work):
    """Two evaluations on separate leaves — (x₊, y+δv) and (x₋, y−δv), one random stream —
    and ONE backward of g₊ + g₋: each point's own gradients, from which the differences
    (the products) and the mean of the y-gradients.  Each branch is traversed once, as in
    the backward of D alone."""
    legs = []
    for s in (1.0, -1.0):
        xs = {k: t.detach().requires_grad_(0 in wrt) for k, t in x.items()}
        ys = {k: t.detach().requires_grad_(True) for k, t in shifted(s).items()}
        legs.append((xs, ys))
    inputs = [t for xs, ys in legs for t in ((list(xs.values()) if 0 in wrt else []) + list(ys.values()))]
    state = R.capture(y)
    with torch.enable_grad():
        plus, minus = R.replaying(state, [lambda: g(legs[0][0], legs[0][1], batch),
                                          lambda: g(legs[1][0], legs[1][1], batch)])
        grads = torch.autograd.grad(plus.to(work) + minus.to(work), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gi is None else gi.detach() for gi, t in zip(grads, inputs)]
    half = len(grads) // 2
    nx = len(x) if 0 in wrt else 0
    plus_g, minus_g = grads[:half], grads[half:]
    diff = [((a.to(work) - b.to(work)) * scale).to(a.dtype) for a, b in zip(plus_g, minus_g)]
    out = {0: dict(zip(x, diff[:nx])), 1: dict(zip(y, diff[nx:]))}
    mean = {k: ((a.to(work) + b.to(work)) * 0.5).to(a.dtype) for k, a, b in zip(y, plus_g[nx:], minus_g[nx:])}
    D = (plus.detach().to(work) - minus.detach().to(work)) * scale
    return D, tuple(out[i] for i in wrt), mean


def _difference_and_mean(values, x, y, batch, wrt, scale):
    """(D, grads of D = (g₊ − g₋)·scale w.r.t. ``wrt``, ∇y of M = (g₊ + g₋)/2) from one
    evaluation of the pair: two backward passes through one graph, the second restricted
    to y (the x-only part of g — a network body — is not traversed again)."""
    xr = {k: t.detach().requires_grad_(0 in wrt) for k, t in x.items()}
    yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
    groups = [(i, list((xr, yr)[i].values())) for i in wrt]
    flat = [t for _, ts in groups for t in ts]
    with torch.enable_grad():
        plus, minus = values(xr, yr, batch)
        D = (plus - minus) * scale
        gD = torch.autograd.grad(D, flat, retain_graph=True, allow_unused=True)
        gM = torch.autograd.grad((plus + minus) * 0.5, list(yr.values()), allow_unused=True)
    zero = lambda gi, t: torch.zeros_like(t) if gi is None else gi.detach()
    out, pos = [], 0
    for i, ts in groups:
        keys = list((xr, yr)[i])
        out.append({k: zero(gi, t) for k, gi, t in zip(keys, gD[pos:pos + len(ts)], ts)})
        pos += len(ts)
    mean = {k: zero(gi, t).to(t.dtype) for (k, t), gi in zip(yr.items(), gM)}
    return D.detach(), tuple(out), mean


#: vmap the ± pair when its forward costs less than this many plain forwards of g.  CPU,
#: calibrated on four problems (FLOP ratios 1.00, 1.34, 1.67, 1.89: LeNet with a linear head
#: to an MLP whose last three layers are y); the two pair modes tie near 1.6-1.7
#: (bench/RESULTS.md, "FdeHBO vs FMBO when y is large").
PAIR_FLOP_RATIO = 1.6


def pair_flop_ratio(g, x, y, v, batch, delta) -> float:
    """FLOPs (matmul/conv, ``torch.utils.flop_counter``) of the forward of the vmapped ± pair
    over those of one plain forward of g: about 1 when the x-only part of g dominates (a
    body under a small head runs once for both points), about 2 when the y-dependent part
    does (vmap saves nothing).  inf when vmap cannot trace g, nan when g counts no FLOPs.
    ``x``, ``y``, ``v`` are dicts or flat tensors.  The random stream is left as found."""
    from torch.utils.flop_counter import FlopCounterMode
    ys, vs = _leaves(y), _leaves(v)
    work = torch.float64 if ys[0].dtype == torch.float64 else torch.float32
    d = torch.as_tensor(delta, dtype=work, device=ys[0].device)
    shifted = lambda s: _rebuild(y, [(t.to(work) + (s * d) * vi.to(work)).to(t.dtype) for t, vi in zip(ys, vs)])
    state = R.capture(y)
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as one:
                g(x, y, batch)
            signs = torch.tensor([1.0, -1.0], dtype=work, device=ys[0].device)
            try:
                with FlopCounterMode(display=False) as two:
                    vmap(lambda s: g(x, shifted(s), batch), randomness=R.VMAP_RANDOMNESS)(signs)
            except (RuntimeError, NotImplementedError) as err:
                if not vmap_unsupported(err):
                    raise
                return float("inf")
    finally:
        R.restore(state)
    a, b = one.get_total_flops(), two.get_total_flops()
    return b / a if a > 0 else float("nan")


def choose_pair_batched(g, x, y, v, batch, delta) -> bool:
    """The pair mode for ``fd_products(batched=...)``: vmap (True) when its forward costs
    under ``PAIR_FLOP_RATIO`` plain forwards, else two evaluations (False); vmap when g
    counts no FLOPs.  FdeHBO decides once, at its first finite-difference step."""
    r = pair_flop_ratio(g, x, y, v, batch, delta)
    return not (r >= PAIR_FLOP_RATIO)


def vmap_unsupported(err: BaseException) -> bool:
    """True for the errors by which torch.func.vmap refuses an objective (no batching rule,
    data-dependent control flow, host reads, in-place writes into captured tensors)."""
    text = str(err)
    return any(m in text for m in ("Batching rule not implemented", "vmap", "Batched", "batched",
                                   "data-dependent", ".item()", "captured Tensor"))


def _leaves(arg):
    return list(arg.values()) if isinstance(arg, Mapping) else [arg]


def _rebuild(arg, leaves):
    return dict(zip(arg.keys(), leaves)) if isinstance(arg, Mapping) else leaves[0]


def gradient(fn, x, y, batch, argnums=(0, 1), mode: str = "auto", create_graph: bool = False):
    """(value, gradients) of ``fn(x, y, batch)`` w.r.t. the arguments in ``argnums``.

    ``x`` and ``y`` may be dicts of tensors or single tensors (flat buffers).  Returns
    ``(value, grads)`` with ``grads`` a tuple ordered like ``argnums`` (zeros for inputs
    ``fn`` does not use).

    mode: ``"autograd"`` runs one backward with ``torch.autograd.grad`` restricted to the
        requested inputs (measured 2-6x faster than ``torch.func`` here for y-only
        gradients and unrolled steps); ``"func"`` uses ``torch.func.grad_and_value`` and
        composes with vmap/grad; ``"auto"`` picks ``"func"`` inside torch.func transforms
        and under torch.compile.
    create_graph: (autograd mode) keep the graph so the result can be differentiated
        again; the inputs are then used as given (not detached), so gradients flow back
        to whatever they depend on.
    """
    if isinstance(argnums, int):
        argnums = (argnums,)
    if mode == "auto":
        mode = "func" if use_func_mechanism() else "autograd"
    if mode == "func":
        from torch.func import grad_and_value
        gr, val = grad_and_value(fn, argnums=argnums)(x, y, batch)
        return val, gr
    args = [x, y]
    inputs = []
    with torch.enable_grad():
        for i in (0, 1):
            leaves = _leaves(args[i])
            if create_graph:
                leaves = [t if (i not in argnums or t.requires_grad) else t.detach().requires_grad_(True)
                          for t in leaves]
            else:
                leaves = [t.detach().requires_grad_(i in argnums) for t in leaves]
            if i in argnums:
                inputs.append(leaves)
            args[i] = _rebuild(args[i], leaves)
        val = fn(args[0], args[1], batch)
        flat = [t for group in inputs for t in group]
        gs = torch.autograd.grad(val, flat, create_graph=create_graph, allow_unused=True)
    gs = [torch.zeros_like(t) if gi is None else (gi if create_graph else gi.detach()) for gi, t in zip(gs, flat)]
    out, pos = [], 0
    for i, leaves in zip(argnums, inputs):
        out.append(_rebuild(args[i], gs[pos:pos + len(leaves)]))
        pos += len(leaves)
    return (val if create_graph else val.detach()), tuple(out)


__all__.append("gradient")


def exact_products(g, x, y, v, batch):
    """(∇xy g·v, ∇yy g·v) exactly, from one evaluation of ∇y g with its graph kept and a
    single backward (FMBO, eq. (12)-(13)).  ``x``, ``y``, ``v`` are dicts or flat tensors.
    torch.func inside transforms, autograd otherwise."""
    if use_func_mechanism():
        _, pull = vjp(lambda a, b: grad(g, argnums=1)(a, b, batch), x, y)
        return pull(v)
    xs, ys = _leaves(x), _leaves(y)
    with torch.enable_grad():
        xr = [t.detach().requires_grad_(True) for t in xs]
        yr = [t.detach().requires_grad_(True) for t in ys]
        (gyr,) = gradient(g, _rebuild(x, xr), _rebuild(y, yr), batch, argnums=1, create_graph=True)[1]
        outs = _leaves(gyr)
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        vs = _leaves(v)
        res = torch.autograd.grad([outs[i] for i in live], xr + yr, [vs[i] for i in live],
                                  allow_unused=True) if live else [None] * (len(xr) + len(yr))
    res = [torch.zeros_like(t) if r is None else r.detach() for r, t in zip(res, xs + ys)]
    return _rebuild(x, res[:len(xs)]), _rebuild(y, res[len(xs):])


__all__.append("exact_products")


_NO_DOUBLE_BACKWARD = ("_cudnn_rnn_backward", "once_differentiable", "differentiate twice", "double backward")


@contextlib.contextmanager
def second_order(method: str):
    """Context for a method that differentiates a gradient again (AID, ITD, stocBiO, FMBO):
    an objective without a double backward — a cuDNN RNN on CUDA (nn.LSTM, nn.GRU, nn.RNN),
    a custom ``@once_differentiable`` function — fails deep inside autograd; this turns
    that failure into a RuntimeError naming the module type (seen by
    :func:`torchbilevel.nn.call`), the method and the methods that need no double backward."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not (any(m in text for m in _NO_DOUBLE_BACKWARD)
                or ("derivative for" in text and "is not implemented" in text)):
            raise
        from .nn import cudnn_rnns_seen
        rnns = cudnn_rnns_seen()
        who = (f"{', '.join(rnns)} on CUDA (cuDNN RNN kernels)" if rnns else "an operation of the objective")
        hint = (" or keep the RNN but disable cuDNN for it (with torch.backends.cudnn.flags(enabled=False): ...)"
                if rnns else "")
        raise RuntimeError(
            f"{method} differentiates the gradient of g a second time (Hessian/Jacobian-vector products), "
            f"and {who} has no double backward. Use a method that needs only gradients: tb.fdehbo "
            f"(finite-difference products), tb.pzobo (zeroth order in x) or tb.first_order(){hint}. "
            f"Original error: {text.splitlines()[0] if text else type(err).__name__}") from err
