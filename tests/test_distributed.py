"""Data-parallel hypergradients (torchbilevel.distributed): 2 processes (gloo, CPU), each
holding half of every batch, reproduce the single-process full-batch results; with buffer
donation (``donate=True``: FdeHBO, F2SA, BOME) the ranks' donated runs reproduce the
one-process run without donation.

One spawn of 2 workers runs every scenario (process start-up dominates the cost); the
parent computes the same scenarios in one process on the full batches and compares.
Run ``python tests/test_distributed.py`` to print the deviations table
(bench/RESULTS-reliability.md).
"""
import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist

import torchbilevel as tb
from spawning import spawn

DT = torch.float64
WORLD = 2
N, D_FEAT, BS = 64, 6, 16          # samples, features, minibatch size (even: equal shards)
TOL = 1e-6


def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_FEAT, generator=gen, dtype=DT)
    Xv = torch.randn(N, D_FEAT, generator=gen, dtype=DT)
    w = torch.randn(D_FEAT, generator=gen, dtype=DT)
    return (X, (X @ w > 0).to(DT)), (Xv, (Xv @ w + 0.3 * torch.randn(N, generator=gen, dtype=DT) > 0).to(DT))


def inner(x, y, batch):
    # mean logistic loss over the batch + per-feature weight decay exp(h) (smooth, strongly convex)
    X, lab = batch
    z = X @ y["w"] + y["b"]
    return torch.nn.functional.binary_cross_entropy_with_logits(z, lab) + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()


def outer(x, y, batch):
    X, lab = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ y["w"] + y["b"], lab)


def shard(batch, rank, world):
    return tuple(t[rank::world] for t in batch)


