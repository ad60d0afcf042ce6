"""FdeHBO vs FMBO when y is a large part of the network: where a step's time goes, and
faster ways to compute the finite-difference pair (issue 11, item 5).

Problem (``make``): an MLP 64 -> 256 -> 256 -> 256 -> 10 on batch 256; x is the first
layer (W1, b1: 16,640 parameters), y the last three layers (W2, b2, W3, b3, W4, b4:
134,154 parameters; tanh after layers 1-3, the last one gives the logits); g =
cross-entropy on the inner batch + 1e-3·‖y‖², f = cross-entropy on the outer batch.
Contrasts: LeNet hyper-representation (bench/lenet_problem.py: x = the conv body,
60,856 parameters, y = an 850-parameter linear head), and for calibrating the pair-mode
rule the same MLP with a wider first layer (``mlp_din256``, ``mlp_din1024``).

Unit: one ``torch.func.grad(g, argnums=(0, 1))`` evaluation at the same point (as in
bench/step_cost.py).  CPU time (``time.process_time``), one torch thread, every row
timed once per round, rounds interleaved, medians reported.

    python bench/large_y.py [--problem large_y|lenet|both|all|...] [--repeats 25] [--json out.json]

Rows: full FdeHBO / FMBO steps (one step in: the previous-iterate evaluations included),
also with a prototype pair mode patched into the library's step; the library's parts of
a step (``derivatives.fd_products`` batched / not, ``derivatives.exact_products``,
``derivatives.gradient`` for ∇y g and ∇f, the stacking of rows, the fused update, δ);
and the pair modes of ``PAIR_MODES`` (same inputs and outputs as ``fd_products`` on flat
buffers, checked against it in float64 before timing).  ``flop_ratio`` / ``choose_batched``
are the proposed rule for picking the pair mode per problem.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torchbilevel as tb  # noqa: E402
from torchbilevel import kernels as K  # noqa: E402
from torchbilevel import tree as T  # noqa: E402
from torchbilevel.derivatives import exact_products, fd_delta, fd_products, gradient  # noqa: E402


# ---------------------------------------------------------------- the problem

def make(batch: int = 256, d_in: int = 64, hidden: int = 256, classes: int = 10, device: str = "cpu",
         seed: int = 0, l2: float = 1e-3):
    """(problem, x, y, inner_batch, outer_batch): x = first layer, y = the last three layers."""
    gen = torch.Generator().manual_seed(seed)

    def lin(i, o):
        return ((torch.randn(i, o, generator=gen) / i ** 0.5).to(device), torch.zeros(o, device=device))

    W1, b1 = lin(d_in, hidden)
    W2, b2 = lin(hidden, hidden)
    W3, b3 = lin(hidden, hidden)
    W4, b4 = lin(hidden, classes)
    x = {"W1": W1, "b1": b1}
    y = {"W2": W2, "b2": b2, "W3": W3, "b3": b3, "W4": W4, "b4": b4}

    def logits(x, y, X):
        h = torch.tanh(X @ x["W1"] + x["b1"])
        h = torch.tanh(h @ y["W2"] + y["b2"])
        h = torch.tanh(h @ y["W3"] + y["b3"])
        return h @ y["W4"] + y["b4"]

    def g(x, y, batch):
        X, lab = batch
        return F.cross_entropy(logits(x, y, X), lab) + l2 * sum(t.pow(2).sum() for t in y.values())

    def f(x, y, batch):
        X, lab = batch
        return F.cross_entropy(logits(x, y, X), lab)

    def data():
        return (torch.randn(batch, d_in, generator=gen).to(device),
                torch.randint(0, classes, (batch,), generator=gen).to(device))

    return tb.Bilevel(outer=f, inner=g), x, y, data(), data()


def make_lenet(batch: int = 128, device: str = "cpu"):
    import lenet_problem
    return lenet_problem.make(batch=batch, device=device)


PROBLEMS = {"large_y": make, "lenet": make_lenet,
            # calibration of the rule: the same MLP with a wider input layer (x), so that the
            # x-only share of the FLOPs grows (vmapped/plain forward FLOPs 1.67 and 1.34)
            "mlp_din256": lambda **kw: make(d_in=256, **kw), "mlp_din1024": lambda **kw: make(d_in=1024, **kw)}


# ---------------------------------------------------------------- pair modes (prototypes)
# Each takes (g, xf, yf, vf, batch, delta) with g a function of flat buffers and returns
# (H̃v, J̃v) ≈ (∇yy g·v, ∇xy g·v) as flat tensors, like derivatives.fd_products.

def pair_vmap(g, xf, yf, vf, batch, delta):
    """The library default: one vmap over the sign, gradient of D through torch.func."""
    r = fd_products(g, xf, yf, vf, batch, delta=delta, batched=True)
    return r.hvp, r.mixed


def pair_two_forwards(g, xf, yf, vf, batch, delta):
    """The library's batched=False: g at y ± δv in plain autograd, one backward of D."""
    r = fd_products(g, xf, yf, vf, batch, delta=delta, batched=False)
    return r.hvp, r.mixed


