"""tb.nn: split / call / write_grad / load on real nn.Modules, and a module-based bilevel
problem whose AID hypergradient matches a dense float64 IFT reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb

DT = torch.float64


class Net(nn.Module):
    """MLP body (outer x) with BatchNorm, linear head (inner y)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, inp):
        return self.head(self.body(inp))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net().double().eval()
    bn = net.body[1]
    with torch.no_grad():                       # non-trivial BatchNorm state
        bn.running_mean.copy_(torch.randn(6, dtype=DT))
        bn.running_var.copy_(torch.rand(6, dtype=DT) + 0.5)
        bn.weight.copy_(torch.rand(6, dtype=DT) + 0.5)
        bn.bias.copy_(torch.randn(6, dtype=DT))
    return net


HEAD = {"head.weight", "head.bias"}


# ---------------------------------------------------------------- split
def test_split_by_names_prefix_and_predicate():
    net = make_net()
    x, y = tb.nn.split(net, inner=["head"])
    assert set(y) == HEAD
    assert set(x) == {n for n, _ in net.named_parameters()} - HEAD
    x2, y2 = tb.nn.split(net, inner="head")
    assert set(y2) == HEAD and set(x2) == set(x)
    x3, y3 = tb.nn.split(net, inner=["head.weight", "body.1"])
    assert set(y3) == {"head.weight", "body.1.weight", "body.1.bias"}
    x4, y4 = tb.nn.split(net, inner=lambda name, p: name.startswith("head") or p.dim() == 1 and p.numel() == 6)
    assert set(y4) == HEAD | {"body.0.bias", "body.1.weight", "body.1.bias"}
    # aliases of the parameters: same storage, no autograd history
    params = dict(net.named_parameters())
    for d in (x, y):
        for k, t in d.items():
            assert t.data_ptr() == params[k].data_ptr() and not t.requires_grad
    with torch.no_grad():
        params["head.bias"].add_(1.0)
    assert torch.equal(y["head.bias"], params["head.bias"])


def test_split_prefix_is_a_module_boundary_and_frozen_parameters():
    net = nn.ModuleDict({"head": nn.Linear(2, 2), "header": nn.Linear(2, 2), "body": nn.Linear(2, 2)})
    x, y = tb.nn.split(net, inner=["head"])
    assert set(y) == {"head.weight", "head.bias"}
    assert "header.weight" in x
    net["body"].weight.requires_grad_(False)
    x, _ = tb.nn.split(net, inner=["head"])
    assert "body.weight" not in x
    x, _ = tb.nn.split(net, inner=["head"], include_frozen=True)
    assert "body.weight" in x


def test_split_errors():
    net = make_net()
    with pytest.raises(ValueError, match="no parameter"):
        tb.nn.split(net, inner=["tail"])
    # every parameter inner is legal (x lives outside the module: data reweighting)
    x, y = tb.nn.split(net, inner=lambda n, p: True)
    assert x == {} and set(y) == {n for n, _ in net.named_parameters()}
    with pytest.raises(TypeError, match="module"):
        tb.nn.split({"w": torch.ones(2)}, inner=["w"])
    with pytest.raises(TypeError, match="inner"):
        tb.nn.split(net, inner=[1, 2])


# ---------------------------------------------------------------- call
def test_call_equals_module_including_buffers():
    net = make_net(1)
    inp = torch.randn(7, 4, dtype=DT)
    x, y = tb.nn.split(net, inner=["head"])
    with torch.no_grad():
        ref = net(inp)
    torch.testing.assert_close(tb.nn.call(net, x, y, inp), ref, rtol=0, atol=0)
    # other buffers: equals the module with those buffers set
    zero_stats = {"body.1.running_mean": torch.zeros(6, dtype=DT), "body.1.running_var": torch.ones(6, dtype=DT)}
    out = tb.nn.call(net, x, y, inp, buffers=zero_stats)
    bn = net.body[1]
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        ref2 = net(inp)
    torch.testing.assert_close(out, ref2, rtol=0, atol=0)
    assert not torch.allclose(ref, ref2)        # the buffers mattered


def test_call_with_new_inner_values_equals_module_after_load():
    net = make_net(2)
    inp = torch.randn(5, 4, dtype=DT)
    x, y = tb.nn.split(net, inner=["head"])
    y_new = {k: torch.randn_like(t) for k, t in y.items()}
    out = tb.nn.call(net, x, y_new, inp)
    keep = {k: t.clone() for k, t in y_new.items()}
    tb.nn.load(net, y_new)
    with torch.no_grad():
        torch.testing.assert_close(net(inp), out, rtol=0, atol=0)
    # load copies: later writes into the source do not reach the module
    y_new["head.bias"].add_(5.0)
    assert torch.equal(net.head.bias.detach(), keep["head.bias"])
    with pytest.raises(KeyError, match="nope"):
        tb.nn.load(net, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="share"):
        tb.nn.call(net, x, {**y, next(iter(x)): next(iter(x.values()))}, inp)


