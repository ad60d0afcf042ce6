"""Indefinite inner Hessians (issue 24): the solvers' reports, damping, truncation, Nyström and
Gauss-Newton curvature against dense float64 references; the warnings fire on an indefinite
system and stay silent on a positive-definite one; bad input is refused before any work."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchbilevel as tb
from torchbilevel.solvers import solve

DT = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def sym(n, eigs, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    b = torch.randn(n, generator=gen, dtype=DT)
    return q @ torch.diag(torch.as_tensor(eigs, dtype=DT)) @ q.T, b


def tree(vec):
    k = vec.shape[0] // 2
    return {"a": vec[:k].reshape(k, 1), "b": vec[k:]}


def flat(t):
    return torch.cat([t["a"].reshape(-1), t["b"]])


def op(A):
    return lambda v: tree(A @ flat(v))


def indefinite(n, seed, neg=2):
    eigs = torch.linspace(0.5, 5.0, n, dtype=DT)
    eigs[:neg] = -torch.linspace(1.0, 2.0, neg, dtype=DT)
    return sym(n, eigs, seed)


# ---- damping -----------------------------------------------------------------------------

@SETTINGS
@given(st.integers(2, 10), st.floats(0.0, 3.0), st.integers(0, 10**6))
def test_damped_cg_equals_dense_solve_on_an_indefinite_matrix(n, extra, seed):
    # A has eigenvalues down to -2; A + λI with λ = 2.5 + extra is positive definite
    A, b = indefinite(n, seed, neg=1)
    lam = 2.5 + extra
    v, info = solve(tb.cg(steps=4 * n, damping=lam), op(A), tree(b))
    ref = torch.linalg.solve(A + lam * torch.eye(n, dtype=DT), b)
    torch.testing.assert_close(flat(v), ref, rtol=1e-9, atol=1e-11)
    assert int(info.nonpositive_curvature) == 0
    true_res = (b - (A + lam * torch.eye(n, dtype=DT)) @ flat(v)).norm() / b.norm()
    assert float(info.residual) <= 1e-8 and abs(float(info.residual) - float(true_res)) <= 1e-9


def test_damped_fixed_point_equals_its_closed_form():
    n, steps, lr, lam = 6, 15, 0.1, 0.7
    A, b = sym(n, torch.linspace(0.2, 3.0, n), 3)
    v, info = solve(tb.fixed_point(steps=steps, lr=lr, damping=lam), op(A), tree(b))
    M = A + lam * torch.eye(n, dtype=DT)
    E = torch.linalg.matrix_power(torch.eye(n, dtype=DT) - lr * M, steps)
    ref = (torch.eye(n, dtype=DT) - E) @ torch.linalg.solve(M, b)      # Richardson from 0
    torch.testing.assert_close(flat(v), ref, rtol=1e-10, atol=1e-12)
    res = (b - M @ flat(v)).norm() / b.norm()
    assert abs(float(info.residual) - float(res)) <= 1e-10
    assert int(info.iterations) == steps and float(info.start_residual) == 1.0


# ---- reports -----------------------------------------------------------------------------

@pytest.mark.parametrize("solver", [tb.cg(steps=12), tb.fixed_point(steps=40, lr=0.15)])
def test_report_on_spd_matches_dense_residual_and_counts_nothing(solver):
    n = 8
    A, b = sym(n, torch.logspace(0, 1, n), 5)
    v, info = solve(solver, op(A), tree(b))
    res = (b - A @ flat(v)).norm() / b.norm()
    assert abs(float(info.residual) - float(res)) <= 1e-9 * max(1.0, float(res))
    assert int(info.nonpositive_curvature) == 0 and not bool(info.truncated)
    assert int(info.iterations) == solver.steps
    assert not bool(tb.solvers.solve_failed(info, solver))


def test_report_with_warm_start_measures_the_start():
    n = 6
    A, b = sym(n, torch.linspace(1, 4, n), 6)
    v0 = torch.linalg.solve(A, b) + 0.1
    _, info = solve(tb.cg(steps=2), op(A), tree(b), v0=tree(v0))
    start = (b - A @ v0).norm() / b.norm()
    assert abs(float(info.start_residual) - float(start)) <= 1e-12


def test_cg_on_an_indefinite_matrix_counts_nonpositive_curvature():
    A, b = indefinite(10, 1, neg=3)
    _, info = solve(tb.cg(steps=10), op(A), tree(b))
    assert int(info.nonpositive_curvature) >= 1
    assert bool(tb.solvers.solve_failed(info, tb.cg(steps=10)))


def _truncated_reference(A, b, steps):
    # plain CG written out, stopping at the first pᵀAp ≤ 0 and keeping the iterate
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for it in range(steps):
        Ap = A @ p
        pAp = p @ Ap
        if pAp <= 0:
            return v, it
        a = (r @ r) / pAp
        v = v + a * p
        r_new = r - a * Ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return v, steps


@pytest.mark.parametrize("seed", range(6))
def test_truncated_cg_stops_at_the_first_nonpositive_curvature(seed):
    A, b = indefinite(12, seed, neg=4)
    ref, its = _truncated_reference(A, b, 12)
    v, info = solve(tb.cg(steps=12, indefinite="truncate"), op(A), tree(b))
    torch.testing.assert_close(flat(v), ref, rtol=1e-12, atol=1e-12)
    assert int(info.iterations) == its
    assert bool(info.truncated) == (its < 12)
    assert int(info.nonpositive_curvature) == (1 if its < 12 else 0)
    res = (b - A @ flat(v)).norm() / b.norm()
    assert abs(float(info.residual) - float(res)) <= 1e-10


def test_truncation_never_changes_a_positive_definite_solve():
    A, b = sym(9, torch.logspace(0, 2, 9), 8)
    v1, _ = solve(tb.cg(steps=9), op(A), tree(b))
    v2, info = solve(tb.cg(steps=9, indefinite="truncate"), op(A), tree(b))
    assert torch.equal(flat(v1), flat(v2)) and not bool(info.truncated)


def test_solve_report_under_vmap_is_tensors():
    A, b = indefinite(6, 2)
    B = torch.stack([b, 2 * b])

    def one(bb):
        v, info = solve(tb.cg(steps=6), op(A), tree(bb))
        return flat(v), info.residual, info.nonpositive_curvature
    vs, res, neg = torch.func.vmap(one)(B)
    assert res.shape == (2,) and neg.shape == (2,)
    torch.testing.assert_close(vs[1], 2 * vs[0])


# ---- Nyström -----------------------------------------------------------------------------

def _nystrom_reference(A, b, k, rho, seed):
    idx = torch.randperm(A.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    C = A[:, idx]
    Ak = C @ torch.linalg.pinv(A[idx][:, idx]) @ C.T
    return torch.linalg.solve(Ak + rho * torch.eye(A.shape[0], dtype=DT), b)


@pytest.mark.parametrize("k,rho", [(1, 0.5), (3, 0.1), (5, 1.0), (8, 0.01)])
def test_nystrom_equals_the_dense_rank_k_solve(k, rho):
    A, b = sym(8, torch.linspace(0.5, 6.0, 8), 11)
    v, info = solve(tb.nystrom(k, rho, generator=torch.Generator().manual_seed(4)), op(A), tree(b))
    torch.testing.assert_close(flat(v), _nystrom_reference(A, b, k, rho, 4), rtol=1e-8, atol=1e-10)
    res = (b - (A + rho * torch.eye(8, dtype=DT)) @ flat(v)).norm() / b.norm()
    assert abs(float(info.residual) - float(res)) <= 1e-10
    assert int(info.iterations) == k and int(info.nonpositive_curvature) == 0


def test_nystrom_full_rank_is_the_damped_solve():
    A, b = sym(6, torch.linspace(1.0, 3.0, 6), 12)
    v, info = solve(tb.nystrom(6, 0.3), op(A), tree(b))
    torch.testing.assert_close(flat(v), torch.linalg.solve(A + 0.3 * torch.eye(6, dtype=DT), b), rtol=1e-9, atol=1e-11)
    assert float(info.residual) < 1e-10


def test_nystrom_counts_negative_eigenvalues_of_the_sampled_block():
    A, b = indefinite(6, 3, neg=2)
    _, info = solve(tb.nystrom(6, 0.5), op(A), tree(b))
    assert int(info.nonpositive_curvature) == 2


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("make,name", [
    (lambda: tb.cg(5, damping=-1.0), "damping"), (lambda: tb.cg(5, damping=float("nan")), "damping"),
    (lambda: tb.fixed_point(5, 0.1, damping=-0.1), "damping"), (lambda: tb.nystrom(0, 0.1), "rank"),
    (lambda: tb.nystrom(3, 0.0), "rho"), (lambda: tb.nystrom(3, -1.0), "rho"),
    (lambda: tb.cg(5, indefinite="ignore"), "indefinite"),
    (lambda: tb.aid(tb.cg(5), curvature="fisher"), "curvature")])
def test_bad_configs_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_nystrom_rank_above_dim_y_is_refused_before_any_product():
    calls = []
    A, b = sym(4, torch.ones(4), 0)
    with pytest.raises(ValueError, match="rank"):
        solve(tb.nystrom(5, 0.1), lambda v: calls.append(1) or op(A)(v), tree(b))
    assert calls == []


# ---- bilevel problems: warnings, raise, remedies -----------------------------------------

def quadratic_problem(eigs, seed=0):
    """g = ½ yᵀAy − yᵀBx, f = ½‖y − c‖² + ½‖x‖²/10: ∇yy g = A, ∇xy g = −Bᵀ."""
    n = len(eigs)
    A, c = sym(n, eigs, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    B = torch.randn(n, 3, generator=gen, dtype=DT)
    g = lambda x, y, b: 0.5 * y["w"] @ A @ y["w"] - y["w"] @ B @ x["x"]
    f = lambda x, y, b: 0.5 * ((y["w"] - c) ** 2).sum() + 0.05 * (x["x"] ** 2).sum()
    x = {"x": torch.randn(3, generator=gen, dtype=DT)}
    y = {"w": torch.randn(n, generator=gen, dtype=DT)}
    return tb.Bilevel(outer=f, inner=g), x, y, A, B, c


def test_hypergrad_warns_on_an_indefinite_hessian_and_not_on_a_definite_one():
    p, x, y, *_ = quadratic_problem(torch.linspace(1.0, 5.0, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.hypergrad(p, tb.aid(tb.cg(8)))(x, y, None, None)
    p, x, y, *_ = quadratic_problem([-2.0, -1.0] + [1.0] * 6)
    with pytest.warns(RuntimeWarning, match="negative .*curvature.*indefinite"):
        dx, aux = tb.hypergrad(p, tb.aid(tb.cg(8)), has_aux=True)(x, y, None, None)
    assert int(aux.solve.nonpositive_curvature) >= 1


def test_indefinite_raise_mode_raises_and_damping_fixes_it():
    p, x, y, A, B, c = quadratic_problem([-2.0, -1.0] + [1.0] * 6)
    with pytest.raises(tb.IndefiniteSystemError, match="indefinite"):
        tb.hypergrad(p, tb.aid(tb.cg(8, indefinite="raise")))(x, y, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx = tb.hypergrad(p, tb.aid(tb.cg(30, damping=3.0)))(x, y, None, None)
    v = torch.linalg.solve(A + 3.0 * torch.eye(8, dtype=DT), y["w"] - c)
    ref = 0.1 * x["x"] + B.T @ v                 # ∇x f − ∇xy g·v with ∇xy g = −Bᵀ
    torch.testing.assert_close(dx["x"], ref, rtol=1e-9, atol=1e-11)


def test_double_loop_warns_once_per_run_and_records_it():
    p, x, y, *_ = quadratic_problem([-2.0, -1.0] + [1.0] * 6)
    algo = tb.double_loop(p, tb.aid(tb.cg(8)), lr_x=0.01, inner_steps=0, lr_y=0.01)
    for _run in range(2):
        s = algo.init(x, y)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            for _ in range(3):
                s = algo.step(s, None, None)
        assert sum("indefinite" in str(w.message) for w in got) == 1
        assert "indefinite" in s.warned
    resumed = algo.load_state_dict(algo.state_dict(s))
    assert resumed.warned == s.warned


def test_first_order_says_when_it_is_identically_zero():
    # data reweighting: x weights the inner losses only; f does not depend on x
    gen = torch.Generator().manual_seed(0)
    X, t = torch.randn(20, 3, generator=gen, dtype=DT), torch.randn(20, generator=gen, dtype=DT)
    g = lambda x, y, b: (torch.sigmoid(x["w"]) * (X @ y["b"] - t) ** 2).mean() + 0.1 * (y["b"] ** 2).sum()
    f = lambda x, y, b: ((X @ y["b"] - t) ** 2).mean()
    p = tb.Bilevel(outer=f, inner=g)
    x, y = {"w": torch.zeros(20, dtype=DT)}, {"b": torch.zeros(3, dtype=DT)}
    with pytest.warns(RuntimeWarning, match="exactly zero"):
        dx = tb.hypergrad(p, tb.first_order())(x, y, None, None)
    assert torch.equal(dx["w"], torch.zeros(20, dtype=DT))


# ---- Gauss-Newton ------------------------------------------------------------------------

def mlp_problem(seed=0, lam=0.1, weighted=False):
    """A tanh MLP with every weight inner; x scales the inputs and (``weighted``) weights each
    example's loss (data reweighting: the loss depends on x directly)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 4, generator=gen, dtype=DT)
    t = torch.randint(0, 3, (12,), generator=gen)
    x = {"s": torch.randn(4, generator=gen, dtype=DT)}
    if weighted:
        x["w"] = torch.randn(12, generator=gen, dtype=DT)
    y = {"W1": torch.randn(4, 5, generator=gen, dtype=DT) / 2, "W2": torch.randn(5, 3, generator=gen, dtype=DT) / 2}

    def outputs(x, y, b):
        return torch.tanh((X * x["s"]) @ y["W1"]) @ y["W2"]

    def loss(out, x, b):
        if weighted:
            return (torch.sigmoid(x["w"]) * torch.nn.functional.cross_entropy(out, t, reduction="none")).mean()
        return torch.nn.functional.cross_entropy(out, t)

    def reg(x, y, b):
        return 0.5 * lam * sum((w ** 2).sum() for w in y.values())

    def f(x, y, b):
        return torch.nn.functional.cross_entropy(outputs(x, y, b), (t + 1) % 3)
    return outputs, loss, reg, f, x, y


