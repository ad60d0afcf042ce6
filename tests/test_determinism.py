"""Determinism on CPU: the same seeds and inputs give bit-identical results, run after run,
and ``torch.use_deterministic_algorithms(True)`` neither raises nor changes them."""

import pytest
import torch

import torchbilevel as tb

N, D_FEAT = 40, 5


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D_FEAT, generator=gen)
    Xv = torch.randn(N, D_FEAT, generator=gen)
    w = torch.randn(D_FEAT, generator=gen)
    return (X, (X @ w > 0).float()), (Xv, (Xv @ w > 0).float())


def inner(x, y, batch):
    X, lab = batch
    z = X @ y["w"]
    return torch.nn.functional.binary_cross_entropy_with_logits(z, lab) + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()


def outer(x, y, batch):
    X, lab = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ y["w"], lab)


PROBLEM = tb.Bilevel(outer=outer, inner=inner)


def minibatches(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(N, generator=gen)[:8]
        yield tuple(t[idx] for t in batch)


RUNS = {
    "aid": lambda: tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=4)), lr_x=0.3, inner_steps=3, lr_y=0.5),
    "stocbio": lambda: tb.double_loop(PROBLEM, tb.stocbio(4, 0.5), lr_x=0.3, inner_steps=3, lr_y=0.5, outer="adam"),
    "itd": lambda: tb.double_loop(PROBLEM, tb.itd(3, 0.5), lr_x=0.3, inner_steps=0, lr_y=0.5),
    "pzobo": lambda: tb.double_loop(PROBLEM, tb.pzobo(3, 0.5, 3, 1e-2, generator=torch.Generator().manual_seed(5)),
                                    lr_x=0.3, inner_steps=0, lr_y=0.5),
    "pzobo-global-rng": lambda: tb.double_loop(PROBLEM, tb.pzobo(3, 0.5, 3, 1e-2), lr_x=0.3, inner_steps=0, lr_y=0.5),
    "fdehbo": lambda: tb.fdehbo(PROBLEM, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0),
    "fmbo": lambda: tb.fmbo(PROBLEM, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0),
}


def run(name, steps=5):
    torch.manual_seed(123)                   # only PZOBO without a generator uses the global RNG
    algo = RUNS[name]()
    train, val = data()
    ib, ob = minibatches(train, 1), minibatches(val, 2)
    s = algo.init({"h": torch.full((D_FEAT,), -1.0)}, {"w": torch.zeros(D_FEAT)})
    for _ in range(steps):
        s = algo.step(s, ib, ob)
    return torch.cat([s.x["h"], s.y["w"]])


def bits(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_inputs_same_bits(name):
    a, b = run(name), run(name)
    assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("name", ["aid", "pzobo", "fdehbo"])
def test_deterministic_algorithms_mode_changes_nothing_on_cpu(name):
    ref = run(name)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        again = run(name)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(bits(ref), bits(again))


def test_hypergradients_repeat_exactly():
    train, val = data()
    x, y = {"h": torch.full((D_FEAT,), -1.0)}, {"w": torch.zeros(D_FEAT)}
    for est in (tb.aid(tb.cg(5)), tb.aid(tb.fixed_point(5, 0.5)), tb.itd(4, 0.5), tb.itd(4, 0.5, checkpoint=True),
                tb.stocbio(4, 0.5)):
        hg = tb.hypergrad(PROBLEM, est)
        assert torch.equal(bits(hg(x, y, train, val)["h"]), bits(hg(x, y, train, val)["h"])), est
    # PZOBO: the same generator state gives the same directions, hence the same estimate
    gen = torch.Generator()
    hg = tb.hypergrad(PROBLEM, tb.pzobo(3, 0.5, 4, 1e-2, generator=gen))
    gen.manual_seed(9)
    first = hg(x, y, train, val)["h"]
    gen.manual_seed(9)
    assert torch.equal(bits(first), bits(hg(x, y, train, val)["h"]))
