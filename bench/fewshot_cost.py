"""Meta-gradient cost of ``tb.over_tasks`` (loop and vmap modes) against hand-written
plain PyTorch (a per-task autograd loop) and a hand-written ``torch.func`` vmap version:
CNN4 body (width 32 unless --width), 5-way 5-shot, 15 queries per class, 16 tasks,
ITD(10) on a linear head from 0 (ANIL), train-mode BatchNorm (per-task statistics).

    python bench/fewshot_cost.py [--repeats 5] [--threads 1] [--device cpu] [--json out.json]

Time: median over interleaved rounds of process CPU time on CPU (robust to other processes on a shared
machine), wall time after synchronising on CUDA.  Also prints the relative
difference ‖d − d_loop‖/‖d_loop‖ of each meta-gradient from the hand-written loop (float32).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

sys.path.insert(0, os.path.dirname(__file__))

import torchbilevel as tb  # noqa: E402
from torchbilevel.experiments.fewshot import CNN4, anil_problem  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, STEPS, LR, REG = 5, 5, 15, 16, 10, 0.5, 1e-2


def timeit(fn, repeats, device, warmup=True):
    """Median seconds of ``fn()``: process CPU time on CPU, wall time after synchronising on CUDA."""
    import time
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    if warmup:
        fn()
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(clock() - t0)
    return sorted(out)[len(out) // 2]


def setup(width, device, tasks=TASKS, seed=0):
    """Model, body parameters x, per-task zero heads, support and query meta-batches."""
    torch.manual_seed(seed)
    model = CNN4(width, WAYS).to(device).train()
    x, y = tb.nn.split(model, inner=["head"])
    ys = {k: torch.zeros(tasks, *v.shape, device=device) for k, v in y.items()}
    lab = lambda k: torch.arange(WAYS, device=device).repeat_interleave(k).expand(tasks, -1).contiguous()
    support = (torch.rand(tasks, WAYS * SHOTS, 1, 28, 28, device=device), lab(SHOTS))
    query = (torch.rand(tasks, WAYS * QUERIES, 1, 28, 28, device=device), lab(QUERIES))
    return model, dict(x), ys, support, query


def head_loss(z, w, b, labels, reg):
    return F.cross_entropy(z @ w.T + b, labels) + (0.5 * reg * ((w * w).sum() + (b * b).sum()) if reg else 0.0)


def plain_loop(model, x, support, query):
    """Hand-written plain PyTorch: per task, body forward on both sets, 10 head GD steps with
    create_graph, query loss, autograd.grad into the body; the mean over tasks."""
    body = model.body
    params = [p for _, p in body.named_parameters()]
    names = [f"body.{n}" for n, _ in body.named_parameters()]
    total = None
    n = support[0].shape[0]
    for i in range(n):
        zs, zq = body(support[0][i]), body(query[0][i])
        w = torch.zeros(WAYS, zs.shape[1], device=zs.device, requires_grad=True)
        b = torch.zeros(WAYS, device=zs.device, requires_grad=True)
        for _ in range(STEPS):
            gw, gb = torch.autograd.grad(head_loss(zs, w, b, support[1][i], REG), (w, b), create_graph=True)
            w, b = w - LR * gw, b - LR * gb
        gs = torch.autograd.grad(head_loss(zq, w, b, query[1][i], 0.0), params)
        total = list(gs) if total is None else [t + g for t, g in zip(total, gs)]
    return {k: t / n for k, t in zip(names, total)}


def func_vmap(model):
    """Hand-written torch.func: grad of the per-task query loss after 10 head steps (each a
    torch.func.grad), vmapped over tasks; BatchNorm without running statistics."""
    body = copy.deepcopy(model.body)
    replace_all_batch_norm_modules_(body)

    def task_loss(params, xs, ls, xq, lq):
        zs, zq = functional_call(body, params, (xs,)), functional_call(body, params, (xq,))
        w = torch.zeros(WAYS, zs.shape[1], device=zs.device, dtype=zs.dtype)
        b = torch.zeros(WAYS, device=zs.device, dtype=zs.dtype)
        for _ in range(STEPS):
            gw, gb = grad(lambda w, b: head_loss(zs, w, b, ls, REG), argnums=(0, 1))(w, b)
            w, b = w - LR * gw, b - LR * gb
        return head_loss(zq, w, b, lq, 0.0)

    per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")

    def meta(x, support, query):
        params = {k[len("body."):]: v for k, v in x.items()}
        g = per_task(params, support[0], support[1], query[0], query[1])
        return {f"body.{k}": v.mean(0) for k, v in g.items()}
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=TASKS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, x, ys, support, query = setup(a.width, a.device, a.tasks)
    hg = tb.hypergrad(anil_problem(model, REG), tb.itd(STEPS, LR))
    hand_vmap = func_vmap(model)
    cases = {
        "hand-written loop (autograd)": lambda: plain_loop(model, x, support, query),
        "hand-written torch.func vmap": lambda: hand_vmap(x, support, query),
        "over_tasks loop": lambda: tb.over_tasks(hg, "loop")(x, ys, support, query),
        "over_tasks vmap": lambda: tb.over_tasks(hg, "vmap")(x, ys, support, query),
        "over_tasks auto": lambda: tb.over_tasks(hg, "auto")(x, ys, support, query),
    }
    ref = cases["hand-written loop (autograd)"]()
    diffs = {}
    for name, fn in cases.items():
        out = fn()
        fn()                           # warm-up
        # relative to the whole gradient (the conv biases' gradients are ~0 in exact
        # arithmetic: BatchNorm removes a per-channel constant)
        diffs[name] = float(tb.tree.norm(tb.tree.sub(out, ref)) / tb.tree.norm(ref))
    # interleaved rounds (each round times every case once), medians: drift in the load of
    # the shared machine hits every case alike
    times = {name: [] for name in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            times[name].append(timeit(fn, 1, a.device, warmup=False))
    rows = [{"case": name, "seconds": sorted(t)[len(t) // 2], "max_rel_diff": diffs[name]}
            for name, t in times.items()]
    base = {r["case"]: r["seconds"] for r in rows}
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()} width={a.width} "
          f"tasks={a.tasks} {WAYS}-way {SHOTS}-shot {QUERIES} queries ITD({STEPS}) on the head")
    print(f"{'case':32s} {'ms':>9s} {'/hand loop':>10s} {'/hand vmap':>10s} {'rel diff':>9s}")
    for r in rows:
        r["vs_hand_loop"] = r["seconds"] / base["hand-written loop (autograd)"]
        r["vs_hand_vmap"] = r["seconds"] / base["hand-written torch.func vmap"]
        print(f"{r['case']:32s} {1e3 * r['seconds']:9.1f} {r['vs_hand_loop']:10.2f} {r['vs_hand_vmap']:10.2f} "
              f"{r['max_rel_diff']:9.1e}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"device": a.device, "width": a.width, "tasks": a.tasks, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