def stream(batch, seed, rank, world):
    """Seeded minibatches of BS samples; every rank draws the same indices and keeps its share."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(N, generator=gen)[:BS]
        yield tuple(t[idx[rank::world]] for t in batch)


def start():
    return {"h": torch.full((D_FEAT,), -1.0, dtype=DT)}, {"w": torch.zeros(D_FEAT, dtype=DT), "b": torch.zeros((), dtype=DT)}


def scenarios(problem, rank, world):
    """Every data-parallel entry point on this rank's shards; returns {name: {field: tensor}}."""
    train, val = data()
    tr, va = shard(train, rank, world), shard(val, rank, world)
    x0, y0 = start()
    out = {}
    calls = lambda: problem.reduce.calls if problem.reduce is not None else 0
    count = lambda before: torch.tensor(float(calls() - before))

    before = calls()
    dx, aux = tb.hypergrad(problem, tb.aid(tb.cg(steps=8)), has_aux=True)(x0, y0, tr, va)
    out["hypergrad AID-CG"] = {"dx": dx["h"], "v": torch.cat([aux.v["w"], aux.v["b"].reshape(1)]),
                               "f": aux.outer_loss, "collectives": count(before)}

    algo = tb.double_loop(problem, tb.aid(tb.cg(steps=5)), lr_x=0.5, inner_steps=4, lr_y=0.5)
    s = algo.init(x0, y0)
    for _ in range(3):
        s = algo.step(s, tr, va)
    out["double_loop AID-CG, 3 steps"] = {"x": s.x["h"], "y": s.y["w"], "v": s.v["w"]}

    algo = tb.double_loop(problem, tb.stocbio(6, 0.5), lr_x=0.5, inner_steps=4, lr_y=0.5)
    s = algo.init(x0, y0)
    ib, ob = stream(train, 1, rank, world), stream(val, 2, rank, world)
    for _ in range(3):
        s = algo.step(s, ib, ob)
    out["double_loop stocBiO (minibatch streams), 3 steps"] = {"x": s.x["h"], "y": s.y["w"]}

    algo = tb.double_loop(problem, tb.itd(5, 0.5), lr_x=0.5, inner_steps=0)
    s = algo.init(x0, y0)
    for _ in range(2):
        s = algo.step(s, tr, va)
    out["double_loop ITD, 2 steps"] = {"x": s.x["h"], "y": s.y["w"]}

    dx = tb.hypergrad(problem, tb.itd(5, 0.5, checkpoint=True))(x0, y0, tr, va)
    out["hypergrad ITD checkpoint=True"] = {"dx": dx["h"]}

    est = tb.pzobo(4, 0.5, directions=3, mu=1e-3, generator=torch.Generator().manual_seed(7))
    dx = tb.hypergrad(problem, est)(x0, y0, tr, va)
    out["hypergrad PZOBO"] = {"dx": dx["h"]}

    for name, ctor in (("fdehbo", tb.fdehbo), ("fmbo", tb.fmbo)):
        algo = ctor(problem, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
        s = algo.init(x0, y0)
        ib, ob = stream(train, 3, rank, world), stream(val, 4, rank, world)
        before = calls()
        for _ in range(5):
            s = algo.step(s, ib, ob)
        out[f"{name} (minibatch streams), 5 steps"] = {"x": s.xf, "y": s.yf, "v": s.vf, "collectives": count(before)}

    # buffer donation (donate=True) over the ranks; the one-process reference runs the same
    # steps without donation, so the ranks' donated run must reproduce the plain full-batch run
    donate = problem.reduce is not None
    for label, algo, steps, batches, fields in (
            ("fdehbo donated (minibatch streams), 5 steps",
             tb.fdehbo(problem, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0), 5,
             (stream(train, 3, rank, world), stream(val, 4, rank, world)), ("x", "y", "v")),
            ("f2sa donated (minibatch streams), 3 steps", tb.f2sa(problem, lr_x=0.3, lr_y=0.5, lr_z=0.5, inner_steps=2),
             3, (stream(train, 5, rank, world), stream(val, 6, rank, world)), ("x", "y", "z")),
            ("bome donated, 3 steps", tb.bome(problem, lr_x=0.3, lr_y=0.5, inner_steps=3), 3, (tr, va), ("x", "y"))):
        s = algo.init(x0, y0)
        before = calls()
        for _ in range(steps):
            s = algo.step(s, *batches, donate=donate)
        out[label] = {**{k: getattr(s, k + "f") for k in fields}, "collectives": count(before)}
        if label.startswith("bome"):
            out[label]["lam"] = s.lam
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


def run_distributed(tmp_dir):
    rdv = os.path.join(tmp_dir, "rendezvous")
    spawn(_worker, (WORLD, rdv, tmp_dir), WORLD, [os.path.join(tmp_dir, f"rank{r}.pt") for r in range(WORLD)], rdv)
    return [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def deviations(ranks, reference):
    """{scenario: max |rank result − full-batch result| over ranks and fields}."""
    return {name: max((r[name][k] - ref[k]).abs().max().item() for r in ranks for k in ref if k != "collectives")
            for name, ref in reference.items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ranks = run_distributed(str(tmp_path_factory.mktemp("dist")))
    reference = scenarios(tb.Bilevel(outer=outer, inner=inner), 0, 1)
    return ranks, reference


SCENARIOS = ["hypergrad AID-CG", "double_loop AID-CG, 3 steps", "double_loop stocBiO (minibatch streams), 3 steps",
             "double_loop ITD, 2 steps", "hypergrad ITD checkpoint=True", "hypergrad PZOBO", "fdehbo (minibatch streams), 5 steps",
             "fmbo (minibatch streams), 5 steps", "fdehbo donated (minibatch streams), 5 steps",
             "f2sa donated (minibatch streams), 3 steps", "bome donated, 3 steps"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_reproduce_the_full_batch_result(results, name):
    ranks, reference = results
    for r in ranks:
        for k, ref in reference[name].items():
            if k == "collectives":
                continue
            assert r[name][k].dtype == ref.dtype
            assert (r[name][k] - ref).abs().max().item() <= TOL, (name, k)
    # the ranks agree exactly with each other (all-reduce returns the same bits everywhere)
    for k in reference[name]:
        assert torch.equal(ranks[0][name][k], ranks[1][name][k]), (name, k)


@pytest.mark.parametrize("name", ["fdehbo (minibatch streams), 5 steps", "fmbo (minibatch streams), 5 steps"])
def test_single_loop_step_issues_one_collective(results, name):
    ranks, _ = results
    assert ranks[0][name]["collectives"].item() == 5.0     # 5 steps: one all-reduce each


def test_donated_steps_issue_their_collectives(results):
    ranks, _ = results
    # FdeHBO donated: one all-reduce per gradient as it returns (∇y g, ∇x f, ∇y f, ∇yy g·v, ∇xy g·v)
    # at each point (the first step: the current one only, then the previous one too); the
    # losses are averaged only for a step report (has_aux)
    assert ranks[0]["fdehbo donated (minibatch streams), 5 steps"]["collectives"].item() == 5 + 4 * (2 * 5)
    # F2SA: one per inner step + one for the x step; BOME: one per path step + one for the update
    assert ranks[0]["f2sa donated (minibatch streams), 3 steps"]["collectives"].item() == 3 * (2 + 1)
    assert ranks[0]["bome donated, 3 steps"]["collectives"].item() == 3 * (3 + 1)


def test_aid_issues_one_collective_per_product(results):
    ranks, _ = results
    # ∇f (one buffer for ∇x f, ∇y f, f) + 8 CG Hessian-vector products + the mixed product
    assert ranks[0]["hypergrad AID-CG"]["collectives"].item() == 1 + 8 + 1


def test_data_parallel_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        tb.distributed.data_parallel(tb.Bilevel(outer=outer, inner=inner))
    with pytest.raises(TypeError, match="Bilevel"):
        tb.distributed.data_parallel(lambda x, y, b: 0)


def test_average_without_hook_returns_its_arguments():
    p = tb.Bilevel(outer=outer, inner=inner)
    a, b = {"w": torch.ones(2)}, torch.zeros(())
    out = p.average(a, b, None)
    assert out[0] is a and out[1] is b and out[2] is None


def test_average_with_a_hook_is_one_call_on_one_buffer():
    seen = []

    def hook(flat):
        seen.append(flat.clone())
        return flat * 2
    p = tb.Bilevel(outer=outer, inner=inner, reduce=hook)
    a = {"w": torch.arange(3.0, dtype=DT), "s": torch.tensor(5.0, dtype=DT)}
    m = torch.ones(2, 2, dtype=DT)
    a2, none, m2 = p.average(a, None, m)
    assert len(seen) == 1 and seen[0].shape == (8,)
    assert torch.equal(a2["w"], 2 * a["w"]) and a2["s"].shape == () and a2["s"].item() == 10.0
    assert none is None and torch.equal(m2, 2 * m)
    with pytest.raises(TypeError, match="reduce"):
        tb.Bilevel(outer=outer, inner=inner, reduce=3)


if __name__ == "__main__":            # the figures of bench/RESULTS-reliability.md
    import tempfile
    import time
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ranks = run_distributed(tmp)
        wall = time.perf_counter() - t0
    ref = scenarios(tb.Bilevel(outer=outer, inner=inner), 0, 1)
    print(f"torch {torch.__version__}, gloo, {WORLD} processes x {N // WORLD} samples vs 1 process x {N}, "
          f"float64; spawn+run {wall:.1f} s")
    print("| scenario | max abs deviation from 1-process full batch | all-reduces |")
    print("|---|---|---|")
    for name, dev in deviations(ranks, ref).items():
        c = ranks[0][name].get("collectives")
        c = "" if c is None else (f"{int(c.item())} in all" if "donated" in name else
                                  f"{int(c.item()) // 5} per step" if "5 steps" in name else f"{int(c.item())} per call")
        print(f"| {name} | {dev:.1e} | {c} |")
    sys.exit(0)