def pair_autograd_flat(g, xf, yf, vf, batch, delta):
    """batched=False without the dict wrapping and dtype round trips: D = (g(y+δv) − g(y−δv))/2δ
    on flat leaves, one torch.autograd.grad."""
    with torch.enable_grad():
        xr = xf.detach().requires_grad_(True)
        yr = yf.detach().requires_grad_(True)
        dv = delta * vf
        D = (g(xr, yr + dv, batch) - g(xr, yr - dv, batch)) * (0.5 / delta)
        gx, gy = torch.autograd.grad(D, (xr, yr))
    return gy, gx


def pair_two_grads(g, xf, yf, vf, batch, delta):
    """Two separate gradients (two backward calls), then the difference (the pre-rewrite design)."""
    out = []
    for s in (1.0, -1.0):
        _, (gx, gy) = gradient(g, xf, yf + (s * delta) * vf, batch)
        out.append((gx, gy))
    (gxp, gyp), (gxm, gym) = out
    sc = 0.5 / delta
    return (gyp - gym) * sc, (gxp - gxm) * sc


def pair_vmap_autograd_outer(g, xf, yf, vf, batch, delta):
    """vmap over the sign for the forward only, plain autograd for the backward (no
    torch.func grad transform around the vmap)."""
    signs = torch.tensor([1.0, -1.0], dtype=yf.dtype, device=yf.device)
    with torch.enable_grad():
        xr = xf.detach().requires_grad_(True)
        yr = yf.detach().requires_grad_(True)
        vals = vmap(lambda s: g(xr, yr + (s * delta) * vf, batch))(signs)
        D = (vals[0] - vals[1]) * (0.5 / delta)
        gx, gy = torch.autograd.grad(D, (xr, yr))
    return gy, gx


def pair_jvp_exact(g, xf, yf, vf, batch, delta):
    """Not a finite difference: forward-over-reverse, the tangent of ∇g along (0, v) gives
    (∇xy g·v, ∇yy g·v) exactly (a data point against FMBO's double backward)."""
    _, (jv, hv) = jvp(lambda yy: grad(g, argnums=(0, 1))(xf, yy, batch), (yf,), (vf,))
    return hv, jv


def pair_exact_double_backward(g, xf, yf, vf, batch, delta):
    """FMBO's products: derivatives.exact_products (one graph of ∇y g, one backward)."""
    jv, hv = exact_products(g, xf, yf, vf, batch)
    return hv, jv


