"""Peak memory of an ITD hypergradient against the unroll length, with and without
``tb.itd(..., checkpoint=True)``, on an MLP problem (CPU).

Each configuration runs in a fresh subprocess (no allocator state shared between them) and
reports two measures of the same call:

- ``tensor peak``: the highest "Total Allocated" of PyTorch's CPU allocator seen by
  ``torch.profiler`` (``profile_memory=True``) during the call, minus the allocation before
  it — the bytes of live tensors, which is what checkpointing changes;
- ``RSS growth``: ``ru_maxrss`` after the call minus ``ru_maxrss`` before it (process view,
  includes allocator caching and fragmentation; a cross-check).

Problem: x = the 2-layer MLP body (64 -> 128 -> 128, tanh), y = a linear head (128 -> 10),
g = cross-entropy on 512 training samples + ridge on the head, f = cross-entropy on 512
validation samples, float32, one thread.

    python bench/bench_itd_memory.py                 # the table of bench/RESULTS-reliability.md
    python bench/bench_itd_memory.py --steps 10 50 200 400
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def build(torch, tb, n=512, d_in=64, hidden=128, classes=10):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d_in, generator=gen)
    Xv = torch.randn(n, d_in, generator=gen)
    lab = torch.randint(classes, (n,), generator=gen)
    labv = torch.randint(classes, (n,), generator=gen)

    def body(x, X):
        return torch.tanh(torch.tanh(X @ x["W1"] + x["b1"]) @ x["W2"] + x["b2"])

    def inner(x, y, batch):
        X, lab = batch
        logits = body(x, X) @ y["A"] + y["c"]
        return torch.nn.functional.cross_entropy(logits, lab) + 1e-2 * (y["A"] ** 2).sum()

    def outer(x, y, batch):
        X, lab = batch
        return torch.nn.functional.cross_entropy(body(x, X) @ y["A"] + y["c"], lab)

    x = {"W1": torch.randn(d_in, hidden, generator=gen) / d_in ** 0.5, "b1": torch.zeros(hidden),
         "W2": torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5, "b2": torch.zeros(hidden)}
    y = {"A": torch.zeros(hidden, classes), "c": torch.zeros(classes)}
    return tb.Bilevel(outer=outer, inner=inner), x, y, (X, lab), (Xv, labv)


def peak_allocated(trace_path: str) -> int:
    """Highest CPU 'Total Allocated' among the profiler's memory events."""
    with open(trace_path) as fh:
        events = json.load(fh)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals) if totals else 0


def child(steps: int, checkpoint: bool) -> dict:
    import torch
    import torchbilevel as tb
    torch.set_num_threads(1)
    problem, x, y, tr, va = build(torch, tb)
    hg = tb.hypergrad(problem, tb.itd(steps, 0.1, checkpoint=checkpoint))
    hg(x, y, tr, va) if steps <= 10 else tb.hypergrad(problem, tb.itd(2, 0.1, checkpoint=checkpoint))(x, y, tr, va)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    dx = hg(x, y, tr, va)                                     # timed and RSS-measured, no profiler
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        base = torch.zeros(1)                                 # an event marking the baseline
        dx2 = hg(x, y, tr, va)
        del base
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e for e in json.load(fh)["traceEvents"]
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    events.sort(key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"] if events else 0
    peak = max(e["args"]["Total Allocated"] for e in events) - start if events else 0
    same = all(torch.equal(dx[k], dx2[k]) for k in dx)
    return {"steps": steps, "checkpoint": checkpoint, "tensor_peak_mb": peak / 2 ** 20,
            "rss_growth_mb": (rss1 - rss0) / 2 ** 20, "seconds": wall, "repeatable": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--child", nargs=2, metavar=("STEPS", "CHECKPOINT"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1] == "1")))
        return
    import torch
    print(f"torch {torch.__version__}, CPU, 1 thread, float32; MLP body 64-128-128 (x), linear head 128-10 (y), "
          f"512 samples per batch")
    print("| unroll steps | checkpoint | tensor peak (MiB) | RSS growth (MiB) | time (s) |")
    print("|---|---|---|---|---|")
    for steps in args.steps:
        for ck in (False, True):
            out = subprocess.run([sys.executable, __file__, "--child", str(steps), "1" if ck else "0"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {steps} | {'yes' if ck else 'no'} | {r['tensor_peak_mb']:.1f} | {r['rss_growth_mb']:.1f} | "
                  f"{r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