def dense_gn(outputs, loss, reg, x, y):
    keys = list(y)
    shapes = [y[k].shape for k in keys]
    flat_y = torch.cat([y[k].reshape(-1) for k in keys])

    def unflat(v):
        out, o = {}, 0
        for k, s in zip(keys, shapes):
            n = math.prod(s)
            out[k] = v[o:o + n].reshape(s)
            o += n
        return out
    J = torch.autograd.functional.jacobian(lambda v: outputs(x, unflat(v), None).reshape(-1), flat_y)
    out = outputs(x, y, None)
    HL = torch.autograd.functional.hessian(lambda o: loss(o.reshape(out.shape), x, None), out.reshape(-1))
    HR = torch.autograd.functional.hessian(lambda v: reg(x, unflat(v), None), flat_y)
    return J.T @ HL @ J + HR, flat_y, unflat


@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_gauss_newton_products_equal_the_dense_matrix(mode):
    outputs, loss, reg, f, x, y = mlp_problem()
    G, flat_y, unflat = dense_gn(outputs, loss, reg, x, y)
    lin = tb.derivatives.gauss_newton_linearize(tb.OutputLoss(outputs, loss, reg), x, y, None, mode)
    v = torch.randn(flat_y.numel(), generator=torch.Generator().manual_seed(1), dtype=DT)
    got = torch.cat([t.reshape(-1) for t in lin.hvp(unflat(v)).values()])
    torch.testing.assert_close(got, G @ v, rtol=1e-10, atol=1e-12)
    # the mixed product is the exact ∇xy g·v of the full objective
    g = tb.OutputLoss(outputs, loss, reg)
    ref = tb.derivatives.mixed(g, x, y, unflat(v), None)
    torch.testing.assert_close(lin.mixed(unflat(v))["s"], ref["s"], rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > 0             # PSD + ridge: definite


@pytest.mark.parametrize("weighted", [False, True])
def test_aid_gauss_newton_equals_the_dense_gauss_newton_hypergradient(weighted):
    outputs, loss, reg, f, x, y = mlp_problem(seed=2, weighted=weighted)
    g = tb.OutputLoss(outputs, loss, reg)
    p = tb.Bilevel(outer=f, inner=g)
    G, flat_y, unflat = dense_gn(outputs, loss, reg, x, y)
    fy = torch.cat([t.reshape(-1) for t in torch.func.grad(f, argnums=1)(x, y, None).values()])
    fx = torch.func.grad(f, argnums=0)(x, y, None)
    v = torch.linalg.solve(G, fy)
    mixed = tb.derivatives.mixed(g, x, y, unflat(v), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx, aux = tb.hypergrad(p, tb.aid(tb.cg(flat_y.numel() * 3), curvature="gauss_newton"), has_aux=True)(
            x, y, None, None)
    for k in x:
        torch.testing.assert_close(dx[k], fx[k] - mixed[k], rtol=1e-8, atol=1e-10)
    assert int(aux.solve.nonpositive_curvature) == 0


def test_gauss_newton_needs_the_declared_split_before_any_work():
    outputs, loss, reg, f, x, y = mlp_problem()
    calls = []
    g = lambda x, y, b: calls.append(1) or loss(outputs(x, y, b), x, b) + reg(x, y, b)
    with pytest.raises(ValueError, match="curvature='gauss_newton'.*OutputLoss"):
        tb.hypergrad(tb.Bilevel(outer=f, inner=g), tb.aid(tb.cg(5), curvature="gauss_newton"))
    with pytest.raises(ValueError, match="OutputLoss"):
        tb.double_loop(tb.Bilevel(outer=f, inner=g), tb.aid(tb.cg(5), curvature="gauss_newton"))
    assert calls == []


def test_output_loss_is_an_ordinary_objective():
    outputs, loss, reg, f, x, y = mlp_problem()
    g = tb.OutputLoss(outputs, loss, reg)
    assert torch.equal(g(x, y, None), loss(outputs(x, y, None), x, None) + reg(x, y, None))
    with pytest.raises(TypeError, match="outputs"):
        tb.OutputLoss(3, loss)


def test_stocbio_reports_its_series_like_a_fixed_point_solve():
    # one batch: the Neumann terms r_i = (I − ηA)^i b; the report's residual is ‖r_Q‖/‖b‖
    p, x, y, A, B, c = quadratic_problem(torch.linspace(0.5, 2.0, 8))
    Q, eta = 6, 0.3
    _, aux = tb.hypergrad(p, tb.stocbio(Q, eta), has_aux=True)(x, y, None, None)
    b = y["w"] - c
    rQ = torch.linalg.matrix_power(torch.eye(8, dtype=DT) - eta * A, Q) @ b
    assert abs(float(aux.solve.residual) - float(rQ.norm() / b.norm())) <= 1e-12
    assert int(aux.solve.nonpositive_curvature) == 0 and int(aux.solve.iterations) == Q
    p, x, y, *_ = quadratic_problem([-1.0] + [1.0] * 7)
    with pytest.warns(RuntimeWarning, match="curvature"):
        tb.hypergrad(p, tb.stocbio(Q, eta))(x, y, None, None)


def test_nystrom_rank_above_dim_y_is_refused_by_hypergrad_before_evaluating_anything():
    calls = []
    p, x, y, *_ = quadratic_problem(torch.ones(4))
    counted = tb.Bilevel(outer=lambda x, y, b: calls.append(1) or p.outer(x, y, b),
                         inner=lambda x, y, b: calls.append(1) or p.inner(x, y, b))
    with pytest.raises(ValueError, match="rank"):
        tb.hypergrad(counted, tb.aid(tb.nystrom(5, 0.1)))(x, y, None, None)
    assert calls == []


def test_nystrom_warns_on_an_indefinite_sampled_block_but_not_on_its_low_rank_residual():
    p, x, y, *_ = quadratic_problem(torch.linspace(0.5, 8.0, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, aux = tb.hypergrad(p, tb.aid(tb.nystrom(2, 1e-3)), has_aux=True)(x, y, None, None)
    assert float(aux.solve.residual) > 1.0            # rank 2 of 8: a poor fit, by design
    p, x, y, *_ = quadratic_problem([-3.0, -2.0, -1.0, -1.5] + [1.0] * 4)
    with pytest.warns(RuntimeWarning, match="curvature"):
        tb.hypergrad(p, tb.aid(tb.nystrom(8, 0.1)))(x, y, None, None)


def test_a_cg_residual_that_rises_on_a_definite_system_is_not_a_failure():
    # CG's residual is not monotone: on an ill-conditioned SPD system one step from 0
    # already ends above ‖b‖ (the demo's warm-started hyper-cleaning solves did, 13 of 100
    # steps); only its curvature test counts, so no warning
    A, b = sym(30, torch.logspace(0, 4, 30), 21)
    b = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=DT)
    v, info = solve(tb.cg(steps=1), op(A), tree(b))
    assert float(info.residual) > 1.5 * float(info.start_residual)          # measured 1.82
    true_res = (b - A @ flat(v)).norm() / b.norm()
    assert abs(float(info.residual) - float(true_res)) <= 1e-10
    assert int(info.nonpositive_curvature) == 0
    assert not bool(tb.solvers.solve_failed(info, tb.cg(steps=1)))
    assert bool(tb.solvers.solve_failed(info, tb.fixed_point(steps=1, lr=0.1)))   # there it would be a divergence


def test_a_diverging_fixed_point_warns_that_it_diverged():
    p, x, y, *_ = quadratic_problem(torch.linspace(1.0, 5.0, 8))
    with pytest.warns(RuntimeWarning, match="diverged"):
        _, aux = tb.hypergrad(p, tb.aid(tb.fixed_point(10, lr=0.6)), has_aux=True)(x, y, None, None)   # lr > 2/5
    assert float(aux.solve.residual) > float(aux.solve.start_residual)
    assert int(aux.solve.nonpositive_curvature) == 0


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_aid_reports_the_inner_loss_it_evaluated(curvature):
    outputs, loss, reg, f, x, y = mlp_problem(seed=3)
    g = tb.OutputLoss(outputs, loss, reg)
    _, aux = tb.hypergrad(tb.Bilevel(outer=f, inner=g), tb.aid(tb.cg(5), curvature=curvature),
                          has_aux=True)(x, y, None, None)
    torch.testing.assert_close(aux.inner_loss, g(x, y, None), rtol=1e-14, atol=0)
    torch.testing.assert_close(aux.outer_loss, f(x, y, None), rtol=1e-14, atol=0)
