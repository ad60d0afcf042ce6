"""Declared features vs the undeclared form on LeNet hyper-representation (x = LeNet
body, y = linear head, batch 128): cost of ITD(10), PZOBO(N=10, Q=10), AID-CG(10) and one
double-loop step (10 inner steps + AID-CG(10)) in units of one ``grad(g, argnums=(0, 1))``
evaluation of the undeclared problem, both forms in one run, with the largest difference
between their results.

    python bench/features_cost.py [--repeats 10] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.func import grad

sys.path.insert(0, os.path.dirname(__file__))
import lenet_problem  # noqa: E402
from step_cost import timeit  # noqa: E402

import torchbilevel as tb  # noqa: E402


def cases(problem, x, y, ib, ob, device):
    """name -> zero-argument callable returning a dict to compare across the two forms."""
    out = {}
    out["ITD(10) hypergrad"] = lambda: tb.hypergrad(problem, tb.itd(10, 0.01))(x, y, ib, ob)
    out["PZOBO(N=10,Q=10) hypergrad"] = lambda: tb.hypergrad(
        problem, tb.pzobo(10, 0.01, 10, 0.01, generator=torch.Generator(device=device).manual_seed(0)))(x, y, ib, ob)
    out["AID-CG(10) hypergrad"] = lambda: tb.hypergrad(problem, tb.aid(tb.cg(10)))(x, y, ib, ob)
    algo = tb.double_loop(problem, tb.aid(tb.cg(10)), lr_x=0.01, inner_steps=10, lr_y=0.01)
    s0 = algo.init(x, y)
    out["double loop step (10 inner + AID-CG(10))"] = lambda: algo.step(s0, ib, ob).x
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    forms = {d: lenet_problem.make(device=a.device, declared=d) for d in (False, True)}
    problem, x, y, ib, ob = forms[False]
    unit = timeit(lambda: grad(problem.inner, argnums=(0, 1))(x, y, ib), a.repeats, a.device)
    runs = {d: cases(*forms[d], a.device) for d in forms}
    rows = []
    for name in runs[False]:
        res = {d: runs[d][name]() for d in forms}
        diff = max(float((res[True][k] - res[False][k]).abs().max()) for k in res[False])
        scale = max(float(res[False][k].abs().max()) for k in res[False])
        t = {d: timeit(runs[d][name], a.repeats, a.device) for d in forms}
        rows.append({"method": name, "undeclared_units": t[False] / unit, "declared_units": t[True] / unit,
                     "speedup": t[False] / t[True], "max_rel_diff": diff / max(scale, 1e-30)})
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"unit={1e3 * unit:.2f} ms (grad(g, argnums=(0,1)), undeclared)")
    print(f"{'method':44s} {'undeclared':>10s} {'declared':>9s} {'speed-up':>9s} {'max rel diff':>13s}")
    for r in rows:
        print(f"{r['method']:44s} {r['undeclared_units']:10.2f} {r['declared_units']:9.2f} "
              f"{r['speedup']:8.1f}x {r['max_rel_diff']:13.1e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": a.device, "torch": torch.__version__, "unit_s": unit, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
