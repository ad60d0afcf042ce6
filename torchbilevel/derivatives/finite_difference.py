"""Finite-difference products of the inner objective (FdeHBO paper, eq. (9) and (11)), their
step δ, and the policy that evaluates the ± pair (one vmap or two evaluations).
"""
from __future__ import annotations

import contextlib

from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.func import vmap

from .. import randomness as R
from .. import tree as T
from ..tracing import use_func_mechanism
from .gradient import _leaves, _rebuild, gradient
from .second_order import math_sdpa

__all__ = ["fd_delta", "fd_delta_from_norms", "FDProducts", "fd_products", "vmap_unsupported",
           "pair_flop_ratio", "choose_pair_batched", "PAIR_FLOP_RATIO"]


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
    value: Optional[Tensor] = None   # with_grad_y: (g(y+δv) + g(y−δv))/2 = g(y) + O(δ²), evaluated anyway


def fd_products(g, x, y, v, batch, delta=None, batched: Optional[bool] = None, wrt=(0, 1),
                with_grad_y: bool = False, exact_zero: bool = True) -> FDProducts:
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
            Outside torch.func transforms only (None inside them).  ``value`` is then
            (g(y+δv) + g(y−δv))/2 (a 0-d tensor in float32, float64 for float64 y).

    FD products are accurate when g is smooth along the segment y ± δv (a linear or
    softmax head, ridge/logistic losses).  Across ReLU kinks or max-pooling switches the
    error is O(1), not O(δ²): use exact products (FMBO, AID) for such inner variables.

    exact_zero: a zero direction v gives exactly zero products (the two rows of the vmapped
        pair may round differently on some CPUs, ~1e-27 instead of 0; a 0-d mask, no host
        read).  Pass False when v is one rank's shard of a sharded vector: a zero shard does
        not make the products zero (the sharded FdeHBO step does).
    """
    if isinstance(y, Tensor):        # flat buffers: wrap in one-entry dicts and unwrap at the end
        tx = isinstance(x, Tensor)
        g_d = lambda xx, yy, b: g(xx["_"] if tx else xx, yy["_"], b)
        r = fd_products(g_d, {"_": x} if tx else x, {"_": y}, {"_": v}, batch, delta, batched, wrt, with_grad_y,
                        exact_zero)
        unx = (lambda t: t["_"]) if tx else (lambda t: t)
        return FDProducts(None if r.hvp is None else r.hvp["_"], None if r.mixed is None else unx(r.mixed),
                          r.delta, r.batched, None if r.grad_y is None else r.grad_y["_"], r.value)
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
        # one vmap over the sign; randomness="same": both points see one dropout mask.  On
        # CPU, attention on the math backend: the CPU flash kernel has no batching rule, so
        # vmap would loop over the pair through its slow fallback (a warning per run);
        # measured on a GPT-2 (2 layers, width 64, 8 x 32 tokens): 11.2 ms either way,
        # two plain evaluations 12.3 ms (bench/RESULTS.md §15)
        signs = torch.tensor([1.0, -1.0], dtype=work, device=any_y.device)
        with _cpu_math_attention(any_y.device):
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
    # A zero direction gives exactly zero products: the two rows of the vmapped pair may
    # round differently on some CPUs (~1e-27 instead of 0), so mask them; a 0-d bool, no
    # host read (composes with vmap and torch.compile).
    if exact_zero:
        live = T.sqnorm(v) != 0
        if use_func_mechanism():       # (under transforms: out of place, the mask may be batched)
            grads_ = [{k: torch.where(live, t, torch.zeros_like(t)) for k, t in tr.items()} for tr in grads_]
        else:                          # in place on the fresh gradients: no second copy of them
            dead = ~live
            grads_ = [{k: t.masked_fill_(dead, 0) for k, t in tr.items()} for tr in grads_]
    out = dict(zip(wrt, grads_))
    return FDProducts(out.get(1), out.get(0), d_t, bool(ran), *(mean if mean is not None else (None, None)))


def _pair_and_mean(g, x, y, shifted, batch, wrt, scale, work):
    """Two evaluations on separate leaves — (x₊, y+δv) and (x₋, y−δv), one random stream —
    each with its own backward, one after the other: each point's own gradients, from which
    the differences (the products) and the mean of the y-gradients (with the mean of the two
    values).  Each branch is traversed once, as in the backward of D alone; the second
    perturbed copy of y exists only after the first one's graph is gone (the joint backward of
    g₊ + g₋ held both copies and both gradients at once: 5 vectors of y at its peak, 4 now)."""
    def leg(s):
        xs = {k: t.detach().requires_grad_(0 in wrt) for k, t in x.items()}
        ys = {k: t.detach().requires_grad_(True) for k, t in shifted(s).items()}
        inputs = (list(xs.values()) if 0 in wrt else []) + list(ys.values())
        with torch.enable_grad():
            value = g(xs, ys, batch)
            grads = torch.autograd.grad(value.to(work), inputs, allow_unused=True)
        return value.detach(), [torch.zeros_like(t) if gi is None else gi.detach() for gi, t in zip(grads, inputs)]

    state = R.capture(y)
    (plus, plus_g), (minus, minus_g) = R.replaying(state, [lambda: leg(1.0), lambda: leg(-1.0)])
    grads = plus_g + minus_g
    del plus_g, minus_g
    half = len(grads) // 2
    nx = len(x) if 0 in wrt else 0
    diff, means = [], []
    for i in range(half):
        a, b = grads[i], grads[half + i]
        grads[i] = grads[half + i] = None           # each pair freed (or reused) as soon as it is used
        if a.dtype == work:             # the same operations in place: no copies beside them
            diff.append(torch.sub(a, b).mul_(scale))
            if i >= nx:
                means.append(a.add_(b).mul_(0.5))
        else:
            diff.append(((a.to(work) - b.to(work)) * scale).to(a.dtype))
            if i >= nx:
                means.append(((a.to(work) + b.to(work)) * 0.5).to(a.dtype))
        del a, b
    out = {0: dict(zip(x, diff[:nx])), 1: dict(zip(y, diff[nx:]))}
    mean = dict(zip(y, means))
    D = (plus.detach().to(work) - minus.detach().to(work)) * scale
    return D, tuple(out[i] for i in wrt), (mean, (plus.detach().to(work) + minus.detach().to(work)) * 0.5)


def _difference_and_mean(values, x, y, batch, wrt, scale):
    """(D, grads of D = (g₊ − g₋)·scale w.r.t. ``wrt``, (∇y M, M) for M = (g₊ + g₋)/2) from one
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
    return D.detach(), tuple(out), (mean, ((plus + minus) * 0.5).detach())


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


def _cpu_math_attention(device):
    """scaled_dot_product_attention on its math backend for CPU tensors (whose flash kernel
    has no vmap batching rule); CUDA's kernels have one: unchanged there, and under
    torch.compile (the context made Dynamo recompile the FdeHBO step at every step)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return math_sdpa()                 # thread-safe: the backend flags are process-wide


def vmap_unsupported(err: BaseException) -> bool:
    """True for the errors by which torch.func.vmap refuses an objective (no batching rule,
    data-dependent control flow, host reads, in-place writes into captured tensors, a
    forward hook calling ``requires_grad_`` — transformers' gradient checkpointing does)."""
    text = str(err)
    return any(m in text for m in ("Batching rule not implemented", "vmap", "Batched", "batched",
                                   "data-dependent", ".item()", "captured Tensor", "functorch transform"))
