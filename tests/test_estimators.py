"""Hypergradient estimators through tb.hypergrad, against closed forms, dense float64 IFT
references and hand-written unrolled loops."""
import math

import pytest
import torch
import torch.nn.functional as F

import torchbilevel as tb
from dense import flat, unflat

DT = torch.float64




def assert_tree_close(tree, ref_vec, rtol, atol):
    torch.testing.assert_close(flat(tree), ref_vec, rtol=rtol, atol=atol)


class Counting:
    """An infinite iterator over ``items`` (cycled) that counts the draws."""

    def __init__(self, items):
        self.items, self.calls = list(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = self.items[self.calls % len(self.items)]
        self.calls += 1
        return item


# =============================================================== ridge problem, closed form
# g(x, y) = ½/n ‖A y − b‖² + ½ Σ exp(loglam) (y − shift)²       (y = [w, b] flattened)
# f(x, y) = ½/m ‖C y − d‖² + ½ ρ (‖loglam‖² + ‖shift‖²)
RX = {"loglam": (4,), "shift": (4,)}
RY = {"w": (3,), "b": ()}
RHO = 0.1


def ridge_inner(x, y, batch):
    A, bv = batch
    yf = torch.cat([y["w"], y["b"].reshape(1)])
    return 0.5 * ((A @ yf - bv) ** 2).mean() + 0.5 * (torch.exp(x["loglam"]) * (yf - x["shift"]) ** 2).sum()


def ridge_outer(x, y, batch):
    C, dv = batch
    yf = torch.cat([y["w"], y["b"].reshape(1)])
    return 0.5 * ((C @ yf - dv) ** 2).mean() + 0.5 * RHO * (x["loglam"] @ x["loglam"] + x["shift"] @ x["shift"])


def ridge_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    inner_b, outer_b = (r(30, 4), r(30)), (r(20, 4), r(20))
    x = {"loglam": 0.3 * r(4), "shift": r(4)}
    return x, inner_b, outer_b


def ridge_closed_form(x, inner_b, outer_b):
    """(y*, ∇Φ(x), L_g) from the normal equations (no autograd)."""
    A, bv = inner_b
    C, dv = outer_b
    lam, s = torch.exp(x["loglam"]), x["shift"]
    H = A.T @ A / A.shape[0] + torch.diag(lam)
    y = torch.linalg.solve(H, A.T @ bv / A.shape[0] + lam * s)
    q = torch.linalg.solve(H, C.T @ (C @ y - dv) / C.shape[0])
    grad = torch.cat([RHO * x["loglam"] + lam * (s - y) * q, RHO * s + lam * q])
    return unflat(y, RY), grad, torch.linalg.eigvalsh(H).max().item()


RIDGE = tb.Bilevel(outer=ridge_outer, inner=ridge_inner)


def ridge_estimators(L):
    return {
        "aid-cg": tb.aid(tb.cg(steps=4)),
        "aid-cg-func": tb.aid(tb.cg(steps=4), mode="func"),
        "aid-fp": tb.aid(tb.fixed_point(steps=300, lr=1.0 / L)),
        "stocbio": tb.stocbio(neumann_steps=300, eta=1.0 / L),
        "itd": tb.itd(steps=300, lr=1.0 / L),
        "itd-checkpoint": tb.itd(steps=300, lr=1.0 / L, checkpoint=True),
    }


@pytest.mark.parametrize("name", ["aid-cg", "aid-cg-func", "aid-fp", "stocbio", "itd", "itd-checkpoint"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ridge_hypergradient_matches_closed_form(name, seed):
    x, ib, ob = ridge_setup(seed)
    y_star, ref, L = ridge_closed_form(x, ib, ob)
    est = ridge_estimators(L)[name]
    dx, aux = tb.hypergrad(RIDGE, est, has_aux=True)(x, y_star, ib, ob)
    assert list(dx) == list(x) and all(dx[k].shape == x[k].shape for k in x)
    assert_tree_close(dx, ref, rtol=1e-8, atol=1e-10)
    # aux.y is the inner iterate used: y* itself (a fixed point of the ITD steps too)
    assert_tree_close(aux.y, flat(y_star), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.outer_loss, ridge_outer(x, y_star, ob))


# =============================================================== logistic regression, dense IFT
LX = {"loglam": (5,), "scale": (5,)}
LY = {"w": (5,), "b": ()}


def logreg_inner(x, y, batch):
    X, t = batch
    logits = (X * x["scale"]) @ y["w"] + y["b"]
    return F.softplus(-t * logits).mean() + 0.5 * (torch.exp(x["loglam"]) * y["w"] ** 2).sum() + 0.05 * y["b"] ** 2


def logreg_outer(x, y, batch):
    X, t = batch
    return F.softplus(-t * ((X * x["scale"]) @ y["w"] + y["b"])).mean()


LOGREG = tb.Bilevel(outer=logreg_outer, inner=logreg_inner)


def logreg_setup(seed=0, n=40):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    w_true = r(5)
    def data(m):
        X = r(m, 5)
        return X, torch.where(X @ w_true + 0.5 * r(m) > 0, 1.0, -1.0).to(DT)
    x = {"loglam": 0.3 * r(5) - 1.0, "scale": 1.0 + 0.2 * r(5)}
    y0 = {"w": 0.1 * r(5), "b": 0.1 * r(())}
    return x, y0, data(n), data(30)


_NEWTON = {}


def newton_solve(x, batch, iters=30):
    """y*(x) by Newton's method with dense float64 Hessians (independent of the library)."""
    key = (tuple(flat(x).tolist()), tuple(batch[0].reshape(-1)[:3].tolist()), batch[0].shape)
    if key not in _NEWTON:
        G = lambda yf: logreg_inner(x, unflat(yf, LY), batch)
        yf = torch.zeros(6, dtype=DT)
        for _ in range(iters):
            gr = torch.autograd.functional.jacobian(G, yf)
            if gr.norm() < 1e-14:
                break
            yf = yf - torch.linalg.solve(torch.autograd.functional.hessian(G, yf), gr)
        assert torch.autograd.functional.jacobian(G, yf).norm() < 1e-13
        _NEWTON[key] = unflat(yf, LY)
    return _NEWTON[key]


def dense_ift(x, y, inner_b, outer_b):
    """∇x f − ∇xy g (∇yy g)⁻¹ ∇y f at (x, y), with dense Hessian blocks; also v = H⁻¹ ∇y f."""
    xf, yf = flat(x), flat(y)
    G = lambda a, b: logreg_inner(unflat(a, LX), unflat(b, LY), inner_b)
    Fo = lambda a, b: logreg_outer(unflat(a, LX), unflat(b, LY), outer_b)
    (_, hxy), (_, hyy) = torch.autograd.functional.hessian(G, (xf, yf))
    fx, fy = torch.autograd.functional.jacobian(Fo, (xf, yf))
    v = torch.linalg.solve(hyy, fy)
    return fx - hxy @ v, v, hyy, hxy, fx, fy


@pytest.mark.parametrize("mode", ["auto", "autograd", "func"])
def test_aid_cg_logistic_matches_dense_ift(mode):
    x, _, ib, ob = logreg_setup(0)
    y_star = newton_solve(x, ib)
    ref, v_ref, *_ = dense_ift(x, y_star, ib, ob)
    dx, aux = tb.hypergrad(LOGREG, tb.aid(tb.cg(steps=30), mode=mode), has_aux=True)(x, y_star, ib, ob)
    assert_tree_close(dx, ref, rtol=1e-9, atol=1e-12)
    assert_tree_close(aux.v, v_ref, rtol=1e-9, atol=1e-12)
    assert aux.y.keys() == y_star.keys() and all(torch.equal(aux.y[k], y_star[k]) for k in y_star)


def test_aid_fixed_point_and_stocbio_logistic_match_dense_ift():
    x, _, ib, ob = logreg_setup(1)
    y_star = newton_solve(x, ib)
    ref, v_ref, hyy, *_ = dense_ift(x, y_star, ib, ob)
    L = torch.linalg.eigvalsh(hyy).max().item()
    for est in (tb.aid(tb.fixed_point(steps=300, lr=1.0 / L)), tb.stocbio(300, 1.0 / L)):
        dx, aux = tb.hypergrad(LOGREG, est, has_aux=True)(x, y_star, ib, ob)
        assert_tree_close(dx, ref, rtol=1e-8, atol=1e-11)
        assert_tree_close(aux.v, v_ref, rtol=1e-8, atol=1e-11)


def test_aid_warm_start_improves_accuracy():
    x, y0, ib, ob = logreg_setup(2)
    ref, *_ = dense_ift(x, y0, ib, ob)         # AID at any y approximates the IFT formula at that y
    hg = tb.hypergrad(LOGREG, tb.aid(tb.cg(steps=2)), has_aux=True)
    cold, aux = hg(x, y0, ib, ob)
    warm, aux2 = hg(x, y0, ib, ob, v0=aux.v)
    warmer, _ = hg(x, y0, ib, ob, v0=aux2.v)
    e = [(flat(d) - ref).norm().item() for d in (cold, warm, warmer)]
    assert e[1] < 0.5 * e[0] and e[2] < 0.5 * e[1], e


# =============================================================== ITD against hand-written unrolling
def hand_itd(x, y0, batches, ob, steps, lr):
    """Differentiate f(x, y_D(x)) through D explicit GD steps with torch.autograd."""
    xr = {k: t.clone().requires_grad_() for k, t in x.items()}
    y = {k: t.clone() for k, t in y0.items()}
    for t in range(steps):
        yr = {k: v if v.requires_grad else v.clone().requires_grad_() for k, v in y.items()}
        gys = torch.autograd.grad(logreg_inner(xr, yr, batches[t]), list(yr.values()), create_graph=True)
        y = {k: yr[k] - lr * gk for k, gk in zip(yr, gys)}
    val = logreg_outer(xr, y, ob)
    gx = torch.autograd.grad(val, list(xr.values()))
    return torch.cat([t.reshape(-1) for t in gx]), {k: t.detach() for k, t in y.items()}, val.detach()


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("steps", [1, 7])
def test_itd_equals_hand_written_unroll(steps, checkpoint):
    x, y0, ib, ob = logreg_setup(3)
    ref, y_ref, f_ref = hand_itd(x, y0, [ib] * steps, ob, steps, 0.7)
    dx, aux = tb.hypergrad(LOGREG, tb.itd(steps, 0.7, checkpoint=checkpoint), has_aux=True)(x, y0, ib, ob)
    assert_tree_close(dx, ref, rtol=1e-10, atol=1e-13)
    assert_tree_close(aux.y, flat(y_ref), rtol=1e-12, atol=1e-14)
    assert aux.v is None
    torch.testing.assert_close(aux.outer_loss, f_ref)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_itd_draws_one_fresh_batch_per_step(checkpoint):
    x, y0, (X, t), ob = logreg_setup(4, n=60)
    parts = [(X[i::5], t[i::5]) for i in range(5)]
    inner, outer = Counting(parts), Counting([ob])
    dx = tb.hypergrad(LOGREG, tb.itd(4, 0.5, checkpoint=checkpoint))(x, y0, inner, outer)
    assert inner.calls == 4 and outer.calls == 1
    ref, _, _ = hand_itd(x, y0, parts[:4], ob, 4, 0.5)
    assert_tree_close(dx, ref, rtol=1e-10, atol=1e-13)


# =============================================================== stocBiO: batches and the Neumann formula
def test_stocbio_equal_batches_equals_neumann_formula():
    x, y0, ib, ob = logreg_setup(5)
    _, _, hyy, hxy, fx, fy = dense_ift(x, y0, ib, ob)
    Q, eta = 6, 0.3
    inner, outer = Counting([ib]), Counting([ob])
    dx, aux = tb.hypergrad(LOGREG, tb.stocbio(Q, eta), has_aux=True)(x, y0, inner, outer)
    assert inner.calls == Q + 1 and outer.calls == 1     # one batch per Neumann term, one for ∇xy g
    M = torch.eye(6, dtype=DT) - eta * hyy
    v_ref = eta * sum(torch.linalg.matrix_power(M, i) @ fy for i in range(Q + 1))
    assert_tree_close(aux.v, v_ref, rtol=1e-11, atol=1e-13)
    assert_tree_close(dx, fx - hxy @ v_ref, rtol=1e-11, atol=1e-13)
    # the same batch passed as a plain object (one graph for all terms) gives the same numbers
    dx2, aux2 = tb.hypergrad(LOGREG, tb.stocbio(Q, eta), has_aux=True)(x, y0, ib, ob)
    assert_tree_close(dx2, flat(dx), rtol=1e-12, atol=1e-14)


def test_stocbio_fresh_batches_follow_algorithm_3():
    # Alg. 3: r_Q = ∇y F(D_F); r_{i-1} = (I − η H(B_i)) r_i for i = Q..1 (one fresh batch each);
    # v_Q = η Σ r_i;  ∇̂Φ = ∇x F(D_F) − ∇xy G(D_G) v_Q with a further fresh batch D_G.
    x, y0, (X, t), ob = logreg_setup(6, n=80)
    Q, eta = 4, 0.4
    parts = [(X[i::Q + 1], t[i::Q + 1]) for i in range(Q + 1)]
    inner = Counting(parts)
    dx, aux = tb.hypergrad(LOGREG, tb.stocbio(Q, eta), has_aux=True)(x, y0, inner, ob)
    assert inner.calls == Q + 1
    blocks = [dense_ift(x, y0, p, ob) for p in parts]
    fx, fy = blocks[0][4], blocks[0][5]
    r, acc = fy, fy.clone()
    for j in range(Q):                         # in the order the batches were drawn
        r = r - eta * blocks[j][2] @ r
        acc = acc + r
    v_ref = eta * acc
    assert_tree_close(aux.v, v_ref, rtol=1e-11, atol=1e-13)
    assert_tree_close(dx, fx - blocks[Q][3] @ v_ref, rtol=1e-11, atol=1e-13)


def test_aid_draws_once():
    x, y0, ib, ob = logreg_setup(7)
    inner, outer = Counting([ib]), Counting([ob])
    dx = tb.hypergrad(LOGREG, tb.aid(tb.cg(steps=5)))(x, y0, inner, outer)
    assert inner.calls == 1 and outer.calls == 1
    dx_plain = tb.hypergrad(LOGREG, tb.aid(tb.cg(steps=5)))(x, y0, ib, ob)
    assert_tree_close(dx, flat(dx_plain), rtol=0, atol=0)


# =============================================================== PZOBO
def pz_setup():
    x, y0, ib, ob = logreg_setup(8)
    steps, lr = 5, 0.8
    itd_dx, itd_aux = tb.hypergrad(LOGREG, tb.itd(steps, lr), has_aux=True)(x, y0, ib, ob)
    return x, y0, ib, ob, steps, lr, itd_dx, itd_aux


@pytest.mark.parametrize("antithetic", [False, True])
def test_pzobo_mean_matches_itd_of_same_path(antithetic):
    x, y0, ib, ob, steps, lr, itd_dx, itd_aux = pz_setup()
    Q = 10000 if antithetic else 20000            # antithetic runs 2Q perturbed paths
    gen = torch.Generator().manual_seed(1234)
    est = tb.pzobo(steps, lr, directions=Q, mu=1e-4, antithetic=antithetic, generator=gen, vectorize=True)
    dx, aux = tb.hypergrad(LOGREG, est, has_aux=True)(x, y0, ib, ob)
    assert aux.v is None
    assert_tree_close(aux.y, flat(itd_aux.y), rtol=1e-12, atol=1e-14)    # same inner path y_N
    # E[(aᵀu) u] = a with a = Jᵀ∇y f; Var of coordinate i is ‖a‖² + a_i² for Gaussian u
    fx = torch.func.grad(logreg_outer)(x, itd_aux.y, ob)
    a = flat(itd_dx) - flat(fx)
    se = torch.sqrt((a @ a + a ** 2) / Q)
    err = (flat(dx) - flat(itd_dx)).abs()
    assert (err <= 5 * se).all(), (err / se)
    assert a.norm() > 10 * se.max()          # the test is not vacuous: the signal is resolved


def test_pzobo_antithetic_has_lower_variance():
    # y*(x) = x², quadratic in x: the one-sided difference (y_N(x+μu) − y_N(x))/μ carries a
    # μ-sized second-order term that the central (antithetic) difference cancels exactly.
    prob = tb.Bilevel(outer=lambda x, y, b: (b * y["w"]).sum(),
                      inner=lambda x, y, b: 0.5 * ((y["w"] - x["a"] ** 2) ** 2).sum())
    x = {"a": torch.tensor([0.1, -0.2, 0.05, 0.3], dtype=DT)}
    y0 = {"w": torch.zeros(4, dtype=DT)}
    c = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=DT)
    steps, lr, mu, Q, calls = 3, 0.5, 0.5, 8, 25
    exact = flat(tb.hypergrad(prob, tb.itd(steps, lr))(x, y0, None, c))
    torch.testing.assert_close(exact, (1 - 0.5 ** 3) * 2 * x["a"] * c)   # d/dx of c·(1−(1−lr)^N) x²

    def samples(antithetic):
        gen = torch.Generator().manual_seed(99)      # paired: the same directions for both
        hg = tb.hypergrad(prob, tb.pzobo(steps, lr, Q, mu, antithetic=antithetic, generator=gen))
        return torch.stack([flat(hg(x, y0, None, c)) for _ in range(calls)])

    plain, anti = samples(False), samples(True)
    var_plain, var_anti = plain.var(0).sum().item(), anti.var(0).sum().item()
    assert var_anti < 0.5 * var_plain, (var_anti, var_plain)
    # both are unbiased here; the antithetic mean is within its own Monte-Carlo error
    assert (anti.mean(0) - exact).norm() < 4 * math.sqrt(var_anti / calls)


def test_pzobo_generator_reproducible_and_vectorize_equivalent():
    x, y0, ib, ob, steps, lr, _, _ = pz_setup()
    run = lambda seed, **kw: flat(tb.hypergrad(LOGREG, tb.pzobo(
        steps, lr, 16, 1e-3, generator=torch.Generator().manual_seed(seed), **kw))(x, y0, ib, ob))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    for anti in (False, True):
        torch.testing.assert_close(run(5, vectorize=True, antithetic=anti),
                                   run(5, vectorize=False, antithetic=anti), rtol=1e-10, atol=1e-12)


def test_pzobo_uses_same_batches_for_all_paths():
    # PZOBO-S: N inner draws shared by every perturbed path, one outer draw
    x, y0, (X, t), ob = logreg_setup(9, n=60)
    parts = [(X[i::3], t[i::3]) for i in range(3)]
    inner, outer = Counting(parts), Counting([ob])
    gen = torch.Generator().manual_seed(0)
    dx, aux = tb.hypergrad(LOGREG, tb.pzobo(3, 0.5, 8, 1e-3, generator=gen), has_aux=True)(x, y0, inner, outer)
    assert inner.calls == 3 and outer.calls == 1
    _, y_ref, _ = hand_itd(x, y0, parts, ob, 3, 0.5)
    assert_tree_close(aux.y, flat(y_ref), rtol=1e-12, atol=1e-14)


def test_scalar_outer_parameter():
    # a 0-d hyperparameter (one global regularisation weight) through every estimator
    def inner(x, y, batch):
        return logreg_inner({"loglam": x["ll"].expand(5), "scale": torch.ones(5, dtype=DT)}, y, batch)

    def outer(x, y, batch):
        return logreg_outer({"scale": torch.ones(5, dtype=DT)}, y, batch)

    prob = tb.Bilevel(outer=outer, inner=inner)
    _, y0, ib, ob = logreg_setup(10)
    x = {"ll": torch.tensor(-1.0, dtype=DT)}
    ref = flat(tb.hypergrad(prob, tb.itd(4, 0.5))(x, y0, ib, ob))
    gen = torch.Generator().manual_seed(0)
    dx = tb.hypergrad(prob, tb.pzobo(4, 0.5, 4000, 1e-4, generator=gen, antithetic=True, vectorize=True))(x, y0, ib, ob)
    assert dx["ll"].shape == ()
    assert abs(dx["ll"].item() - ref.item()) < 0.1 * abs(ref.item()) + 1e-6
    for est in (tb.aid(tb.cg(steps=10)), tb.stocbio(10, 0.5)):
        assert tb.hypergrad(prob, est)(x, y0, ib, ob)["ll"].shape == ()


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "itd", "itd-checkpoint", "stocbio", "pzobo"])
def test_no_grad_and_parameter_inputs(name):
    # under torch.no_grad(), with leaves that require grad (module parameters): same numbers,
    # a detached result, nothing written into .grad, inputs unchanged
    make = {
        "aid-cg": lambda: tb.aid(tb.cg(steps=5)),
        "aid-fp": lambda: tb.aid(tb.fixed_point(steps=5, lr=0.5)),
        "itd": lambda: tb.itd(3, 0.5),
        "itd-checkpoint": lambda: tb.itd(3, 0.5, checkpoint=True),
        "stocbio": lambda: tb.stocbio(4, 0.5),
        "pzobo": lambda: tb.pzobo(3, 0.5, 4, 1e-3, generator=torch.Generator().manual_seed(0)),
    }[name]
    x, y0, ib, ob = logreg_setup(11)
    ref = flat(tb.hypergrad(LOGREG, make())(x, y0, ib, ob))
    xr = {k: t.clone().requires_grad_() for k, t in x.items()}
    yr = {k: t.clone().requires_grad_() for k, t in y0.items()}
    with torch.no_grad():
        dx = tb.hypergrad(LOGREG, make())(xr, yr, ib, ob)
    torch.testing.assert_close(flat(dx), ref, rtol=1e-12, atol=1e-14)
    assert not any(t.requires_grad for t in dx.values())
    for d, orig in ((xr, x), (yr, y0)):
        for k, t in d.items():
            assert t.grad is None and t.requires_grad and torch.equal(t.detach(), orig[k])
