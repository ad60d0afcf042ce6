"""FdeHBO on an FSDP2-sharded model against one unsharded process (CPU, gloo).

    python bench/sharded_step.py                  # one process (the reference row)
    torchrun --nproc-per-node 2 bench/sharded_step.py

Model: an MLP (x = the body, y = the head of 2 layers), float32, a batch of 256 split over
the ranks.  Per step: wall time (median of 20 after 3 warm-up steps), collectives by kind
with their bytes (torch.profiler events of the c10d ops), the bytes of the algorithm's
state held by this rank, and the process's peak RSS.  Rank 0 prints one JSON line.
"""
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

import torchbilevel as tb

D_IN, H, BATCH, STEPS, WARM = 64, 512, 256, 20, 3


def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.Tanh(), torch.nn.Linear(H, H), torch.nn.Tanh(),
                              torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, 1))
    return net


def main():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    net = build()
    if world > 1:
        dist.init_process_group("gloo")
        from torch.distributed.fsdp import fully_shard
        for i in (0, 2, 4, 6):
            fully_shard(net[i])
        fully_shard(net)
    gen = torch.Generator().manual_seed(1)
    X, t = torch.randn(BATCH, D_IN, generator=gen), torch.randn(BATCH, 1, generator=gen)
    Xv, tv = torch.randn(BATCH, D_IN, generator=gen), torch.randn(BATCH, 1, generator=gen)
    tr, va = (X[rank::world], t[rank::world]), (Xv[rank::world], tv[rank::world])
    mse = lambda x, y, b: ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean()
    prob = tb.Bilevel(outer=mse, inner=lambda x, y, b: mse(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
    if world > 1:
        prob = tb.distributed.data_parallel(prob)
    x, y = tb.nn.split(net, inner=["4", "6"])
    algo = tb.fdehbo(prob, lr_x=0.01, lr_y=0.05, lr_v=0.05, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    s = algo.init(x, y)
    for _ in range(WARM):
        s = algo.step(s, tr, va)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        s = algo.step(s, tr, va)
        times.append(time.perf_counter() - t0)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        s = algo.step(s, tr, va)
    kinds = {}
    for ev in prof.events():
        name = ev.name.lower().replace("_", "")
        if "c10d" not in name or "wait" in name:
            continue
        for kind in ("allgather", "reducescatter", "allreduce"):
            if kind in name:
                shapes = ev.input_shapes[0] if ev.input_shapes else []
                n = 1
                for d in shapes:
                    n *= d
                k = kinds.setdefault(kind, {"count": 0, "bytes": 0})
                k["count"] += 1
                k["bytes"] += 4 * n
    state_bytes = sum(v.numel() * v.element_size() for v in algo.state_dict(s).values() if isinstance(v, torch.Tensor))
    row = {"world": world, "rank": rank, "step_ms_median": 1e3 * statistics.median(times),
           "collectives_per_step": kinds, "state_bytes_this_rank": state_bytes,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "params_x": sum(v.numel() for v in x.values()), "params_y": sum(v.numel() for v in y.values())}
    if rank == 0:
        print(json.dumps(row))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
