"""Cost of one step / one hypergradient in units of one ``grad(g, argnums=(0, 1))`` evaluation,
on LeNet hyper-representation (batch 128).  Prints a table; ``--json PATH`` writes it.

    python bench/step_cost.py [--device cuda] [--repeats 20] [--threads 1] [--memory] [--json out.json]

Peak memory: on CUDA from torch.cuda.max_memory_allocated; on CPU (``--memory``) the peak
bytes of tensors created during one call (bench/peak_memory.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.func import grad

sys.path.insert(0, os.path.dirname(__file__))
import lenet_problem  # noqa: E402
from peak_memory import peak_tensor_bytes  # noqa: E402

import torchbilevel as tb  # noqa: E402


def timeit(fn, repeats, device):
    # CPU: process CPU time (robust to other processes on a shared machine; with one
    # torch thread it equals the compute time); CUDA: wall time after synchronising.
    clock = time.perf_counter if device == "cuda" else time.process_time
    fn()  # warm-up
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]  # median


def methods(problem, x, y, device):
    """name -> zero-argument callable doing one step / one hypergradient."""
    common = dict(lr_x=0.01, lr_y=0.01, lr_v=0.01, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    out = {}
    for name, algo in (("FdeHBO step (default)", tb.fdehbo(problem, **common)),
                       ("FdeHBO step (batched ±)", tb.fdehbo(problem, batched=True, **common)),
                       ("FdeHBO step (two evaluations)", tb.fdehbo(problem, batched=False, **common)),
                       ("FMBO step", tb.fmbo(problem, **common))):
        state = algo.init(x, y)

        def run(algo=algo, box=[state]):
            # keep the state one step in (t >= 1: previous-iterate evaluations included)
            box[0] = algo.step(box[0] if box[0].step > 0 else algo.step(box[0], ib, ob), ib, ob)
        out[name] = run
    # the parts a single-loop step is made of, on flat buffers as single_loop uses them
    from torchbilevel import tree as T
    from torchbilevel.derivatives import exact_products, fd_products, gradient
    xf, lx = T.ravel(x)
    yf, ly = T.ravel(y)
    vf = 0.1 * torch.randn_like(yf)
    g = lambda a, b, bt: problem.inner(lx.unravel(a), ly.unravel(b), bt)
    f = lambda a, b, bt: problem.outer(lx.unravel(a), ly.unravel(b), bt)
    out["part: FD ± pair, vmapped (eq. 9, 11)"] = lambda: fd_products(g, xf, yf, vf, ib, delta=0.01)
    out["part: FD ± pair, two autograd forwards"] = lambda: fd_products(g, xf, yf, vf, ib, delta=0.01,
                                                                      batched=False)
    out["part: exact HVP+JVP, one backward"] = lambda: exact_products(g, xf, yf, vf, ib)
    out["part: grad_y g"] = lambda: gradient(g, xf, yf, ib, argnums=1)
    out["part: grad f (x and y)"] = lambda: gradient(f, xf, yf, ob)
    for mode in ("autograd", "func"):
        hg = tb.hypergrad(problem, tb.aid(tb.cg(10), mode=mode))
        out[f"AID-CG(10) hypergrad [{mode}]"] = (lambda hg=hg: hg(x, y, ib, ob))
    hg = tb.hypergrad(problem, tb.stocbio(10, 0.01))
    out["stocBiO(Q=10) hypergrad"] = lambda hg=hg: hg(x, y, ib, ob)
    hg = tb.hypergrad(problem, tb.itd(10, 0.01))
    out["ITD(10) hypergrad"] = lambda hg=hg: hg(x, y, ib, ob)
    for vec in (True, False):
        hg = tb.hypergrad(problem, tb.pzobo(10, 0.01, 10, 0.01, vectorize=vec,
                                            generator=torch.Generator(device=device).manual_seed(0)))
        out[f"PZOBO(N=10,Q=10) hypergrad [vmap={vec}]"] = (lambda hg=hg: hg(x, y, ib, ob))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per method")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    global ib, ob
    problem, x, y, ib, ob = lenet_problem.make(device=a.device)
    unit = timeit(lambda: grad(problem.inner, argnums=(0, 1))(x, y, ib), a.repeats, a.device)
    rows = [{"method": "grad(g, argnums=(0,1))", "seconds": unit, "units": 1.0}]
    for name, fn in methods(problem, x, y, a.device).items():
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = timeit(fn, a.repeats, a.device)
        row = {"method": name, "seconds": s, "units": s / unit}
        if a.device == "cuda":
            row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        elif a.memory:
            row["peak_MiB"] = peak_tensor_bytes(fn) / 2**20
        rows.append(row)
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'method':42s} {'ms':>9s} {'units':>7s} {'peak MiB':>9s}")
    for r in rows:
        pm = f"{r['peak_MiB']:9.1f}" if "peak_MiB" in r else f"{'':9s}"
        print(f"{r['method']:42s} {1e3 * r['seconds']:9.2f} {r['units']:7.2f} {pm}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": a.device, "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
