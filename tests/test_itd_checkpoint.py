"""tb.itd(steps, lr, checkpoint=True): the same hypergradient as the stored unroll (to 1e-10
in float64), under every batching mode, vmap and data-parallel shapes, with a peak tensor
memory that no longer grows with the unroll length."""
import itertools
import json
import os

import pytest
import torch
from torch.func import vmap

import torchbilevel as tb

DT = torch.float64


def mlp_problem(n=30, d_in=4, hidden=5, out=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen, dtype=DT)
    T = torch.randn(n, out, generator=gen, dtype=DT)

    def inner(x, y, batch):
        Xb, Tb = batch
        h = torch.tanh(Xb @ x["W"])                                  # x: the body, y: the head
        return ((h @ y["A"] + y["c"] - Tb) ** 2).mean() + torch.exp(x["r"]) * (y["A"] ** 2).sum()

    def outer(x, y, batch):
        Xb, Tb = batch
        return ((torch.tanh(Xb @ x["W"]) @ y["A"] + y["c"] - Tb) ** 2).mean() + 0.01 * (x["W"] ** 2).sum()

    x = {"W": torch.randn(d_in, hidden, generator=gen, dtype=DT), "r": torch.tensor(-1.0, dtype=DT)}
    y = {"A": torch.randn(hidden, out, generator=gen, dtype=DT), "c": torch.randn(out, generator=gen, dtype=DT)}
    return tb.Bilevel(outer=outer, inner=inner), x, y, (X, T)


def close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert (a[k] - b[k]).abs().max().item() <= tol, (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("steps", [1, 7, 25])
def test_equals_the_stored_unroll(steps):
    prob, x, y, batch = mlp_problem()
    a, aux_a = tb.hypergrad(prob, tb.itd(steps, 0.1), has_aux=True)(x, y, batch, batch)
    b, aux_b = tb.hypergrad(prob, tb.itd(steps, 0.1, checkpoint=True), has_aux=True)(x, y, batch, batch)
    close(a, b)
    close(aux_a.y, aux_b.y)
    assert abs(aux_a.outer_loss.item() - aux_b.outer_loss.item()) <= 1e-12


def test_equals_with_minibatch_iterators_and_unused_parameters():
    prob, x, y, (X, T) = mlp_problem()
    y = dict(y, unused=torch.ones(2, dtype=DT))                       # a y entry g never reads
    stream = lambda: (tuple(t[i:i + 10] for t in (X, T)) for i in itertools.cycle([0, 10, 20]))
    a = tb.hypergrad(prob, tb.itd(6, 0.1))(x, y, stream(), (X, T))
    b = tb.hypergrad(prob, tb.itd(6, 0.1, checkpoint=True))(x, y, stream(), (X, T))
    close(a, b)


def test_equals_under_vmap_over_tasks():
    prob, x, y, batch = mlp_problem()
    xs = {k: torch.stack([t, 0.9 * t, 1.1 * t]) for k, t in x.items()}
    ys = {k: torch.stack([t, -t, 0.5 * t]) for k, t in y.items()}
    hg = lambda est: vmap(lambda xx, yy: tb.hypergrad(prob, est)(xx, yy, batch, batch))(xs, ys)
    close(hg(tb.itd(5, 0.1)), hg(tb.itd(5, 0.1, checkpoint=True)))


def test_double_loop_trajectory_matches():
    prob, x, y, batch = mlp_problem()
    runs = []
    for ck in (False, True):
        algo = tb.double_loop(prob, tb.itd(5, 0.1, checkpoint=ck), lr_x=0.05, inner_steps=0, outer="adam")
        s = algo.init(x, y)
        for _ in range(4):
            s = algo.step(s, batch, batch)
        runs.append(s)
    close(runs[0].x, runs[1].x)
    close(runs[0].y, runs[1].y)


def peak_tensor_bytes(fn):
    """Highest growth of PyTorch's CPU 'Total Allocated' during fn() (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"itd_trace_{os.getpid()}.json")
    prof.export_chrome_trace(path)
    try:
        with open(path) as fh:
            ev = [e["args"] for e in json.load(fh)["traceEvents"]
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    finally:
        os.remove(path)
    return max(e["Total Allocated"] for e in ev) - (ev[0]["Total Allocated"] - ev[0]["Bytes"])


def test_peak_memory_does_not_grow_with_the_unroll():
    prob, x, y, _ = mlp_problem()
    gen = torch.Generator().manual_seed(1)
    big = (torch.randn(256, 4, generator=gen, dtype=DT), torch.randn(256, 3, generator=gen, dtype=DT))
    x = dict(x, W=torch.randn(4, 64, generator=gen, dtype=DT))        # wide body: activations dominate
    y = {"A": torch.zeros(64, 3, dtype=DT), "c": torch.zeros(3, dtype=DT)}
    peak = {(n, ck): peak_tensor_bytes(lambda: tb.hypergrad(prob, tb.itd(n, 0.05, checkpoint=ck))(x, y, big, big))
            for n in (4, 24) for ck in (False, True)}
    assert peak[(24, False)] > 3 * peak[(4, False)]                   # the stored unroll grows ~linearly
    assert peak[(24, True)] < 1.5 * peak[(4, True)]                   # checkpointed: flat
    assert peak[(24, True)] < peak[(24, False)] / 4
