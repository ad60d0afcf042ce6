"""Rows for bench/gpu.py's "scale" section (also runnable alone: ``python bench/scale_rows.py``).

* SDPA: an exact hypergradient (AID-CG, 5 steps; attention on the math backend, forced by
  the library inside second-order evaluations) against an FdeHBO step (gradients only, the
  default flash / memory-efficient kernels) on a small transformer: body x, head y.
* FSDP2 at world size 1: the same FdeHBO step with the model under ``fully_shard`` (a
  1-process group) against the plain model: the machinery's own cost (gathers, hooks
  bypassed, the mean over ranks) when there is nothing to communicate.

Each row: median milliseconds and (on CUDA) peak MiB.  Dry runs use tiny sizes on CPU.
"""
import os
import statistics
import tempfile
import time

import torch

import torchbilevel as tb


class Net(torch.nn.Module):
    def __init__(self, d, heads, layers):
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0,
                                                                           batch_first=True) for _ in range(layers)])
        self.head = torch.nn.Linear(d, 1)

    def forward(self, X):
        return self.head(self.body(X)).squeeze(-1)


def _sizes(dry):
    return dict(d=16, heads=2, layers=1, batch=4, length=8) if dry else dict(d=256, heads=4, layers=2, batch=16,
                                                                          length=256)


def _problem(net, device, dry):
    z = _sizes(dry)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(z["batch"], z["length"], z["d"], generator=gen).to(device)
    t = torch.randn(z["batch"], z["length"], generator=gen).to(device)
    loss = lambda x, y, b: ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean()
    prob = tb.Bilevel(outer=loss, inner=lambda x, y, b: loss(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
    x, y = tb.nn.split(net, inner=["head"])
    return prob, x, y, (X, t)


def _time(fn, reps, device, deadline):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if time.monotonic() > deadline:
            break
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    return {"ms": 1e3 * statistics.median(times) if times else None, "reps": len(times), "peak_MiB": peak}


def _fdehbo_step(prob, x, y, b):
    algo = tb.fdehbo(prob, lr_x=1e-3, lr_y=1e-2, lr_v=1e-2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0,
                     check_finite=False)
    s = [algo.init(x, y)]

    def step():
        s[0] = algo.step(s[0], b, b)
    return step


def rows(device, dry, deadline):
    """{row name: {"ms", "reps", "peak_MiB"}} (errors recorded per row)."""
    import warnings
    reps = 2 if dry else 10
    out = {}
    torch.manual_seed(0)
    z = _sizes(dry)
    net = Net(z["d"], z["heads"], z["layers"]).to(device)
    prob, x, y, b = _problem(net, device, dry)
    hg = tb.hypergrad(prob, tb.aid(tb.cg(5)), check_finite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (("sdpa: AID-CG(5) hypergradient (math backend)", lambda: hg(x, y, b, b)),
                         ("sdpa: FdeHBO step (default kernels)", _fdehbo_step(prob, x, y, b))):
            try:
                out[name] = _time(fn, reps, device, deadline)
            except Exception as e:  # noqa: BLE001
                out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    # FSDP2 at world size 1
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    with tempfile.TemporaryDirectory() as tmp:
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{os.path.join(tmp, 'rdv')}",
                                    rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            sharded = Net(z["d"], z["heads"], z["layers"]).to(device)
            for layer in sharded.body:
                fully_shard(layer)
            fully_shard(sharded)
            prob_s, xs, ys, bs = _problem(sharded, device, dry)
            for name, fn in (("fsdp world 1: FdeHBO step, sharded", _fdehbo_step(prob_s, xs, ys, bs)),
                             ("fsdp world 1: FdeHBO step, plain", _fdehbo_step(prob, x, y, b))):
                try:
                    out[name] = _time(fn, reps, device, deadline)
                except Exception as e:  # noqa: BLE001
                    out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            if started:
                dist.destroy_process_group()
    return out


if __name__ == "__main__":
    import json
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(rows(dev, dev == "cpu", time.monotonic() + 300), indent=1))