def flop_ratio(g, xf, yf, vf, batch, delta) -> float:
    """FLOPs (matmul/conv, torch.utils.flop_counter) of the vmapped ± forward over those of one
    plain forward: ~1 when only the x-only part of g costs (a body under a small head: the
    vmap runs it once for both points), ~2 when the y-dependent part dominates (vmap saves
    nothing and only adds batching overhead).  NaN when g counts no FLOPs at all."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad():
        with FlopCounterMode(display=False) as one:
            g(xf, yf, batch)
        signs = torch.tensor([1.0, -1.0], dtype=yf.dtype, device=yf.device)
        try:
            with FlopCounterMode(display=False) as two:
                vmap(lambda s: g(xf, yf + (s * delta) * vf, batch))(signs)
        except (RuntimeError, NotImplementedError):
            return float("inf")       # vmap cannot trace g: two evaluations it is
    a, b = one.get_total_flops(), two.get_total_flops()
    return b / a if a > 0 else float("nan")


#: vmap the pair when the vmapped ± forward costs less than this many plain forwards (CPU,
#: calibrated on the four problems here, ratios 1.00 / 1.34 / 1.67 / 1.89: the two modes tie
#: near 1.67; see bench/RESULTS.md "FdeHBO vs FMBO when y is large")
FLOP_RATIO_THRESHOLD = 1.6


def choose_batched(g, xf, yf, vf, batch, delta) -> bool:
    """The proposed rule: vmap over the sign iff it saves FLOPs (ratio < threshold); a g
    without counted FLOPs keeps the current default (vmap)."""
    r = flop_ratio(g, xf, yf, vf, batch, delta)
    return not (r >= FLOP_RATIO_THRESHOLD)


def rule_pair():
    """The rule as a library would apply it: decided at the first call (the first step) and
    kept for the algorithm's lifetime; returns a pair function.  vmap → vmapped forward +
    autograd backward; otherwise two plain forwards + one backward."""
    choice = []

    def pair(g, xf, yf, vf, batch, delta):
        if not choice:
            choice.append(choose_batched(g, xf, yf, vf, batch, delta))
        return (pair_vmap_autograd_outer if choice[0] else pair_autograd_flat)(g, xf, yf, vf, batch, delta)
    pair.choice = choice
    return pair


PAIR_MODES = {
    "vmap (library default, batched=True)": pair_vmap,
    "two forwards, one backward (library, batched=False)": pair_two_forwards,
    "two forwards, one backward, flat leaves (proto)": pair_autograd_flat,
    "vmapped forward, autograd backward (proto)": pair_vmap_autograd_outer,
    "two separate gradients (proto)": pair_two_grads,
    "exact: forward-over-reverse jvp (proto)": pair_jvp_exact,
    "exact: double backward (library, FMBO)": pair_exact_double_backward,
    "rule: FLOP ratio picks vmap-fwd/autograd-bwd or two forwards (proto)": rule_pair,
}


def pair_mode(name):
    """A fresh pair function for PAIR_MODES[name] (the rule entry is a factory)."""
    fn = PAIR_MODES[name]
    return fn() if fn is rule_pair else fn


def patched_fd_products(pair):
    """A stand-in for derivatives.fd_products (flat buffers) that computes the pair with
    ``pair``: lets the real FdeHBO step run with a prototype pair mode."""
    from torchbilevel.derivatives import FDProducts

    def fdp(g, x, y, v, batch, delta=None, batched=None, wrt=(0, 1)):
        d = fd_delta({"_": y}, {"_": v}) if delta is None else delta
        hv, jv = pair(g, x, y, v, batch, d)
        return FDProducts(hv if 1 in wrt else None, jv if 0 in wrt else None, torch.as_tensor(d))
    return fdp


# ---------------------------------------------------------------- fused evaluations of a step point (prototypes)

def point_fd_fused(g, f, xf, yf, vf, ib, ob, delta):
    """All FdeHBO evaluations at one point in ONE autograd backward: ∇y g(y), ∇f(x, y) and
    the pair's D, on separate leaves (so their gradients stay apart) — one engine pass,
    three graphs.  Returns (gy, fx, fy, hv, jv)."""
    with torch.enable_grad():
        y0 = yf.detach().requires_grad_(True)
        x1, y1 = xf.detach().requires_grad_(True), yf.detach().requires_grad_(True)
        x2, y2 = xf.detach().requires_grad_(True), yf.detach().requires_grad_(True)
        dv = delta * vf
        x0 = xf.detach()
        D = (g(x2, y2 + dv, ib) - g(x2, y2 - dv, ib)) * (0.5 / delta)
        total = g(x0, y0, ib) + f(x1, y1, ob) + D
        gy, fx, fy, jv, hv = torch.autograd.grad(total, (y0, x1, y1, x2, y2))
    return gy, fx, fy, hv, jv


def point_fd_mean_gy(g, f, xf, yf, vf, ib, ob, delta):
    """FdeHBO's evaluations at one point when ζ = ψ, from two separate gradients at y ± δv:
    their difference gives the pair (eq. (9), (11)), their mean ∇y g(y) + O(δ²) (the
    second-order term (δ²/2)·∇³g[v, v]) instead of a separate ∇y g evaluation.  Not
    exact: an approximation of ∇y g with the FD products' own order of accuracy."""
    with torch.enable_grad():
        xr, yr = xf.detach().requires_grad_(True), yf.detach().requires_grad_(True)
        dv = delta * vf
        gxp, gyp = torch.autograd.grad(g(xr, yr + dv, ib), (xr, yr))
        gxm, gym = torch.autograd.grad(g(xr, yr - dv, ib), (xr, yr))
    sc = 0.5 / delta
    _, (fx, fy) = gradient(f, xf, yf, ob)
    return 0.5 * (gyp + gym), fx, fy, (gyp - gym) * sc, (gxp - gxm) * sc


