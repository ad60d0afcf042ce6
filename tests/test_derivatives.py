"""torchbilevel.derivatives: exact and finite-difference products against dense float64
Hessian blocks of a nonlinear inner objective."""
import math

import pytest
import torch
import torch.nn.functional as F

from dense import flat, unflat
from torchbilevel import derivatives as D

DT = torch.float64


# ---------------------------------------------------------------- the test problem
# Logistic regression on x-dependent features tanh(X A), per-coordinate L2 weights exp(loglam),
# a bias b that is a 0-d tensor: nonlinear in x and y, multi-tensor dicts on both sides.
X_SHAPES = {"A": (4, 3), "loglam": (3,)}
Y_SHAPES = {"w": (3,), "b": ()}


def g(x, y, batch):
    X, t = batch
    logits = torch.tanh(X @ x["A"]) @ y["w"] + y["b"]
    return F.softplus(-t * logits).mean() + 0.5 * (torch.exp(x["loglam"]) * y["w"] ** 2).sum() + 0.05 * y["b"] ** 2




def dense_blocks(x, y, batch):
    """(∇yy g, ∇xy g) as dense float64 matrices, from torch.autograd.functional.hessian."""
    G = lambda xf, yf: g(unflat(xf, X_SHAPES), unflat(yf, Y_SHAPES), batch)
    (_, hxy), (_, hyy) = torch.autograd.functional.hessian(G, (flat(x), flat(y)))
    return hyy, hxy          # hxy[i, j] = ∂²g / ∂x_i ∂y_j


def setup(seed=0, n=20):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    batch = (r(n, 4), torch.where(r(n) > 0, 1.0, -1.0).to(DT))
    x = {"A": r(4, 3), "loglam": 0.3 * r(3)}
    y = {"w": r(3), "b": r(())}
    v = {"w": r(3), "b": r(())}
    return x, y, v, batch


def clones(tree):
    return {k: t.clone() for k, t in tree.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].requires_grad == b[k].requires_grad


