"""Hypergradient accuracy of each gradient-only method on a model sharded with FSDP2's
MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32), against the same method on
the unsharded model in float64 (CPU, gloo).

    torchrun --nproc-per-node 2 bench/mixed_precision.py

Model: an MLP 32-128-128-1 (x = the two hidden layers, y = the output layer), float32 shards,
``fully_shard`` on each hidden layer and the root with the policy (``--dtype float32``: no
policy, the float32 baseline).  What each row compares (relative error ‖a − b‖/‖b‖ over x):

- first_order, pzobo: the hypergradient ``tb.hypergrad(...)(x, y, ...)`` (PZOBO with one
  seeded generator; it draws its directions in y's dtype, so its reference is the
  unsharded model in float32, which draws the same ones);
- fdehbo: ∇x f − J̃·v, the finite-difference hypergradient at (x, y, v) with v the float64
  AID solution (one step with η = 1 and lr_x = 1 from ``init(x, y, v)`` gives it as
  x − x_new); default δ (refused in bfloat16 compute), and δ = 0.1 / ‖v‖;
- f2sa, bome: their first x step divided by lr_x.

Rank 0 prints one JSON line per method.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

import torchbilevel as tb


def model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                               torch.nn.Linear(128, 1)).to(dtype)


def data(rank, world, dtype):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 32, generator=gen, dtype=torch.float64)
    t = torch.tanh(X[:, :4].sum(1, keepdim=True))
    return X[rank::world].to(dtype), t[rank::world].to(dtype)


def problem(net):
    mse = lambda x, y, b: ((tb.nn.call(net, x, y, b[0]).float() - b[1].float()) ** 2).mean()
    return tb.Bilevel(outer=mse, inner=lambda x, y, b: mse(x, y, b) + 1e-2 * sum((w.float() ** 2).sum()
                                                                                 for w in y.values()))


def estimates(net, batch, v):
    """{method: hypergradient estimate (dict over x, float64 full tensors)}."""
    prob = problem(net)
    x, y = tb.nn.split(net, inner=["4"])
    full = lambda tree: {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double()
                         for k, t in tree.items()}
    out = {"first_order": full(tb.hypergrad(prob, tb.first_order())(x, y, batch, batch)),
           "pzobo": full(tb.hypergrad(prob, tb.pzobo(3, 0.1, directions=8, mu=1e-2,
                                                     generator=torch.Generator().manual_seed(5)))(x, y, batch, batch))}
    like_y = {k: (type(t).from_local(v[k].to(t.dtype)[_rows(t)], t.device_mesh, t.placements, run_check=False)
                  if hasattr(t, "full_tensor") else v[k].to(t.dtype)) for k, t in y.items()}
    vnorm = float(torch.sqrt(sum((t ** 2).sum() for t in v.values())))
    for name, delta in (("fdehbo (default delta)", None), ("fdehbo (delta = 0.1/|v|)", 0.1 / vnorm)):
        algo = tb.fdehbo(prob, lr_x=1.0, lr_y=1e-9, lr_v=1e-9, radius=float("inf"), delta=delta, batched=False)
        s = algo.init(x, y, v=like_y)
        try:
            s2 = algo.step(s, batch, batch)
        except ValueError as err:          # bfloat16 compute with the default delta: refused
            out[name] = str(err).split(":")[0] + ": refused (ValueError)"
            continue
        out[name] = {k: a - b for (k, a), b in zip(full(s.x).items(), full(s2.x).values())}
    for name, algo in (("f2sa", tb.f2sa(prob, lr_x=1e-3, lr_y=0.05, lr_z=0.05)),
                       ("bome", tb.bome(prob, lr_x=1e-3, lr_y=0.05))):
        s = algo.init(x, y)
        s2 = algo.step(s, batch, batch)
        out[name] = {k: (a - b) / 1e-3 for (k, a), b in zip(full(s.x).items(), full(s2.x).values())}
    return out


def _rows(t):
    from torch.distributed.tensor import Shard
    n, r = t.device_mesh.size(), t.device_mesh.get_local_rank()
    rows = t.shape[0]
    chunk = -(-rows // n)
    return slice(min(r * chunk, rows), min(r * chunk + chunk, rows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    a = ap.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    # the float64 reference, one process, full batch (every rank computes it)
    ref_net = model(torch.float64)
    full_batch = data(0, 1, torch.float64)
    prob = problem(ref_net)
    xr, yr = tb.nn.split(ref_net, inner=["4"])
    _, aux = tb.hypergrad(prob, tb.aid(tb.cg(steps=100)), has_aux=True)(xr, yr, full_batch, full_batch)
    v = {k: t.detach() for k, t in aux.v.items()}
    ref = estimates(ref_net, full_batch, v)
    # PZOBO draws its directions in y's dtype: its reference is the float32 unsharded model
    # (float32 sharded = unsharded at 1e-6: tests/test_sharded.py)
    ref["pzobo"] = estimates(model(torch.float32), data(0, 1, torch.float32), v)["pzobo"]
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {} if a.dtype == "float32" else {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                          reduce_dtype=torch.float32)}
    net = model(torch.float32)
    fully_shard(net[0], **kw)
    fully_shard(net[2], **kw)
    fully_shard(net, **kw)
    got = estimates(net, data(rank, world, torch.float32), v)
    if rank == 0:
        for name, r in ref.items():
            if isinstance(got[name], str):
                print(json.dumps({"compute": a.dtype, "world": world, "method": name, "rel_error": got[name]}))
                continue
            num = sum(float(((got[name][k] - r[k]) ** 2).sum()) for k in r) ** 0.5
            den = sum(float((r[k] ** 2).sum()) for k in r) ** 0.5
            print(json.dumps({"compute": a.dtype, "world": world, "method": name, "rel_error": num / den}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
