"""Peak resident memory per process of a first-order hypergradient and an FdeHBO step on an
FSDP2-sharded MLP, against one unsharded process (CPU, gloo).

    python bench/memory_scale.py --method first_order          # one process
    torchrun --nproc-per-node 2 bench/memory_scale.py --method fdehbo [--donate]
    python bench/memory_scale.py --method f2sa --donate        # fdehbo, f2sa, bome: three steps

Model: 10 blocks Linear(W, W) + tanh (x, the body) and a head Linear(W, 1000) (y), float32,
built on the meta device; with more than one rank, ``fully_shard`` on every block and on
the root (which owns the head).  A batch of 64 (1/N per rank), cross-entropy, a ridge term on
y in g.  What is measured (one process per row, since the high-water mark only grows): the
peak RSS of the process (``ru_maxrss``) minus its RSS before the parameters existed, with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``, set by this script before
torch loads) so that every freed tensor buffer goes back to the system at once and RSS follows
the live tensors.  Rank 0 prints one JSON line: parameter bytes (global), the bytes this
rank holds as parameters and state, and the peak.
"""
import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":        # before torch allocates anything
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import argparse      # noqa: E402
import json          # noqa: E402
import resource      # noqa: E402

import torch         # noqa: E402
import torch.distributed as dist    # noqa: E402
import torch.nn.functional as F     # noqa: E402

import torchbilevel as tb           # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def build(width, blocks, classes):
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def run(a, world, rank, width, blocks, classes, base_fn):
    """Build, shard and initialise the model, then one call of the method; (peak MB over the
    RSS before the parameters existed, parameter bytes held here, state bytes, parameters)."""
    with torch.device("meta"):
        net = build(width, blocks, classes)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for m in net:
            if isinstance(m, torch.nn.Linear) and m is not net[-1]:
                fully_shard(m)
        fully_shard(net)
    base = base_fn()
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(a.batch, width, generator=gen)
    t = torch.randint(0, classes, (a.batch,), generator=gen)
    batch = (X[rank::world], t[rank::world])
    ce = lambda x, y, b: F.cross_entropy(tb.nn.call(net, x, y, b[0]), b[1])
    prob = tb.Bilevel(outer=ce, inner=lambda x, y, b: ce(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
    x, y = tb.nn.split(net, inner=[str(len(net) - 1)])
    local = lambda tree: sum((v.to_local() if hasattr(v, "to_local") else v).numel() * 4 for v in tree.values())
    held = local(x) + local(y)
    if a.method == "first_order":
        out = tb.hypergrad(prob, tb.first_order())(x, y, batch, batch)
        del out
        state_bytes = 0
    else:
        algo = {"fdehbo": lambda: tb.fdehbo(prob, lr_x=0.01, lr_y=0.05, lr_v=0.05, eta_x=0.5, eta_y=0.5, eta_v=0.5,
                                            radius=10.0),
                "f2sa": lambda: tb.f2sa(prob, lr_x=0.01, lr_y=0.05, lr_z=0.05, inner_steps=1),
                "bome": lambda: tb.bome(prob, lr_x=0.01, lr_y=0.05, inner_steps=1)}[a.method]()
        s = algo.init(x, y)
        for _ in range(3):            # the second step evaluates the previous iterate too
            s = algo.step(s, batch, batch, donate=a.donate)
        # the state as it stands after the steps (after init, FdeHBO's previous iterate is the
        # iterate itself): distinct storages once
        state_bytes = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                           for v in algo.state_dict(s).values() if isinstance(v, torch.Tensor)}.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return peak, held, state_bytes, sum(p.numel() for p in net.parameters()), base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["first_order", "fdehbo", "f2sa", "bome"], required=True)
    ap.add_argument("--donate", action="store_true", help="step(..., donate=True) (the algorithms)")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    # warm-up on a small model: lazily loaded kernels, threads and gloo buffers are not the method's
    run(a, world, rank, 64, 2, 10, rss_mb)
    peak, held, state_bytes, n_params, base = run(a, world, rank, a.width, a.blocks, a.classes, rss_mb)
    row = {"world": world, "method": a.method, "donate": a.donate, "params_mb_global": n_params * 4 / 2 ** 20,
           "params_mb_this_rank": held / 2 ** 20, "state_mb_this_rank": state_bytes / 2 ** 20,
           "peak_mb_over_base": peak, "rss_base_mb": base}
    rows = [row]
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
    if rank == 0:
        print(json.dumps({"max_over_ranks_peak_mb": max(r["peak_mb_over_base"] for r in rows), **row}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
