"""Microbenchmarks of the fused FdeHBO / FMBO step bookkeeping (torchbilevel.kernels).

One "step" is what a single-loop iteration does after its gradient evaluations:
``inner_update`` + ``project_ball`` + ``outer_update`` on flat buffers of n
elements each side (d = p = n). Variants, timed on the same inputs:

    eager     the public API with backend="torch" (the plain-torch reference)
    compile   torch.compile(fullgraph=True) of that same function
    foreach   a torch._foreach_* implementation (multi-tensor ops over y, v, x)
    triton    the public API with backend="triton" (CUDA only)
    copy      dst.copy_(src) moving the same number of bytes (the bandwidth ceiling)

The gradient rows hold finished products (FdeHBO forms its finite-difference
∇yy g·v and ∇xy g·v before the kernels run; FMBO's are exact), so FdeHBO and
FMBO run the same kernels. Bytes moved are the minimum traffic of the fused step:
the inner side reads y, v, h_g, h_R and 6 gradient rows and writes 4 vectors
(14n), the projection reads w and writes v (2n), the outer side reads x, h_f and
4 rows and writes 2 vectors (8n): 24n elements.

Table mode (all variants side by side from one run):

    python bench/bench_kernels.py [--threads T] [--max-size N] [--dtype float32]

pytest-benchmark mode (not collected by the test run, which uses testpaths=tests):

    python -m pytest bench/bench_kernels.py --benchmark-only

Sizes are 10^3 .. 10^8 and 2^24, capped at TB_BENCH_MAX_SIZE or --max-size (default
10^7 on CPU, 10^8 on CUDA); --size-offset 1 times odd sizes instead (no 16-element
alignment: the GPU kernels then fall back to scalar loads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pytest
import torch

import torchbilevel.kernels as K

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEFAULT_MAX = 10**8 if DEVICE.type == "cuda" else 10**7
MAX_SIZE = int(float(os.environ.get("TB_BENCH_MAX_SIZE", DEFAULT_MAX)))
# 2^24: the size at which the GPU bandwidth target (>= 85% of copy) is stated
ALL_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7, 2**24, 10**8)
SIZES = [n for n in ALL_SIZES if n <= MAX_SIZE]

SCALARS = dict(beta=0.05, lam=0.1, eta_g=0.4, eta_R=0.3, alpha=0.02, eta_f=0.2, radius=1.0)


def moved_elements(n: int) -> int:
    """Minimum elements read + written by one fused step (see the module docstring)."""
    return (14 + 2 + 8) * n


def make_inputs(n: int, dtype=torch.float32, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(n)
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    return dict(y=r(n), v=r(n), h_g=r(n), h_R=r(n), gy=r(6, n), x=r(n), h_f=r(n), gx=r(4, n))


def public_step(backend: str):
    """The fused step through the public API."""
    s = SCALARS

    def step(y, v, h_g, h_R, gy, x, h_f, gx):
        y2, w, hg2, hr2, sq = K.inner_update(
            y, v, h_g, h_R, gy, beta=s["beta"], lam=s["lam"], eta_g=s["eta_g"], eta_R=s["eta_R"],
            backend=backend)
        v2 = K.project_ball(w, sq, s["radius"], backend=backend)
        x2, hf2 = K.outer_update(x, h_f, gx, alpha=s["alpha"], eta_f=s["eta_f"], backend=backend)
        return y2, v2, hg2, hr2, x2, hf2

    return step


def foreach_step():
    """The same step with torch._foreach_* ops over the three sides (float32 storage)."""
    s = SCALARS
    kg, kr, kf = 1.0 - s["eta_g"], 1.0 - s["eta_R"], 1.0 - s["eta_f"]

    def step(y, v, h_g, h_R, gy, x, h_f, gx):
        gy_c, gy_p, hv_c, hv_p, fy_c, fy_p = gy.unbind(0)
        fx_c, fx_p, jv_c, jv_p = gx.unbind(0)
        d = torch._foreach_sub([hv_c, hv_p, fx_c, fx_p], [fy_c, fy_p, jv_c, jv_p])  # eq. (5) R, eq. (3) F
        cur, prev = [gy_c, d[0], d[2]], [gy_p, d[1], d[3]]
        keep = [kg, kr, kf]
        h = torch._foreach_mul([h_g, h_R, h_f], keep)  # eq. (6), (7), (10): cur + (1−η)h − (1−η)prev
        torch._foreach_add_(h, cur)
        torch._foreach_sub_(h, torch._foreach_mul(prev, keep))
        new = torch._foreach_mul(h, [-s["beta"], -s["lam"], -s["alpha"]])  # Alg. 1 lines 4, 5, 7
        torch._foreach_add_(new, [y, v, x])
        y2, w, x2 = new
        norm = torch.linalg.vector_norm(w)
        factor = torch.div(norm.new_full((), s["radius"]), torch.clamp_min(norm, s["radius"]))  # line 6
        return y2, w * factor, h[0], h[1], x2, h[2]

    return step


def variants(dtype=torch.float32):
    """name -> step function, for the variants that run on this machine."""
    out = {"eager": public_step("torch")}
    out["compile"] = torch.compile(public_step("torch"), fullgraph=True, dynamic=False)
    if dtype == torch.float32:
        out["foreach"] = foreach_step()
    if DEVICE.type == "cuda" and K.triton_available():
        out["triton"] = public_step("triton")
    return out


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, min_time=0.5, min_reps=5, warmup=3):
    """Median wall time of fn() in seconds (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def copy_call(n_bytes: int, dtype=torch.float32):
    """A plain copy moving n_bytes (half read, half written)."""
    elems = n_bytes // (2 * torch.finfo(dtype).bits // 8)
    src = torch.randn(elems, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def check_agree(fns, inputs, dtype):
    """All variants must compute the same step before they are timed."""
    ref = fns["eager"](**inputs)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-6, atol=5e-2)
    for name, fn in fns.items():
        for a, b in zip(fn(**inputs), ref):
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{name}: {m}")


def run_table(dtype, sizes):
    itemsize = torch.finfo(dtype).bits // 8
    fns = variants(dtype)
    names = list(fns)
    rows = []
    for n in sizes:
        inputs = make_inputs(n, dtype)
        check_agree(fns, inputs, dtype)
        n_bytes = moved_elements(n) * itemsize
        res = {name: time_call(lambda f=fn: f(**inputs)) for name, fn in fns.items()}
        res["copy"] = time_call(copy_call(n_bytes, dtype))
        rows.append((n, n_bytes, res))
        del inputs
        line = "  ".join(f"{k}={v * 1e3:.3f}ms" for k, v in res.items())
        print(f"# n={_fmt(n)}: {line}", flush=True)
    return names, rows


def _fmt(n: int) -> str:
    for k in range(3, 25):
        if n == 2**k:
            return f"2^{k}"
        if n == 10**k:
            return f"1e{k}"
    return str(n)


def format_table(names, rows):
    cols = names + ["copy"]
    head = "| n | MB moved | " + " | ".join(f"{c} ms" for c in cols) + " | " + " | ".join(f"{c} GB/s" for c in cols)
    head += " | " + " | ".join(f"{c}/copy" for c in names)
    speed = [c for c in ("compile", "foreach", "triton") if c in names]
    head += "".join(f" | eager/{c}" for c in speed) + (" | compile/triton" if "triton" in names else "") + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for n, n_bytes, res in rows:
        gbs = {c: n_bytes / res[c] / 1e9 for c in cols}
        cells = [_fmt(n), f"{n_bytes / 1e6:.2f}"]
        cells += [f"{res[c] * 1e3:.3f}" for c in cols]
        cells += [f"{gbs[c]:.2f}" for c in cols]
        cells += [f"{gbs[c] / gbs['copy']:.2f}" for c in names]
        cells += [f"{res['eager'] / res[c]:.2f}x" for c in speed]
        if "triton" in names:
            cells.append(f"{res['compile'] / res['triton']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--max-size", type=float, default=MAX_SIZE)
    ap.add_argument("--size-offset", type=int, default=0, help="add this to every size (1: odd sizes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sizes = [n + args.size_offset for n in ALL_SIZES if n <= args.max_size]
    print(f"# device={DEVICE} ({torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, dtype={args.dtype}, "
          f"size offset={args.size_offset}, triton available={K.triton_available()}", flush=True)
    names, rows = run_table(dtype, sizes)
    print(format_table(names, rows))


# ---------------------------------------------------------------- pytest-benchmark mode

_CACHE: dict = {}


def _variant(name):
    """The step function of one variant, built once per session."""
    if name == "triton" and not (DEVICE.type == "cuda" and K.triton_available()):
        pytest.skip("the Triton variant needs a CUDA device and triton")
    if name not in _CACHE:
        if name == "foreach":
            _CACHE[name] = foreach_step()
        elif name == "compile":
            _CACHE[name] = torch.compile(public_step("torch"), fullgraph=True, dynamic=False)
        else:
            _CACHE[name] = public_step({"eager": "torch"}.get(name, name))
    return _CACHE[name]


@pytest.mark.parametrize("name", ["eager", "compile", "foreach", "triton", "copy"])
@pytest.mark.parametrize("n", SIZES)
def test_fused_step(benchmark, n, name):
    n_bytes = moved_elements(n) * 4
    if name == "copy":
        fn = copy_call(n_bytes)
    else:
        step, inputs = _variant(name), make_inputs(n)
        fn = lambda: step(**inputs)  # noqa: E731

    def call():
        fn()
        _sync()

    benchmark.extra_info.update(n=n, bytes_moved=n_bytes)
    benchmark.pedantic(call, warmup_rounds=2, rounds=5 if n >= 10**7 else 20, iterations=1)
    benchmark.extra_info["GB/s"] = n_bytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    main()