def point_exact_reuse(g, f, xf, yf, vf, ib, ob):
    """FMBO's evaluations at one point with ∇y g taken from the graph the exact products
    build anyway (valid when ζ = ψ, i.e. full batches): saves one ∇y g per point."""
    with torch.enable_grad():
        xr, yr = xf.detach().requires_grad_(True), yf.detach().requires_grad_(True)
        (gyr,) = torch.autograd.grad(g(xr, yr, ib), (yr,), create_graph=True)
        jv, hv = torch.autograd.grad(gyr, (xr, yr), vf)
    _, (fx, fy) = gradient(f, xf, yf, ob)
    return gyr.detach(), fx, fy, hv, jv


# ---------------------------------------------------------------- timing

def measure_cpu(fns: dict, repeats: int, warmup: int = 2, clock=time.process_time, sync=None):
    """Median seconds per call of each fn; every round times each fn once (interleaved)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if sync:
        sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            if sync:
                sync()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_fns(problem, x, y, ib, ob, prefix=""):
    """FdeHBO (the library default — pair mode by the FLOP rule, ∇y g from the pair when one
    batch serves both — and forced pair modes) and FMBO steps, one step in (t >= 1)."""
    common = dict(lr_x=0.01, lr_y=0.01, lr_v=0.01, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    out = {}
    for name, algo in (("FdeHBO step (library default)", tb.fdehbo(problem, **common)),
                       ("FdeHBO step (batched=True)", tb.fdehbo(problem, batched=True, **common)),
                       ("FdeHBO step (batched=False)", tb.fdehbo(problem, batched=False, **common)),
                       ("FMBO step", tb.fmbo(problem, **common))):
        state = algo.step(algo.init(x, y), ib, ob)

        def run(algo=algo, box=[state]):
            box[0] = algo.step(box[0], ib, ob)
        out[prefix + name] = run
    return out


def flat_setup(problem, x, y, seed=1):
    xf, lx = T.ravel(x)
    yf, ly = T.ravel(y)
    gen = torch.Generator().manual_seed(seed)
    vf = (0.1 * torch.randn(yf.shape, generator=gen, dtype=yf.dtype)).to(yf.device)
    g = lambda a, b, bt: problem.inner(lx.unravel(a), ly.unravel(b), bt)  # noqa: E731
    f = lambda a, b, bt: problem.outer(lx.unravel(a), ly.unravel(b), bt)  # noqa: E731
    delta = fd_delta({"_": yf}, {"_": vf})
    return g, f, xf, yf, vf, delta


def part_fns(problem, x, y, ib, ob):
    """The parts one single-loop step is made of, as single_loop calls them."""
    g, f, xf, yf, vf, delta = flat_setup(problem, x, y)
    d, p = yf.numel(), xf.numel()
    rows = ([torch.randn(2, d, device=yf.device) for _ in range(3)],
            [torch.randn(2, p, device=xf.device) for _ in range(2)])
    state = dict(y=yf, v=vf, h_g=torch.zeros_like(yf), h_R=torch.zeros_like(yf), x=xf, h_f=torch.zeros_like(xf))

    def stack_rows():
        ry = torch.cat([torch.stack([rows[0][0][0], rows[0][0][1]]), rows[0][1], rows[0][2]]).contiguous()
        rx = torch.cat([torch.stack([rows[1][0][0], rows[1][0][1]]), rows[1][1]]).contiguous()
        return ry, rx

    ry, rx = stack_rows()

    def update():
        # backend "auto", as single_loop: the Triton kernels on CUDA, the reference on CPU
        y2, w, hg, hr, sq = K.inner_update(state["y"], state["v"], state["h_g"], state["h_R"], ry, beta=0.01,
                                           lam=0.01, eta_g=0.5, eta_R=0.5)
        K.project_ball(w, sq, 10.0)
        K.outer_update(state["x"], state["h_f"], rx, alpha=0.01, eta_f=0.5)

    return {
        "part: fd_products(batched=True)": lambda: fd_products(g, xf, yf, vf, ib, delta=delta, batched=True),
        "part: fd_products(batched=False)": lambda: fd_products(g, xf, yf, vf, ib, delta=delta, batched=False),
        "part: exact_products": lambda: exact_products(g, xf, yf, vf, ib),
        "part: gradient ∇y g": lambda: gradient(g, xf, yf, ib, argnums=1),
        "part: gradient ∇f (x, y)": lambda: gradient(f, xf, yf, ob),
        "part: stack rows": stack_rows,
        "part: fused update (inner + projection + outer)": update,
        "part: δ (two norms)": lambda: fd_delta({"_": yf}, {"_": vf}),
        "proto point: FdeHBO evaluations, one backward": lambda: point_fd_fused(g, f, xf, yf, vf, ib, ob, delta),
        "proto point: FMBO evaluations, ∇y g reused (ζ = ψ)": lambda: point_exact_reuse(g, f, xf, yf, vf, ib, ob),
        "proto point: FdeHBO evaluations, ∇y g = mean of the ± gradients (ζ = ψ)":
            lambda: point_fd_mean_gy(g, f, xf, yf, vf, ib, ob, delta),
    }


def pair_fns(problem, x, y, ib):
    g, _, xf, yf, vf, delta = flat_setup(problem, x, y)
    return {f"pair: {name}": (lambda fn=pair_mode(name): fn(g, xf, yf, vf, ib, delta)) for name in PAIR_MODES}


def check_pairs(problem, x, y, ib):
    """Every pair mode agrees with the library's fd_products (float64 copy of the problem)."""
    x64, y64 = T.tree_map(lambda t: t.double(), x), T.tree_map(lambda t: t.double(), y)
    ib64 = tuple(t.double() if t.is_floating_point() else t for t in ib)
    g, _, xf, yf, vf, delta = flat_setup(problem, x64, y64)
    vf = vf.double()
    want = fd_products(g, xf, yf, vf, ib64, delta=delta)
    out = {}
    for name in PAIR_MODES:
        hv, jv = pair_mode(name)(g, xf, yf, vf, ib64, delta)
        err = max(((hv - want.hvp).norm() / want.hvp.norm()).item(), ((jv - want.mixed).norm() / want.mixed.norm()).item())
        out[name] = err
        assert err < 1e-4, (name, err)
    return out


