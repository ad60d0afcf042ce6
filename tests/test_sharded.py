"""Sharded models (FSDP2 ``fully_shard``, gloo on CPU): the gradient-only methods on 2 and 4
ranks, each rank holding 1/N of every batch and of every parameter, equal one unsharded
process on the full batch (float64, 1e-6 relative) after 8 steps; their state holds only
local shards; the methods that need a double backward refuse before any work; wrappers
whose forward ignores the given tensors raise instead of returning a silent zero.

One spawn per world size runs every scenario (process start-up dominates the cost).
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

import torchbilevel as tb
from spawning import spawn

DT = torch.float64
N, D_IN, H = 48, 6, 12          # samples (divisible by 2 and 4), inputs, hidden units
STEPS = 8
RTOL = 1e-6


def data():
    gen = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(N, D_IN, generator=gen, dtype=DT), torch.randn(N, D_IN, generator=gen, dtype=DT)
    w = torch.randn(D_IN, generator=gen, dtype=DT)
    return (X, torch.tanh(X @ w).unsqueeze(1)), (Xv, torch.tanh(Xv @ w).unsqueeze(1))


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.Tanh(), torch.nn.Linear(H, 1)).to(DT)


def problems(net):
    """(a) x = a per-feature input scale (plain, replicated), y = every weight of the model;
    (b) x = the body (sharded), y = the head (sharded)."""
    def mse(x, y, b, scale=True):
        inp = b[0] * torch.exp(x["s"]) if scale else b[0]
        return ((tb.nn.call(net, {} if scale else x, y, inp) - b[1]) ** 2).mean()

    ridge = lambda y: 1e-2 * sum((t ** 2).sum() for t in y.values())
    scaled = tb.Bilevel(outer=lambda x, y, b: mse(x, y, b), inner=lambda x, y, b: mse(x, y, b) + ridge(y))
    body = tb.Bilevel(outer=lambda x, y, b: mse(x, y, b, False),
                      inner=lambda x, y, b: mse(x, y, b, False) + ridge(y))
    return scaled, body


def full(tree):
    return {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for k, t in tree.items()}


def scenarios(net, rank, world, dp):
    (X, t), (Xv, tv) = data()
    tr, va = (X[rank::world], t[rank::world]), (Xv[rank::world], tv[rank::world])
    scaled, body = problems(net)
    if dp:
        scaled, body = tb.distributed.data_parallel(scaled), tb.distributed.data_parallel(body)
    out = {}
    params = dict(net.named_parameters())
    y_all = {k: p.detach() for k, p in params.items()}
    x_s = {"s": torch.zeros(D_IN, dtype=DT)}

    algo = tb.fdehbo(scaled, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    s = algo.init(x_s, y_all)
    for _ in range(STEPS):
        s = algo.step(s, tr, va)
    out["fdehbo x=scale y=model"] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()},
                                      **{"v/" + k: v for k, v in full(s.v).items()}}
    # resume per rank through a newly built algorithm: the same as the straight run
    algo2 = tb.fdehbo(scaled, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    r = algo2.init(x_s, y_all)
    for _ in range(STEPS // 2):
        r = algo2.step(r, tr, va)
    path = os.path.join(os.environ.get("TB_SHARD_TMP", "."), f"state{rank}.pt")
    torch.save(algo2.state_dict(r), path)
    algo3 = tb.fdehbo(scaled, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    r = algo3.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(STEPS - STEPS // 2):
        r = algo3.step(r, tr, va)
    out["fdehbo resumed"] = {**full(r.x), **{"y/" + k: v for k, v in full(r.y).items()}}
    out["fdehbo state elements"] = {"n": torch.tensor(float(sum(v.numel() for v in algo.state_dict(s).values()
                                                                 if isinstance(v, torch.Tensor))))}
    out["fdehbo kinds"] = {"dtensor": torch.tensor(float(all(hasattr(v, "full_tensor") for v in s.y.values())))}

    x_b, y_h = tb.nn.split(net, inner=["2"])
    algo = tb.fdehbo(body, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    s = algo.init(x_b, y_h)
    for _ in range(STEPS):
        s = algo.step(s, tr, va)
    out["fdehbo x=body y=head"] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()}}

    for name, algo in (("f2sa", tb.f2sa(body, lr_x=0.1, lr_y=0.2, lr_z=0.2)),
                       ("bome", tb.bome(body, lr_x=0.1, lr_y=0.2, inner_steps=3)),
                       ("f2sa x=scale", tb.f2sa(scaled, lr_x=0.1, lr_y=0.2, lr_z=0.2))):
        xx, yy = (x_s, y_all) if "scale" in name else (x_b, y_h)
        s = algo.init(xx, yy)
        for _ in range(STEPS):
            s = algo.step(s, tr, va)
        out[name] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()}}

    dx = tb.hypergrad(scaled, tb.first_order())(x_s, y_all, tr, va)
    out["hypergrad first_order"] = full(dx)
    for dist_name in ("gaussian", "sphere"):
        est = tb.pzobo(3, 0.2, directions=4, mu=1e-3, generator=torch.Generator().manual_seed(5),
                       distribution=dist_name)
        out[f"hypergrad pzobo {dist_name} x=body"] = full(tb.hypergrad(body, est)(x_b, y_h, tr, va))
    algo = tb.double_loop(body, tb.pzobo(3, 0.2, directions=3, mu=1e-3, generator=torch.Generator().manual_seed(6)),
                          lr_x=0.1, inner_steps=1, lr_y=0.2)
    s = algo.init(x_b, y_h)
    for _ in range(STEPS):
        s = algo.step(s, tr, va)
    out["double_loop pzobo x=body"] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()}}
    algo = tb.double_loop(body, tb.first_order(), lr_x=0.1, inner_steps=3, lr_y=0.2)
    s = algo.init(x_b, y_h)
    for _ in range(STEPS):
        s = algo.step(s, tr, va)
    out["double_loop first_order x=body"] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()}}
    # iterator batches: every rank draws its share of the same minibatches, none lost
    def stream(data, seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randperm(N, generator=gen)[:16]      # a global minibatch of 16
            yield tuple(t[idx][rank::world] for t in data)
    for name, algo in (("double_loop first_order streams", tb.double_loop(body, tb.first_order(), lr_x=0.1,
                                                                          inner_steps=2, lr_y=0.2)),
                       ("fdehbo streams", tb.fdehbo(body, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5,
                                                    eta_v=0.5, radius=5.0))):
        s = algo.init(x_b, y_h)
        ib, ob = stream((X, t), 1), stream((Xv, tv), 2)
        for _ in range(STEPS):
            s = algo.step(s, ib, ob)
        out[name] = {**full(s.x), **{"y/" + k: v for k, v in full(s.y).items()}}
    return out


def refusals(net, rank, world):
    """Methods that differentiate twice: refuse before any work, naming the ones that run."""
    scaled, _ = problems(net)
    y_all = {k: p.detach() for k, p in net.named_parameters()}
    x_s = {"s": torch.zeros(D_IN, dtype=DT)}
    seen = []
    for build in (lambda: tb.fmbo(scaled, lr_x=0.1, lr_y=0.1, lr_v=0.1, radius=1.0).init(x_s, y_all),
                  lambda: tb.soba(scaled, lr_x=0.1, lr_y=0.1, lr_v=0.1).init(x_s, y_all),
                  lambda: tb.hypergrad(scaled, tb.aid(tb.cg(3)))(x_s, y_all, None, None),
                  lambda: tb.hypergrad(scaled, tb.itd(3, 0.1))(x_s, y_all, None, None),
                  lambda: tb.double_loop(scaled, tb.stocbio(3, 0.1)).init(x_s, y_all),
                  lambda: tb.mrbo(scaled, lr_x=0.1, lr_y=0.1).init(x_s, y_all)):
        try:
            build()
            seen.append("no error")
        except NotImplementedError as err:
            seen.append("ok" if "tb.fdehbo" in str(err) else str(err))
    # bad input: a sharded y with an unsharded v; a model sharded on some ranks only
    algo = tb.fdehbo(tb.distributed.data_parallel(scaled), lr_x=0.1, lr_y=0.1, lr_v=0.1, radius=1.0)
    try:
        algo.init(x_s, y_all, v={k: torch.zeros(tuple(t.shape), dtype=DT) for k, t in y_all.items()})
        seen.append("no error")
    except ValueError as err:
        seen.append("ok" if str(err).startswith("v:") else str(err))
    # bad input: unequal shares of the batch per rank (objectives are means)
    (X, t), _ = data()
    uneven = (X[:4 + rank], t[:4 + rank])
    algo_u = tb.fdehbo(tb.distributed.data_parallel(problems(net)[0]), lr_x=0.1, lr_y=0.1, lr_v=0.1, radius=1.0)
    s_u = algo_u.init(x_s, y_all)
    try:
        algo_u.step(s_u, uneven, uneven)
        seen.append("no error")
    except ValueError as err:
        seen.append("ok" if "inner_batch" in str(err) and "equal share" in str(err) else str(err))
    from torch.distributed.fsdp import fully_shard
    half = model()
    if rank == 0:
        fully_shard(half)
    try:
        algo.init(x_s, {k: p.detach() for k, p in half.named_parameters()})
        seen.append("no error")
    except ValueError as err:
        seen.append("ok" if "some ranks" in str(err) else str(err))
    return seen


def _worker(rank, world, init_file, out_dir, dp):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    os.environ["TB_SHARD_TMP"] = out_dir
    try:
        from torch.distributed.fsdp import fully_shard
        torch.set_num_threads(1)
        net = model()
        fully_shard(net[0])
        fully_shard(net)
        res = scenarios(net, rank, world, dp)
        res["refusals"] = refusals(net, rank, world)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()          # every rank done before the group goes (gloo aborts a rank left alone)
    finally:
        dist.destroy_process_group()


def run(world, tmp_dir, dp=True):
    rdv = os.path.join(tmp_dir, "rendezvous")
    spawn(_worker, (world, rdv, tmp_dir, dp), world, [os.path.join(tmp_dir, f"rank{r}.pt") for r in range(world)], rdv)
    return [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    os.environ["TB_SHARD_TMP"] = str(tmp_path_factory.mktemp("ref"))
    return scenarios(model(), 0, 1, dp=False)


@pytest.mark.parametrize("world", [2, 4])
def test_gradient_only_methods_on_a_sharded_model_equal_one_process(world, reference, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ranks = run(world, str(tmp_path))
    for name, ref in reference.items():
        if name in ("fdehbo state elements", "fdehbo kinds"):
            continue
        for r, res in enumerate(ranks):
            for k, v in ref.items():
                torch.testing.assert_close(res[name][k], v, rtol=RTOL, atol=1e-9, msg=f"{name} {k} rank {r}")
        assert any((v.abs() > 0).any() for v in ref.values() if v.numel()), name   # never a silent zero
    for res in ranks:
        # each rank's state holds its shards: at 2 ranks at most 0.6 of one process's elements
        assert res["fdehbo state elements"]["n"] <= (0.6 if world == 2 else 0.4) * reference["fdehbo state elements"]["n"]
        assert res["fdehbo kinds"]["dtensor"] == 1.0           # state.y: DTensors, like the user's y
        assert res["refusals"] == ["ok"] * 9, res["refusals"]


def test_wrappers_that_ignore_the_given_tensors_raise():
    net = model()
    x, y = tb.nn.split(net, inner=["2"])
    compiled = torch.compile(net)
    with pytest.raises(TypeError, match="_orig_mod"):
        tb.nn.call(compiled, x, y, torch.zeros(2, D_IN, dtype=DT))