def assert_close_flat(tree, ref, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(flat(tree), ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- exact products
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hvp_mixed_against_dense_hessian(seed):
    x, y, v, batch = setup(seed)
    hyy, hxy = dense_blocks(x, y, batch)
    assert_close_flat(D.hvp(g, x, y, v, batch), hyy @ flat(v))
    assert_close_flat(D.mixed(g, x, y, v, batch), hxy @ flat(v))
    hv, jv = D.hvp_and_mixed(g, x, y, v, batch)
    assert_close_flat(hv, hyy @ flat(v))
    assert_close_flat(jv, hxy @ flat(v))
    assert list(hv) == list(y) and list(jv) == list(x)
    assert hv["b"].shape == () and jv["A"].shape == (4, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_products_against_dense_hessian(seed):
    """exact_products is the reference of many other tests (model zoo, mixed precision,
    finite differences): it is itself checked here against the dense float64 Hessian
    blocks, with dicts and with flat tensors (measured error ~1e-16 relative)."""
    x, y, v, batch = setup(seed)
    hyy, hxy = dense_blocks(x, y, batch)
    jv, hv = D.exact_products(g, x, y, v, batch)
    assert list(hv) == list(y) and list(jv) == list(x)
    assert_close_flat(hv, hyy @ flat(v), rtol=1e-12, atol=1e-14)
    assert_close_flat(jv, hxy @ flat(v), rtol=1e-12, atol=1e-14)
    # flat buffers: the objective receives flat tensors
    G = lambda xf, yf, b: g(unflat(xf, X_SHAPES), unflat(yf, Y_SHAPES), b)
    jv_f, hv_f = D.exact_products(G, flat(x), flat(y), flat(v), batch)
    torch.testing.assert_close(hv_f, hyy @ flat(v), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(jv_f, hxy @ flat(v), rtol=1e-12, atol=1e-14)


def test_grad_y_and_grads_against_autograd():
    x, y, v, batch = setup(3)
    xr = {k: t.clone().requires_grad_() for k, t in x.items()}
    yr = {k: t.clone().requires_grad_() for k, t in y.items()}
    val = g(xr, yr, batch)
    ref = torch.autograd.grad(val, [*xr.values(), *yr.values()])
    gx, gy = D.grads(g, x, y, batch)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in ref]), torch.cat([flat(gx), flat(gy)]))
    assert_close_flat(D.grad_y(g, x, y, batch), torch.cat([t.reshape(-1) for t in ref[2:]]))


@pytest.mark.parametrize("mode", ["autograd", "func", "auto"])
def test_linearize_against_dense_hessian(mode):
    x, y, v, batch = setup(4)
    hyy, hxy = dense_blocks(x, y, batch)
    lin = D.linearize(g, x, y, batch, mode=mode)
    G = lambda yf: g(x, unflat(yf, Y_SHAPES), batch)
    assert_close_flat(lin.grad_y, torch.func.grad(G)(flat(y)))
    # the operator is built once and applied many times
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        u = unflat(torch.randn(4, generator=gen, dtype=DT), Y_SHAPES)
        assert_close_flat(lin.hvp(u), hyy @ flat(u))
        assert_close_flat(lin.mixed(u), hxy @ flat(u))
        assert_close_flat(lin.hvp(u), hyy @ flat(u))      # again after a mixed product
    with pytest.raises(ValueError, match="mode"):
        D.linearize(g, x, y, batch, mode="forward")


@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_linearize_never_modifies_inputs_and_works_under_no_grad(mode):
    x, y, v, batch = setup(5)
    # inputs that look like module parameters: leaves requiring grad
    x = {k: t.requires_grad_() for k, t in x.items()}
    x0, y0, v0 = clones(x), clones(y), clones(v)
    hyy, hxy = dense_blocks(T_detach(x), y, batch)
    with torch.no_grad():
        lin = D.linearize(g, x, y, batch, mode=mode)
        hv, jv, gy = lin.hvp(v), lin.mixed(v), lin.grad_y
    assert_close_flat(hv, hyy @ flat(v))
    assert_close_flat(jv, hxy @ flat(v))
    assert all(torch.isfinite(t).all() for t in gy.values())
    for a, b in ((x, x0), (y, y0), (v, v0)):
        for k in a:
            assert torch.equal(a[k].detach(), b[k].detach())
            assert a[k].requires_grad == b[k].requires_grad
    assert all(t.grad is None for t in x.values())


def T_detach(tree):
    return {k: t.detach() for k, t in tree.items()}


def test_linearize_zero_when_g_ignores_part_of_the_variables():
    # g linear in y (no curvature) and independent of one x entry: zero products, no error
    def lin_g(x, y, batch):
        return (x["a"] * y["w"]).sum()
    x = {"a": torch.ones(2, dtype=DT), "unused": torch.ones(3, dtype=DT)}
    y = {"w": torch.ones(2, dtype=DT)}
    v = {"w": torch.tensor([2.0, -1.0], dtype=DT)}
    for mode in ("autograd", "func"):
        lin = D.linearize(lin_g, x, y, None, mode=mode)
        assert torch.equal(lin.hvp(v)["w"], torch.zeros(2, dtype=DT))
        torch.testing.assert_close(lin.mixed(v)["a"], v["w"])      # ∇x <∇y g, v> = v
        assert torch.equal(lin.mixed(v)["unused"], torch.zeros(3, dtype=DT))


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("batched", [False, True])
def test_fd_products_second_order_accurate(batched):
    x, y, v, batch = setup(6)
    hyy, hxy = dense_blocks(x, y, batch)
    h_ref, j_ref = hyy @ flat(v), hxy @ flat(v)
    errs = []
    for delta in (4e-2, 2e-2, 1e-2):
        p = D.fd_products(g, x, y, v, batch, delta=delta, batched=batched)
        errs.append(max((flat(p.hvp) - h_ref).abs().max().item(), (flat(p.mixed) - j_ref).abs().max().item()))
    # central differences: halving δ divides the error by 4 (O(δ²), rounding is negligible here)
    for e_big, e_small in zip(errs, errs[1:]):
        assert 3.0 < e_big / e_small < 5.0, errs
    # default δ: the error is at the O(ε^{2/3}) level
    p = D.fd_products(g, x, y, v, batch, batched=batched)
    assert_close_flat(p.hvp, h_ref, rtol=1e-8, atol=1e-9)
    assert_close_flat(p.mixed, j_ref, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(p.delta, D.fd_delta(y, v))


def test_fd_products_batched_equals_unbatched():
    x, y, v, batch = setup(8)
    a = D.fd_products(g, x, y, v, batch, batched=True)
    b = D.fd_products(g, x, y, v, batch, batched=False)
    for k in y:
        torch.testing.assert_close(a.hvp[k], b.hvp[k], rtol=1e-9, atol=1e-11)
    for k in x:
        torch.testing.assert_close(a.mixed[k], b.mixed[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fd_delta_scale_rule(dtype):
    x, y, v, batch = setup(9)
    y = {k: (3.0 * t).to(dtype) for k, t in y.items()}
    v = {k: (0.01 * t).to(dtype) for k, t in v.items()}
    d = D.fd_delta(y, v)
    assert d.shape == ()
    eps = torch.finfo(dtype).eps
    ny = flat(y).double().norm().item()
    nv = flat(v).double().norm().item()
    n = sum(t.numel() for t in y.values())
    # the docstring's rule: ‖δ v‖ = ε^{1/3} (1 + rms(y)), rms(y) = ‖y‖/√dim(y)
    assert math.isclose(d.item() * nv, eps ** (1 / 3) * (1 + ny / math.sqrt(n)), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fd_delta_half_precision_uses_its_eps_in_float32(dtype):
    # the gradients are rounded to the half dtype: a float32-sized perturbation would sit
    # below one ulp of y (measured 16-56% error in bfloat16), so ε is the half dtype's
    y = {"w": torch.tensor([3.0, 4.0], dtype=dtype)}
    v = {"w": torch.tensor([1.0, 0.0], dtype=dtype)}
    d = D.fd_delta(y, v)
    assert d.dtype == torch.float32
    # ‖y‖ = 5 over 2 entries: rms(y) = 5/√2
    assert math.isclose(d.item(), torch.finfo(dtype).eps ** (1 / 3) * (1 + 5 / math.sqrt(2)), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched", [False, True])
def test_fd_zero_direction_is_finite(dtype, batched):
    x, y, v, batch = setup(10)
    x = {k: t.to(dtype) for k, t in x.items()}
    y = {k: t.to(dtype) for k, t in y.items()}
    batch = tuple(t.to(dtype) for t in batch)
    zero = {k: torch.zeros_like(t) for k, t in y.items()}
    d = D.fd_delta(y, zero)
    assert torch.isfinite(d) and d > 0
    p = D.fd_products(g, x, y, zero, batch, batched=batched)
    for tree in (p.hvp, p.mixed):
        for t in tree.values():
            assert t.dtype == dtype
            assert torch.equal(t, torch.zeros_like(t))


def _softmax_head_problem():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 20, dtype=torch.float64, generator=gen)
    t = torch.randint(0, 5, (64,), generator=gen)
    x = {"A": torch.randn(20, 16, dtype=torch.float64, generator=gen) / 20 ** 0.5}
    y = {"W": torch.randn(16, 5, dtype=torch.float64, generator=gen), "b": torch.randn(5, dtype=torch.float64, generator=gen)}
    v = {"W": torch.randn(16, 5, dtype=torch.float64, generator=gen), "b": torch.randn(5, dtype=torch.float64, generator=gen)}

    def g_head(x, y, b):
        X, t = b
        z = torch.tanh(X.to(x["A"].dtype) @ x["A"])
        return torch.nn.functional.cross_entropy(z @ y["W"] + y["b"], t) + 5e-3 * sum((w ** 2).sum() for w in y.values())
    return g_head, x, y, v, (X, t)


@pytest.mark.parametrize("y_norm", [0.0, 0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("v_norm", [0.01, 1.0, 100.0])
def test_float32_fd_products_within_5e_4_of_exact_at_every_scale(y_norm, v_norm):
    # the default δ follows the typical entry of y (its RMS), not its norm: with the old
    # norm rule the float32 products were off by 4-6e-3 at ‖y‖ = 100 (truncation)
    g_head, x, y, v, (X, t) = _softmax_head_problem()
    norm = lambda d: torch.sqrt(sum((a ** 2).sum() for a in d.values()))
    y = {k: a / norm(y) * y_norm for k, a in y.items()}
    v = {k: a / norm(v) * v_norm for k, a in v.items()}
    jv, hv = D.exact_products(g_head, x, y, v, (X, t))
    f32 = lambda d: {k: a.float() for k, a in d.items()}
    p = D.fd_products(g_head, f32(x), f32(y), f32(v), (X.float(), t))
    for got, exact in ((p.hvp, hv), (p.mixed, jv)):
        err = norm({k: got[k].double() - exact[k] for k in exact}) / norm(exact)
        assert err < 5e-4, (y_norm, v_norm, float(err))


def test_gradient_of_an_objective_independent_of_the_requested_inputs_is_zero():
    # f of data hyper-cleaning does not depend on x: ∇x f = 0, not an autograd error
    f = lambda x, y, b: (y["w"] ** 2).sum()
    x, y = {"h": torch.ones(2, dtype=torch.float64)}, {"w": torch.ones(3, dtype=torch.float64)}
    val, (gx,) = D.gradient(f, x, y, None, argnums=0)
    assert torch.equal(gx["h"], torch.zeros(2, dtype=torch.float64)) and float(val) == 3.0
