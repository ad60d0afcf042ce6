"""torchbilevel.solvers: CG and fixed point on random SPD systems against torch.linalg.solve
and the closed forms of their iterates."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchbilevel as tb
from torchbilevel.solvers import solve

DT = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


def spd(n, cond, seed, distinct=None):
    """A random n×n SPD matrix with eigenvalues log-spaced in [1, cond] (float64).
    ``distinct``: only that many distinct eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    k = n if distinct is None else distinct
    lam = torch.logspace(0, math.log10(cond), k, dtype=DT) if k > 1 else torch.ones(1, dtype=DT)
    lam = lam[torch.arange(n) % k]
    b = torch.randn(n, generator=gen, dtype=DT)
    return q @ torch.diag(lam) @ q.T, b, lam


def as_tree(vec):
    """Split a vector into a two-entry dict (a matrix-shaped part and the rest)."""
    n = vec.shape[0]
    k = n // 2
    return {"head": vec[:k].reshape(k, 1), "tail": vec[k:]}


def as_vec(tree):
    return torch.cat([tree["head"].reshape(-1), tree["tail"]])


def operator(A, counter=None):
    def matvec(v):
        if counter is not None:
            counter.append(1)
        return as_tree(A @ as_vec(v))
    return matvec


@SETTINGS
@given(st.integers(1, 12), st.floats(1.0, 10.0), st.integers(0, 10**6))
def test_cg_exact_in_n_steps(n, cond, seed):
    # exact arithmetic terminates in n steps; in float64 that holds to ~1e-14 for a
    # well-conditioned spectrum (spread spectra lose orthogonality: next test)
    A, b, _ = spd(n, cond, seed)
    v, _ = solve(tb.cg(steps=n), operator(A), as_tree(b))
    ref = torch.linalg.solve(A, b)
    assert (as_vec(v) - ref).norm() <= 1e-10 * ref.norm()


@SETTINGS
@given(st.integers(1, 12), st.floats(1.0, 1e3), st.integers(0, 10**6))
def test_cg_ill_conditioned_converges_with_extra_steps(n, cond, seed):
    A, b, _ = spd(n, cond, seed)
    v, _ = solve(tb.cg(steps=3 * n), operator(A), as_tree(b))
    ref = torch.linalg.solve(A, b)
    assert torch.isfinite(as_vec(v)).all()
    assert (as_vec(v) - ref).norm() <= 1e-9 * ref.norm()


@SETTINGS
@given(st.integers(2, 12), st.integers(1, 3), st.integers(0, 10**6))
def test_cg_exact_in_as_many_steps_as_distinct_eigenvalues(n, k, seed):
    A, b, _ = spd(n, 10.0, seed, distinct=min(k, n))
    v, _ = solve(tb.cg(steps=min(k, n)), operator(A), as_tree(b))
    torch.testing.assert_close(as_vec(v), torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)


@SETTINGS
@given(st.integers(3, 10), st.integers(1, 2), st.integers(0, 10**6))
def test_cg_iterates_minimise_energy_over_krylov_space(n, k, seed):
    # After k < n steps from 0, CG's iterate is the A-orthogonal projection of A⁻¹b on the
    # Krylov space span{b, Ab, ..., A^{k-1} b}: v_k = K (Kᵀ A K)⁻¹ Kᵀ b.
    A, b, _ = spd(n, 20.0, seed)
    K, _ = torch.linalg.qr(torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(k)], 1))
    ref = K @ torch.linalg.solve(K.T @ A @ K, K.T @ b)
    v, _ = solve(tb.cg(steps=k), operator(A), as_tree(b))
    torch.testing.assert_close(as_vec(v), ref, rtol=1e-8, atol=1e-10)


@SETTINGS
@given(st.integers(1, 10), st.floats(1.0, 100.0), st.integers(1, 40), st.floats(0.1, 1.9),
       st.integers(0, 10**6))
def test_fixed_point_iterates_match_closed_form(n, cond, steps, rel_lr, seed):
    # From v0 = 0, K Richardson steps give v_K = (I − (I − lr A)^K) A⁻¹ b.
    A, b, lam = spd(n, cond, seed)
    lr = rel_lr / lam.max().item()
    v, _ = solve(tb.fixed_point(steps=steps, lr=lr), operator(A), as_tree(b))
    E = torch.linalg.matrix_power(torch.eye(n, dtype=DT) - lr * A, steps)
    ref = (torch.eye(n, dtype=DT) - E) @ torch.linalg.solve(A, b)
    torch.testing.assert_close(as_vec(v), ref, rtol=1e-9, atol=1e-11)