def test_call_composes_with_torch_func_grad():
    net = make_net(3)
    inp, target = torch.randn(6, 4, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    x, y = tb.nn.split(net, inner=["head"])
    gx = torch.func.grad(lambda xx: F.cross_entropy(tb.nn.call(net, xx, y, inp), target))(x)
    net.zero_grad()
    F.cross_entropy(net(inp), target).backward()
    for k in x:
        torch.testing.assert_close(gx[k], dict(net.named_parameters())[k].grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- write_grad
def test_write_grad_then_sgd_and_adam_steps():
    net = make_net(4)
    x, _ = tb.nn.split(net, inner=["head"])
    gen = torch.Generator().manual_seed(0)
    dx = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in x.items()}
    before = {k: t.clone() for k, t in x.items()}
    body_params = [p for n, p in net.named_parameters() if n in x]

    opt = torch.optim.SGD(body_params, lr=0.1)
    tb.nn.write_grad(net, dx)
    opt.step()
    for k in x:                                 # x aliases the parameters: it sees the step
        torch.testing.assert_close(x[k], before[k] - 0.1 * dx[k], rtol=0, atol=1e-15)
    assert net.head.weight.grad is None         # only the given names were written

    # Adam's first step moves each entry by lr·g/(|g| + eps) (bias-corrected moments m̂ = g, v̂ = g²)
    start = {k: t.clone() for k, t in x.items()}
    opt = torch.optim.Adam(body_params, lr=0.01, eps=1e-8)
    opt.zero_grad()
    tb.nn.write_grad(net, dx)
    opt.step()
    for k in x:
        torch.testing.assert_close(x[k], start[k] - 0.01 * dx[k] / (dx[k].abs() + 1e-8), rtol=0, atol=1e-12)


def test_write_grad_accumulate_dtype_and_errors():
    net = make_net(5)
    x, _ = tb.nn.split(net, inner=["head"])
    k = "body.0.weight"
    g = torch.ones_like(x[k])
    tb.nn.write_grad(net, {k: g})
    tb.nn.write_grad(net, {k: 2 * g}, accumulate=True)
    p = dict(net.named_parameters())[k]
    assert torch.equal(p.grad, 3 * g)
    tb.nn.write_grad(net, {k: g.float()})                   # cast to the parameter's dtype, replaced
    assert p.grad.dtype == DT and torch.equal(p.grad, g)
    g.add_(1.0)
    assert torch.equal(p.grad, torch.ones_like(g))          # .grad does not alias the input
    with pytest.raises(KeyError, match="nope"):
        tb.nn.write_grad(net, {"nope": g})
    with pytest.raises(ValueError, match="shape"):
        tb.nn.write_grad(net, {k: torch.ones(2, dtype=DT)})


# ---------------------------------------------------------------- a bilevel problem on a module
def test_module_bilevel_aid_matches_dense_ift():
    net = make_net(6)
    gen = torch.Generator().manual_seed(6)
    Xtr, Xval = torch.randn(40, 4, generator=gen, dtype=DT), torch.randn(30, 4, generator=gen, dtype=DT)
    ttr, tval = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (30,), generator=gen)
    wd = 0.1

    def inner(x, y, batch):
        X, t = batch
        reg = sum((p ** 2).sum() for p in y.values())
        return F.cross_entropy(tb.nn.call(net, x, y, X), t) + 0.5 * wd * reg

    def outer(x, y, batch):
        X, t = batch
        return F.cross_entropy(tb.nn.call(net, x, y, X), t)

    problem = tb.Bilevel(outer=outer, inner=inner)
    x, y = tb.nn.split(net, inner=["head"])
    xs = {k: tuple(t.shape) for k, t in x.items()}
    ys = {k: tuple(t.shape) for k, t in y.items()}

    def unflat(vec, shapes):
        out, i = {}, 0
        for k, s in shapes.items():
            out[k] = vec[i:i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    flat = lambda d: torch.cat([t.reshape(-1) for t in d.values()])
    G = lambda a, b: inner(unflat(a, xs), unflat(b, ys), (Xtr, ttr))
    Fo = lambda a, b: outer(unflat(a, xs), unflat(b, ys), (Xval, tval))
    xf = flat(x).clone()

    # y*(x): Newton on the (strongly convex) head problem, dense Hessians
    yf = flat(y).clone()
    for _ in range(30):
        gr = torch.autograd.functional.jacobian(lambda b: G(xf, b), yf)
        if gr.norm() < 1e-14:
            break
        yf = yf - torch.linalg.solve(torch.autograd.functional.hessian(lambda b: G(xf, b), yf), gr)
    assert torch.autograd.functional.jacobian(lambda b: G(xf, b), yf).norm() < 1e-13

    (_, hxy), (_, hyy) = torch.autograd.functional.hessian(G, (xf, yf))
    fx, fy = torch.autograd.functional.jacobian(Fo, (xf, yf))
    ref = fx - hxy @ torch.linalg.solve(hyy, fy)

    y_star = unflat(yf, ys)
    dx = tb.hypergrad(problem, tb.aid(tb.cg(steps=40)))(x, y_star, (Xtr, ttr), (Xval, tval))
    assert set(dx) == set(x)
    torch.testing.assert_close(flat({k: dx[k] for k in x}), ref, rtol=1e-8, atol=1e-11)

    # the outer step through torch.optim lands where the dense reference says
    before = xf.clone()
    opt = torch.optim.SGD([p for n, p in net.named_parameters() if n in x], lr=0.5)
    tb.nn.write_grad(net, dx)
    opt.step()
    torch.testing.assert_close(flat(x), before - 0.5 * ref, rtol=1e-8, atol=1e-11)