def accuracy_f32(problem, x, y, ib, ob) -> dict:
    """Relative errors, in the problem's float32 at the library's default δ, of the FD pair
    (H̃v, J̃v) and of the mean-of-± estimate of ∇y g, against exact float64 values."""
    g, f, xf, yf, vf, delta = flat_setup(problem, x, y)
    gy_m, _, _, hv, jv = point_fd_mean_gy(g, f, xf, yf, vf, ib, ob, delta)
    x64, y64 = T.tree_map(lambda t: t.double(), x), T.tree_map(lambda t: t.double(), y)
    ib64 = tuple(t.double() if t.is_floating_point() else t for t in ib)
    g64, _, xf64, yf64, _, _ = flat_setup(problem, x64, y64)
    jv_ex, hv_ex = exact_products(g64, xf64, yf64, vf.double(), ib64)
    gy_ex = gradient(g64, xf64, yf64, ib64, argnums=1)[1][0]
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    return {"delta_times_norm_v": float(delta * vf.norm()), "hvp": rel(hv, hv_ex), "mixed": rel(jv, jv_ex),
            "grad_y_from_mean": rel(gy_m, gy_ex),
            "grad_y_float32_direct": rel(gradient(g, xf, yf, ib, argnums=1)[1][0], gy_ex)}


