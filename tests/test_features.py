"""Declared features (tb.Bilevel(..., features=phi)): every estimator and algorithm gives the
result of the undeclared, composed form g(x, y, b) = g(phi(x, b), y, b), in float64, with
full batches, iterator batches and under vmap over tasks; phi runs once per distinct
(x, batch) where that applies; tb.nn.features builds phi and the head from a module."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb

DT = torch.float64


def make(seed=0, n=24, d=5, h=6, c=3):
    gen = torch.Generator().manual_seed(seed)
    x = {"A": torch.randn(d, h, dtype=DT, generator=gen) / d ** 0.5, "b": torch.zeros(h, dtype=DT)}
    y = {"W": 0.1 * torch.randn(h, c, dtype=DT, generator=gen)}
    data = lambda: (torch.randn(n, d, dtype=DT, generator=gen), torch.randint(0, c, (n,), generator=gen))
    return x, y, data(), data(), data

calls = {"phi": 0}


def phi(x, batch):
    calls["phi"] += 1
    return torch.tanh(batch[0] @ x["A"] + x["b"])


def g_head(z, y, batch):
    return F.cross_entropy(z @ y["W"], batch[1]) + 0.05 * (y["W"] ** 2).sum()


def f_head(z, y, batch):
    return F.cross_entropy(z @ y["W"], batch[1])


def declared():
    return tb.Bilevel(outer=f_head, inner=g_head, features=phi)


def undeclared():
    return tb.Bilevel(outer=lambda x, y, b: f_head(phi(x, b), y, b), inner=lambda x, y, b: g_head(phi(x, b), y, b))


ESTIMATORS = {
    "aid-cg": lambda: tb.aid(tb.cg(steps=5)),
    "aid-fp": lambda: tb.aid(tb.fixed_point(steps=5, lr=0.3)),
    "itd": lambda: tb.itd(4, 0.3),
    "itd-checkpoint": lambda: tb.itd(4, 0.3, checkpoint=True),
    "stocbio": lambda: tb.stocbio(4, 0.3),
    "pzobo": lambda: tb.pzobo(3, 0.3, 4, 1e-4, generator=torch.Generator().manual_seed(1)),
    "first_order": lambda: tb.first_order(),
}


def close(a, b, tol=1e-10):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("batches", ["full", "iterator", "same-object"])
def test_hypergrad_declared_equals_undeclared(name, batches):
    x, y, ib, ob, data = make()
    if batches == "same-object":
        ob = ib
    res = []
    stream = [data() for _ in range(40)]
    for prob in (declared(), undeclared()):
        if batches == "iterator":
            inner, outer = iter(stream[::2]), iter(stream[1::2])
        else:
            inner, outer = ib, ob
        res.append(tb.hypergrad(prob, ESTIMATORS[name](), has_aux=True)(x, y, inner, outer))
    (dx_d, aux_d), (dx_u, aux_u) = res
    close(dx_d, dx_u)
    close(aux_d.y, aux_u.y)
    torch.testing.assert_close(aux_d.outer_loss, aux_u.outer_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["aid-cg", "itd", "stocbio", "first_order"])
def test_declared_runs_phi_once_per_distinct_batch(name):
    x, y, ib, ob, _ = make()
    prob = declared()
    hg = tb.hypergrad(prob, ESTIMATORS[name]())
    hg(x, y, ib, ob)                    # the once-per-problem check that g uses y runs phi once
    calls["phi"] = 0
    hg(x, y, ib, ob)
    assert calls["phi"] == 2            # phi(x, inner batch) and phi(x, outer batch), once each
    calls["phi"] = 0
    hg(x, y, ib, ib)
    assert calls["phi"] == 1            # one batch object for both: one evaluation


def test_pzobo_runs_phi_once_per_path():
    x, y, ib, ob, _ = make()
    est = tb.pzobo(5, 0.3, 4, 1e-4, generator=torch.Generator().manual_seed(0))
    hg = tb.hypergrad(declared(), est)
    hg(x, y, ib, ob)
    calls["phi"] = 0
    hg(x, y, ib, ob)
    # the unperturbed path, one per direction (4), and f's gradient (1): not 5 steps x 5 paths
    assert calls["phi"] == 1 + 4 + 1


@pytest.mark.parametrize("name", ["aid-cg", "itd", "stocbio", "pzobo", "first_order"])
def test_double_loop_declared_equals_undeclared(name):
    x, y, ib, ob, _ = make()
    states = []
    for prob in (declared(), undeclared()):
        algo = tb.double_loop(prob, ESTIMATORS[name](), lr_x=0.2, inner_steps=3, lr_y=0.3)
        s = algo.init(x, y)
        for _ in range(3):
            s = algo.step(s, ib, ob)
        states.append(s)
    close(states[0].x, states[1].x)
    close(states[0].y, states[1].y)


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_single_loop_declared_equals_undeclared(ctor):
    x, y, ib, ob, data = make()
    states = []
    samples = [data() for _ in range(4)]
    for prob in (declared(), undeclared()):
        algo = ctor(prob, lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=50.0)
        s = algo.init(x, y)
        stream = itertools.cycle(samples)
        for _ in range(4):
            s = algo.step(s, stream, ob)
        states.append(s)
    close(states[0].x, states[1].x, 1e-8)
    close(states[0].y, states[1].y, 1e-8)


@pytest.mark.parametrize("name", ["aid-cg", "itd", "stocbio"])
def test_declared_under_vmap_over_tasks_equals_a_loop(name):
    x, y, ib, ob, _ = make()
    tasks = 3
    ys = {k: torch.stack([t + 0.1 * i for i in range(tasks)]) for k, t in y.items()}
    hg = tb.hypergrad(declared(), ESTIMATORS[name](), check_finite=False)
    batched = torch.func.vmap(lambda yy: hg(x, yy, ib, ob))(ys)
    for i in range(tasks):
        one = tb.hypergrad(undeclared(), ESTIMATORS[name]())(x, {k: t[i] for k, t in ys.items()}, ib, ob)
        close({k: t[i] for k, t in batched.items()}, one)


def test_features_may_return_a_dict():
    x, y, ib, ob, _ = make()
    phi_d = lambda x, b: {"z": phi(x, b), "s": (b[0] ** 2).sum(1, keepdim=True) * x["b"].sum()}
    g_d = lambda z, y, b: g_head(z["z"], y, b) + 1e-3 * (z["s"] ** 2).mean()
    f_d = lambda z, y, b: f_head(z["z"], y, b) + 1e-3 * z["s"].mean()
    dec = tb.Bilevel(outer=f_d, inner=g_d, features=phi_d)
    und = tb.Bilevel(outer=lambda x, y, b: f_d(phi_d(x, b), y, b), inner=lambda x, y, b: g_d(phi_d(x, b), y, b))
    est = tb.aid(tb.cg(steps=5))
    close(tb.hypergrad(dec, est)(x, y, ib, ob), tb.hypergrad(und, est)(x, y, ib, ob))


def test_bad_features():
    with pytest.raises(TypeError, match="features"):
        tb.Bilevel(outer=f_head, inner=g_head, features=3)
    x, y, ib, ob, _ = make()
    prob = tb.Bilevel(outer=f_head, inner=g_head, features=lambda x, b: [1.0])
    with pytest.raises(TypeError, match="features"):
        tb.hypergrad(prob, tb.aid(tb.cg(steps=2)))(x, y, ib, ob)


def test_nn_features_equals_the_module():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh()))
    model.add_module("head", nn.Linear(8, 3))
    model = model.double().train()
    x, y = tb.nn.split(model, inner=["head"])
    phi_m, head = tb.nn.features(model, body="body", head="head")
    X = torch.randn(16, 5, dtype=DT)
    t = torch.randint(0, 3, (16,))
    torch.testing.assert_close(head(phi_m(x, (X, t)), y), tb.nn.call(model, x, y, X))
    dec = tb.Bilevel(outer=lambda z, y, b: F.cross_entropy(head(z, y), b[1]),
                     inner=lambda z, y, b: F.cross_entropy(head(z, y), b[1]) + 1e-2 * (y["head.weight"] ** 2).sum(),
                     features=phi_m)
    und = tb.Bilevel(outer=lambda x, y, b: F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1]),
                     inner=lambda x, y, b: F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1])
                     + 1e-2 * (y["head.weight"] ** 2).sum())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    for est in (tb.aid(tb.cg(steps=4)), tb.itd(3, 0.2)):
        close(tb.hypergrad(dec, est)(x, y, (X, t), (X, t)), tb.hypergrad(und, est)(x, y, (X, t), (X, t)))
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k])            # hypergradients leave BatchNorm statistics alone
    with pytest.raises(ValueError, match="no submodule"):
        tb.nn.features(model, body="trunk", head="head")


@pytest.mark.parametrize("name", ["aid-cg", "itd", "stocbio"])
def test_double_loop_step_runs_phi_once_per_batch(name):
    # the inner steps and the lifted hypergradient share phi(x, inner) and phi(x, outer)
    x, y, ib, ob, _ = make()
    algo = tb.double_loop(declared(), ESTIMATORS[name](), lr_x=0.2, inner_steps=5, lr_y=0.3)
    s = algo.step(algo.init(x, y), ib, ob)
    calls["phi"] = 0
    algo.step(s, ib, ob)
    assert calls["phi"] == 2
