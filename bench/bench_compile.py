"""Compiled vs eager time of an AID hypergradient and of an FdeHBO step (CPU).

Problem: x = a 2-layer MLP body (32 -> 64 -> 64, tanh), y = a linear head (64 -> 10),
g = cross-entropy on 256 training samples + ridge on the head, f = cross-entropy on 256
validation samples; float32; one thread.

Rows:
- eager, as shipped: ``check_finite=True`` (one host read per call); FdeHBO with its
  default δ_t (a device tensor: no host read);
- eager, sync-free: ``check_finite=False``;
- compiled: ``torch.compile(fn, fullgraph=True)`` (inductor, mode default) of the sync-free
  call — one graph, no host read;
- compiled with guards: ``torch.compile(fn)`` of the call as shipped (a graph break at the
  host read of the finite check).

Times are medians over ``--repeats`` calls after warm-up (compilation excluded, reported
separately), with the interquartile range.

    python bench/bench_compile.py            # the table of bench/RESULTS-reliability.md
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import torchbilevel as tb


def build(n=256, d_in=32, hidden=64, classes=10):
    gen = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(n, d_in, generator=gen), torch.randn(n, d_in, generator=gen)
    lab, labv = torch.randint(classes, (n,), generator=gen), torch.randint(classes, (n,), generator=gen)

    def body(x, X):
        return torch.tanh(torch.tanh(X @ x["W1"] + x["b1"]) @ x["W2"] + x["b2"])

    def inner(x, y, batch):
        X, lab = batch
        return torch.nn.functional.cross_entropy(body(x, X) @ y["A"] + y["c"], lab) + 1e-2 * (y["A"] ** 2).sum()

    def outer(x, y, batch):
        X, lab = batch
        return torch.nn.functional.cross_entropy(body(x, X) @ y["A"] + y["c"], lab)

    x = {"W1": torch.randn(d_in, hidden, generator=gen) / d_in ** 0.5, "b1": torch.zeros(hidden),
         "W2": torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5, "b2": torch.zeros(hidden)}
    y = {"A": 0.1 * torch.randn(hidden, classes, generator=gen), "c": torch.zeros(classes)}
    return tb.Bilevel(outer=outer, inner=inner), x, y, (X, lab), (Xv, labv)


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    q = statistics.quantiles(out, n=4)
    return statistics.median(out), q[2] - q[0], min(out)


def bench_aid(problem, x, y, tr, va, repeats):
    rows = []
    for label, check, compile_kw in (("eager, check_finite=True", True, None),
                                     ("eager, check_finite=False", False, None),
                                     ("compiled fullgraph, check_finite=False", False, dict(fullgraph=True)),
                                     ("compiled, check_finite=True (graph break)", True, dict())):
        torch._dynamo.reset()
        hg = tb.hypergrad(problem, tb.aid(tb.cg(steps=10)), check_finite=check)
        fn = hg if compile_kw is None else torch.compile(hg, **compile_kw)
        t0 = time.perf_counter()
        ref = fn(x, y, tr, va)
        first = time.perf_counter() - t0
        for _ in range(3):
            fn(x, y, tr, va)
        med, iqr, best = timed(lambda: fn(x, y, tr, va), repeats)
        rows.append((f"AID-CG(10) hypergradient, {label}", med, iqr, best, first, ref))
    base = rows[0][5]
    dev = max(max((r[5][k] - base[k]).abs().max().item() for k in base) for r in rows)
    return rows, dev


def bench_fdehbo(problem, x, y, tr, va, repeats):
    rows, finals = [], []
    hyper = dict(lr_x=0.05, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    for label, kw, compile_kw in (("eager, as shipped (check_finite=True)", {}, None),
                                  ("eager, check_finite=False", dict(check_finite=False), None),
                                  ("compiled fullgraph, check_finite=False", dict(check_finite=False),
                                   dict(fullgraph=True)),
                                  ("compiled, as shipped (one graph break at the check)", {}, dict())):
        torch._dynamo.reset()
        algo = tb.fdehbo(problem, **hyper, **kw)
        step = algo.step if compile_kw is None else torch.compile(algo.step, **compile_kw)
        s = algo.init(x, y)
        t0 = time.perf_counter()
        for _ in range(3):                     # t = 0, 1, 2: every graph the run needs
            s = step(s, tr, va)
        first = time.perf_counter() - t0
        box = [s]

        def one():
            box[0] = step(box[0], tr, va)
        med, iqr, best = timed(one, repeats)
        rows.append((f"FdeHBO step, {label}", med, iqr, best, first, None))
        finals.append(box[0].xf)
    return rows, finals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm-cache", action="store_true",
                    help="let inductor reuse its on-disk FX graph cache (default: off, so the first-call "
                         "column shows the full compile time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.warm_cache:
        torch._inductor.config.fx_graph_cache = False
    problem, x, y, tr, va = build()
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), float32; MLP body 32-64-64 (x), "
          f"head 64-10 (y), 256 samples; median of {args.repeats}")
    aid_rows, dev = bench_aid(problem, x, y, tr, va, args.repeats)
    fd_rows, _ = bench_fdehbo(problem, x, y, tr, va, args.repeats)
    print("| call | median (ms) | IQR (ms) | min (ms) | first calls incl. compile (s) |")
    print("|---|---|---|---|---|")
    for name, med, iqr, best, first, _ in aid_rows + fd_rows:
        print(f"| {name} | {med * 1e3:.2f} | {iqr * 1e3:.2f} | {best * 1e3:.2f} | {first:.1f} |")
    print(f"AID: max |compiled − eager| over the hypergradient entries: {dev:.1e}")


if __name__ == "__main__":
    main()