def run_rows(problem, x, y, ib, ob, repeats=15, measure=None, check=True, with_steps=True):
    """Every row on one problem, timed together (``measure(fns, repeats) -> {row: seconds}``;
    default: interleaved process CPU time), in gradient units."""
    measure = measure or measure_cpu
    nx, ny = sum(t.numel() for t in x.values()), sum(t.numel() for t in y.values())
    errs = check_pairs(problem, x, y, ib) if check else {}
    acc = accuracy_f32(problem, x, y, ib, ob) if check else {}
    g, _, xf, yf, vf, delta = flat_setup(problem, x, y)
    ratio = flop_ratio(g, xf, yf, vf, ib, delta)
    unit_row = "unit: torch.func grad(g, argnums=(0,1))"
    fns = {unit_row: lambda: grad(problem.inner, argnums=(0, 1))(x, y, ib)}
    if with_steps:
        fns.update(step_fns(problem, x, y, ib, ob))
    fns.update(part_fns(problem, x, y, ib, ob))
    fns.update(pair_fns(problem, x, y, ib))
    sec = measure(fns, repeats)
    unit = sec[unit_row]
    rows = [{"row": k, "ms": 1e3 * s, "units": s / unit} for k, s in sec.items()]
    return {"numel_x": nx, "numel_y": ny, "flop_ratio": ratio, "rule_batched": not (ratio >= FLOP_RATIO_THRESHOLD),
            "pair_rel_err_vs_fd_products_f64": errs, "accuracy_f32": acc, "rows": rows}


def run_problem(name, repeats, with_steps=True, device="cpu"):
    return {"problem": name, **run_rows(*PROBLEMS[name](device=device), repeats=repeats, check=device == "cpu",
                                         with_steps=with_steps)}


def ratios(res) -> dict:
    """FdeHBO step / FMBO step for each FdeHBO row (one run, same unit)."""
    u = {r["row"]: r["units"] for r in res["rows"]}
    fm = u.get("FMBO step")
    return {k: v / fm for k, v in u.items() if fm and k.startswith("FdeHBO step")}


def print_table(res):
    print(f"\n## {res['problem']}: numel(x) = {res['numel_x']}, numel(y) = {res['numel_y']}, "
          f"vmapped/plain forward FLOPs = {res['flop_ratio']:.3f} -> rule: batched={res['rule_batched']}")
    print("| row | ms | gradient units |\n|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['row']} | {r['ms']:.2f} | {r['units']:.2f} |")
    for k, v in ratios(res).items():
        print(f"# {k} / FMBO step = {v:.3f}")
    if res.get("accuracy_f32"):
        print("# float32 relative errors vs exact float64: " +
              ", ".join(f"{k}={v:.2e}" for k, v in res["accuracy_f32"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="both", choices=["large_y", "lenet", "both", "mlp_din256", "mlp_din1024", "all"])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-steps", action="store_true", help="parts and pair modes only")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = {"both": ["large_y", "lenet"], "all": list(PROBLEMS)}.get(a.problem, [a.problem])
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, repeats={a.repeats}, CPU time (process_time), interleaved medians")
    results = []
    for n in names:
        res = run_problem(n, a.repeats, with_steps=not a.no_steps)
        print_table(res)
        results.append(res)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