@SETTINGS
@given(st.integers(1, 8), st.floats(1.0, 10.0), st.floats(0.2, 1.9), st.integers(0, 10**6))
def test_fixed_point_converges_below_two_over_lmax(n, cond, rel_lr, seed):
    A, b, lam = spd(n, cond, seed)
    lr = rel_lr / lam.max().item()
    rate = max(abs(1 - lr * lam.min().item()), abs(1 - lr * lam.max().item()))
    steps = 1 if rate < 1e-12 else min(5000, max(1, math.ceil(math.log(1e-12) / math.log(rate))))
    v, _ = solve(tb.fixed_point(steps=steps, lr=lr), operator(A), as_tree(b))
    ref = torch.linalg.solve(A, b)
    torch.testing.assert_close(as_vec(v), ref, rtol=1e-8, atol=1e-8 * ref.norm().item())


def test_fixed_point_diverges_above_two_over_lmax():
    A, b, lam = spd(5, 4.0, 0)
    v, _ = solve(tb.fixed_point(steps=200, lr=2.2 / lam.max().item()), operator(A), as_tree(b))
    assert as_vec(v).norm() > 1e3 * torch.linalg.solve(A, b).norm()


@pytest.mark.parametrize("solver", [tb.cg(steps=7), tb.cg(steps=30), tb.fixed_point(steps=30, lr=0.1)])
def test_zero_rhs_stays_zero_and_finite(solver):
    A, _, _ = spd(5, 50.0, 1)
    b = as_tree(torch.zeros(5, dtype=DT))
    v, _ = solve(solver, operator(A), b)
    assert torch.equal(as_vec(v), torch.zeros(5, dtype=DT))


@pytest.mark.parametrize("n,steps", [(1, 5), (3, 10), (6, 50)])
def test_cg_more_steps_than_dimension_stays_finite_and_exact(n, steps):
    A, b, _ = spd(n, 100.0, n)
    v, _ = solve(tb.cg(steps=steps), operator(A), as_tree(b))
    assert torch.isfinite(as_vec(v)).all()
    torch.testing.assert_close(as_vec(v), torch.linalg.solve(A, b), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("solver", [tb.cg(steps=5), tb.fixed_point(steps=5, lr=0.05)])
def test_warm_start_at_solution_stays(solver):
    A, b, _ = spd(6, 10.0, 2)
    exact = torch.linalg.solve(A, b)
    v, _ = solve(solver, operator(A), as_tree(b), v0=as_tree(exact))
    torch.testing.assert_close(as_vec(v), exact, rtol=1e-12, atol=1e-12)


def test_warm_start_improves_cg():
    A, b, _ = spd(10, 100.0, 3)
    exact = torch.linalg.solve(A, b)
    near = exact + 1e-3 * torch.ones(10, dtype=DT)
    cold = as_vec(solve(tb.cg(steps=2), operator(A), as_tree(b))[0])
    warm = as_vec(solve(tb.cg(steps=2), operator(A), as_tree(b), v0=as_tree(near))[0])
    assert (warm - exact).norm() < 0.1 * (cold - exact).norm()


def test_solve_does_not_modify_inputs():
    A, b, _ = spd(4, 5.0, 4)
    bt, v0 = as_tree(b.clone()), as_tree(torch.ones(4, dtype=DT))
    b_copy, v0_copy = as_vec(bt).clone(), as_vec(v0).clone()
    for s in (tb.cg(steps=3), tb.fixed_point(steps=3, lr=0.1)):
        solve(s, operator(A), bt, v0=v0)
    assert torch.equal(as_vec(bt), b_copy) and torch.equal(as_vec(v0), v0_copy)


@pytest.mark.parametrize("solver", [tb.cg(steps=200, tol=1e-6), tb.fixed_point(steps=2000, lr=0.15, tol=1e-6)])
def test_tol_stops_early(solver):
    A, b, _ = spd(8, 5.0, 5)
    calls = []
    v, _ = solve(solver, operator(A, calls), as_tree(b))
    assert len(calls) < solver.steps // 4
    res = (b - A @ as_vec(v)).norm()
    assert res <= 1e-6 * b.norm() * 1.0001
    # without the tolerance every step runs
    calls_fixed = []
    solve(solver._replace(tol=None), operator(A, calls_fixed), as_tree(b))
    assert len(calls_fixed) >= solver.steps


def test_solve_rejects_non_solver_and_mismatched_v0():
    A, b, _ = spd(4, 5.0, 6)
    with pytest.raises(TypeError, match="solver"):
        solve({"steps": 3}, operator(A), as_tree(b))
    with pytest.raises(ValueError, match="v0"):
        solve(tb.cg(steps=3), operator(A), as_tree(b), v0={"other": torch.zeros(4, dtype=DT)})


def test_solver_configs():
    assert (tb.cg(steps=3).steps, tb.cg(steps=3).tol) == (3, None)
    assert tb.cg().steps >= 1
    s = tb.fixed_point(steps=4, lr=0.5, tol=1e-3)
    assert (s.steps, s.lr, s.tol) == (4, 0.5, 1e-3)
