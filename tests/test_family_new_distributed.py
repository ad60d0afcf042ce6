"""SABA, SRBA, AmIGO, TTSA, FSLA and VRBO data parallel: 2 processes (gloo, CPU), each
holding half of every minibatch, reproduce the one-process run on whole minibatches
(the scenarios and data of tests/test_distributed.py, one spawn for all six)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

import torchbilevel as tb
from spawning import spawn
from test_distributed import BS, N, TOL, WORLD, data, inner, outer, start, stream

PARTS = torch.randperm(N, generator=torch.Generator().manual_seed(3)).view(N // BS, BS)
STEPS = 5


def pairs(batch, seed, rank, world):
    """(i, this rank's share of fixed minibatch i), i drawn uniformly (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        i = int(torch.randint(len(PARTS), (1,), generator=gen))
        idx = PARTS[i][rank::world]
        yield i, tuple(t[idx] for t in batch)


def methods(problem):
    n = len(PARTS)
    kw = dict(lr_x=0.3, lr_y=0.5, lr_v=0.5)
    return {
        "saba": tb.saba(problem, **kw, n_inner=n, n_outer=n),
        "srba": tb.srba(problem, **kw, n_inner=n, n_outer=n, period=3),
        "amigo": tb.amigo(problem, **kw, inner_steps=2, v_steps=2),
        "ttsa": tb.ttsa(problem, lr_x=0.3, lr_y=0.5, neumann_steps=4),
        "fsla": tb.fsla(problem, **kw),
        "vrbo": tb.vrbo(problem, **kw, inner_steps=2, neumann_steps=3, period=3, large_batches=2),
    }


def scenarios(problem, rank, world):
    """{method: {"x": ..., "y": ...}} after STEPS steps on this rank's shards."""
    train, val = data()
    x0, y0 = start()
    out = {}
    for name, algo in methods(problem).items():
        make = pairs if name in ("saba", "srba") else stream
        ib, ob = make(train, 11, rank, world), make(val, 12, rank, world)
        s = algo.init(x0, y0)
        for _ in range(STEPS):
            s = algo.step(s, ib, ob)
        out[name] = {"x": s.xf, "y": s.yf}
    return out


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        problem = tb.distributed.data_parallel(tb.Bilevel(outer=outer, inner=inner))
        torch.save(scenarios(problem, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()          # every rank done before the group goes (gloo aborts a rank left alone)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = str(tmp_path_factory.mktemp("dist_family"))
    rdv = os.path.join(tmp, "rendezvous")
    spawn(_worker, (WORLD, rdv, tmp), WORLD, [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD)], rdv)
    ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    return ranks, scenarios(tb.Bilevel(outer=outer, inner=inner), 0, 1)


@pytest.mark.parametrize("name", list(methods(tb.Bilevel(outer=outer, inner=inner))))
def test_two_processes_reproduce_the_one_process_run(results, name):
    ranks, reference = results
    for r in ranks:
        for k, ref in reference[name].items():
            assert (r[name][k] - ref).abs().max().item() < TOL, (name, k)
    assert not torch.equal(reference[name]["x"], start()[0]["h"])
