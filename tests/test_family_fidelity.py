"""Issue 19, part 1: 20 steps of each of SOBA, MA-SOBA, MRBO, F2SA and BOME against the
paper's algorithm re-derived here from its equations, in float64, with closed-form
gradients of a stochastic quadratic (no library code in the references).

Problem (tests/test_single_loop.quadratic): batches ζ = (A, B), ψ = c, cycled in order;

    g(x, y; A, B) = ½ yᵀA y − yᵀB x:   ∇y g = Ay − Bx,  ∇x g = −Bᵀy,  ∇yy g = A,  ∇x⟨∇y g, v⟩ = −Bᵀv
    f(x, y; c)    = ½‖y − c‖² + ½ρ‖x‖²: ∇y f = y − c,  ∇x f = ρx

Each reference draws its samples in the order the library's docstring states, so the
iterates must agree to rounding (1e-12).
"""
import itertools

import pytest
import torch

import torchbilevel as tb
from test_single_loop import quadratic

DT = torch.float64
STEPS = 20
TOL = dict(rtol=1e-12, atol=1e-12)


def cycle(seq):
    return iter(itertools.cycle(seq))


def start(p=4, d=5, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p, generator=gen, dtype=DT), torch.randn(d, generator=gen, dtype=DT)


def run(algo, x0, y0, inner, outer, steps=STEPS):
    s = algo.init({"h": x0.clone()}, {"w": y0.clone()})
    it_in, it_out = cycle(inner), cycle(outer)
    states = []
    for _ in range(steps):
        s = algo.step(s, it_in, it_out)
        states.append(s)
    return states


# ------------------------------------------------------------------ F2SA (Kwon et al. 2023, Alg. 1)
def f2sa_reference(inner, outer, rho, x, y, *, lam, lr_x, lr_y, lr_z, T, shared, steps=STEPS):
    """Algorithm 1: T steps on z (γ) and y (α_k = β_k/λ_k along ∇y f + λ_k ∇y g), then x
    at the new y and z with one sample φ_x for both ∇x g terms.  ``lam(k)`` is λ_k;
    ``shared``: φ_y = φ_z (the library's default) or independent (the paper's)."""
    it_in, it_out = cycle(inner), cycle(outer)
    z, out = y.clone(), []
    for k in range(steps):
        lk = lam(k)
        alpha, gamma = lr_y(k) / lk, lr_z(k)
        for _ in range(T):
            Az, Bz = next(it_in)                                                 # φ_z
            Ay, By = (Az, Bz) if shared else next(it_in)                         # φ_y
            cy = next(it_out)                                                    # ζ_y
            z, y = z - gamma * (Az @ z - Bz @ x), y - alpha * ((y - cy) + lk * (Ay @ y - By @ x))
        (_, Bx), _ = next(it_in), next(it_out)                                   # φ_x, ζ_x (A, c unused by ∇x)
        x = x - lr_x(k) * (rho * x + lk * (-Bx.T @ y + Bx.T @ z))
        out.append((x, y, z, lk))
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("schedule", ["paper", "benchmark_bilevel"])
def test_f2sa_reproduces_algorithm_1(schedule, shared):
    prob, inner, outer, rho = quadratic(seed=11)
    x0, y0 = start()
    T = 3
    lr_x = lambda k: 0.02 / (1 + k) ** (1 / 3)
    lr_y = lambda k: 0.3 / (1 + k) ** (5 / 7)
    lr_z = lambda k: 0.3 / (1 + k) ** (4 / 7)
    if schedule == "paper":
        lam = lambda k: 4.0 * (1 + k) ** (1 / 7)                 # λ_k = λ_0 (1 + k)^(a − c)
        algo = tb.f2sa(prob, lr_x=lr_x, lr_y=lr_y, lr_z=lr_z, inner_steps=T, penalty=4.0,
                       shared_inner_sample=shared)
    else:
        lams = [1.0]                                              # λ_{k+1} = λ_k + δ/(k + 1)^(1/7)
        for k in range(STEPS):
            lams.append(lams[-1] + 0.1 / (k + 1) ** (1 / 7))
        lam = lams.__getitem__
        algo = tb.f2sa(prob, lr_x=lr_x, lr_y=lr_y, lr_z=lr_z, inner_steps=T, penalty_schedule=schedule,
                       shared_inner_sample=shared)
    ref = f2sa_reference(inner, outer, rho, x0, y0, lam=lam, lr_x=lr_x, lr_y=lr_y, lr_z=lr_z, T=T, shared=shared)
    states = run(algo, x0, y0, inner, outer)
    for k, (s, (x, y, z, lk)) in enumerate(zip(states, ref)):
        torch.testing.assert_close(s.x["h"], x, **TOL)
        torch.testing.assert_close(s.y["w"], y, **TOL)
        torch.testing.assert_close(s.z["w"], z, **TOL)
        assert s.lam == pytest.approx(lam(k + 1), rel=1e-15)     # the λ of the next step
    assert states[-1].step == STEPS


def test_f2sa_updates_x_at_the_new_inner_iterates_not_the_old():
    # one outer step from x_0 with T = 1: x_1 uses ∇x g at (y_1, z_1), not at (y_0, z_0)
    prob, inner, outer, rho = quadratic(seed=12)
    x0, y0 = start(seed=3)
    algo = tb.f2sa(prob, lr_x=0.1, lr_y=0.5, lr_z=0.5, inner_steps=1, penalty=2.0)
    s = algo.step(algo.init({"h": x0}, {"w": y0}), inner[0], outer[0])
    (A, B), c = inner[0], outer[0]
    z1 = y0 - 0.5 * (A @ y0 - B @ x0)
    y1 = y0 - 0.25 * ((y0 - c) + 2.0 * (A @ y0 - B @ x0))
    new = x0 - 0.1 * (rho * x0 + 2.0 * (-B.T @ y1 + B.T @ z1))
    old = x0 - 0.1 * (rho * x0)                                   # at y_0 = z_0 the penalty term is 0
    torch.testing.assert_close(s.x["h"], new, **TOL)
    assert (s.x["h"] - old).norm() > 1e-3


# ------------------------------------------------------------------ SOBA (Dagréou et al. 2022)
def soba_reference(inner, outer, rho, x, y, *, lr_x, lr_y, lr_v, steps=STEPS):
    """SOBA with the paper's sign: v solves ∇yy g·v = −∇y f; D_y = ∇y g, D_v = ∇yy g·v + ∇y f,
    D_x = ∇xy g·v + ∇x f, all at the current iterate.  Samples as the library draws them:
    ζ for D_y, then ψ (inner) and c (outer) for D_v and D_x."""
    it_in, it_out = cycle(inner), cycle(outer)
    v, out = torch.zeros_like(y), []
    for t in range(steps):
        (Az, Bz), (Ap, Bp), c = next(it_in), next(it_in), next(it_out)
        d_y, d_v, d_x = Az @ y - Bz @ x, Ap @ v + (y - c), -Bp.T @ v + rho * x
        y, v, x = y - lr_y(t) * d_y, v - lr_v(t) * d_v, x - lr_x(t) * d_x
        out.append((x, y, v))
    return out


def test_soba_reproduces_the_paper_with_v_of_opposite_sign():
    prob, inner, outer, rho = quadratic(seed=13)
    x0, y0 = start()
    kw = dict(lr_x=lambda t: 0.1 / (1 + t) ** 0.5, lr_y=lambda t: 0.3 / (1 + t) ** 0.5, lr_v=lambda t: 0.25)
    states = run(tb.soba(prob, **kw), x0, y0, inner, outer)
    for s, (x, y, v) in zip(states, soba_reference(inner, outer, rho, x0, y0, **kw)):
        torch.testing.assert_close(s.x["h"], x, **TOL)
        torch.testing.assert_close(s.y["w"], y, **TOL)
        torch.testing.assert_close(s.v["w"], -v, **TOL)           # ours solves ∇yy g·v = +∇y f


# ------------------------------------------------------------------ MA-SOBA (Chen, Xiao, Balasubramanian 2023, Alg. 1)
def ma_soba_reference(inner, outer, rho, x, y, *, lr_x, lr_y, lr_v, theta, steps=STEPS):
    """y, z as SOBA (z ≈ [∇yy g]⁻¹∇y f); x_{k+1} = x_k − α h_k, then h_{k+1} = (1 − θ)h_k + θ D_k
    with D_k = ∇x f − ∇xy g·z_k at (x_k, y_k); h_0 = D_0."""
    it_in, it_out = cycle(inner), cycle(outer)
    z, h, out = torch.zeros_like(y), None, []
    for k in range(steps):
        (Az, Bz), (Ap, Bp), c = next(it_in), next(it_in), next(it_out)
        D = rho * x + Bp.T @ z                                    # ∇x f − (−Bᵀ z)
        if h is None:
            h = D
        y_new, z_new = y - lr_y * (Az @ y - Bz @ x), z - lr_v * (Ap @ z - (y - c))
        x = x - lr_x * h                                          # along the average so far
        h = (1 - theta) * h + theta * D                           # then D_k enters it
        y, z = y_new, z_new
        out.append((x, y, z, h))
    return out


def test_ma_soba_reproduces_algorithm_1():
    prob, inner, outer, rho = quadratic(seed=14)
    x0, y0 = start()
    kw = dict(lr_x=0.05, lr_y=0.25, lr_v=0.25)
    states = run(tb.ma_soba(prob, momentum=0.8, **kw), x0, y0, inner, outer)
    ref = ma_soba_reference(inner, outer, rho, x0, y0, theta=0.2, **kw)
    for s, (x, y, z, h) in zip(states, ref):
        torch.testing.assert_close(s.x["h"], x, **TOL)
        torch.testing.assert_close(s.y["w"], y, **TOL)
        torch.testing.assert_close(s.v["w"], z, **TOL)
        torch.testing.assert_close(s.h_f, h, **TOL)


def test_ma_soba_radius_projects_v():
    prob, inner, outer, rho = quadratic(seed=14)
    x0, y0 = start()
    states = run(tb.ma_soba(prob, lr_x=0.05, lr_y=0.25, lr_v=0.25, radius=0.05), x0, y0, inner, outer, steps=5)
    assert all(float(s.v["w"].norm()) <= 0.05 * (1 + 1e-12) for s in states)
    assert int(states[-1].ball_hits) > 0


# ------------------------------------------------------------------ MRBO (Yang, Ji, Liang 2021, Alg. 1)
def neumann_hypergrad(x, y, c, samples, DG, rho, eta):
    """∇̂Φ = ∇x f − ∇xy g(D_G)·η Σ_{q=−1}^{Q−1} Π_{j=Q−q}^{Q} (I − η∇yy g(B_j)) ∇y f, with the
    paper's B_j the (Q + 1 − j)-th sample drawn (``samples`` in draw order)."""
    Q = len(samples)
    B_paper = {j: samples[Q - j][0] for j in range(1, Q + 1)}     # j -> A of B_j
    fy, acc = y - c, torch.zeros_like(y)
    for q in range(-1, Q):
        r = fy
        for j in range(Q, Q - q - 1, -1):                         # M_{Q−q} ··· M_Q r: M_Q first
            r = r - eta * B_paper[j] @ r
        acc = acc + r
    return rho * x - (-DG[1].T @ (eta * acc))


def mrbo_reference(inner, outer, rho, x, y, *, lr_x, lr_y, a_y, b_x, Q, eta, steps=STEPS):
    """u_0 = ∇y g(z_0), v_0 = ∇̂Φ(z_0); then x_{k+1} = x_k − η_x v_k, y_{k+1} = y_k − η_y u_k,
    u_{k+1} = ∇y g(z_{k+1}) + (1 − α)(u_k − ∇y g(z_k)), v_{k+1} likewise with β, both terms
    on one fresh sample.  Samples per step: ζ, D_F (outer), B's and D_G (inner)."""
    it_in, it_out = cycle(inner), cycle(outer)

    def draw():
        zeta, c = next(it_in), next(it_out)
        S = [next(it_in) for _ in range(Q)]
        return zeta, c, S, next(it_in)

    zeta, c, S, DG = draw()
    u = zeta[0] @ y - zeta[1] @ x
    v = neumann_hypergrad(x, y, c, S, DG, rho, eta)
    out = []
    for k in range(steps):
        x_new, y_new = x - lr_x * v, y - lr_y * u
        out.append((x_new, y_new))
        if k == steps - 1:
            break
        zeta, c, S, DG = draw()
        (A, B) = zeta
        u = (A @ y_new - B @ x_new) + (1 - a_y) * (u - (A @ y - B @ x))
        v = (neumann_hypergrad(x_new, y_new, c, S, DG, rho, eta)
             + (1 - b_x) * (v - neumann_hypergrad(x, y, c, S, DG, rho, eta)))
        x, y = x_new, y_new
    return out


def test_mrbo_reproduces_algorithm_1():
    prob, inner, outer, rho = quadratic(seed=15)
    x0, y0 = start()
    Q, eta = 3, 0.2
    algo = tb.mrbo(prob, lr_x=0.05, lr_y=0.2, eta_x=0.3, eta_y=0.6, neumann_steps=Q, eta=eta)
    states = run(algo, x0, y0, inner, outer)
    ref = mrbo_reference(inner, outer, rho, x0, y0, lr_x=0.05, lr_y=0.2, a_y=0.6, b_x=0.3, Q=Q, eta=eta)
    for s, (x, y) in zip(states, ref):
        torch.testing.assert_close(s.x["h"], x, **TOL)
        torch.testing.assert_close(s.y["w"], y, **TOL)


def test_mrbo_neumann_step_does_not_follow_a_decaying_lr_y():
    # default eta: lr_y at t = 0, held constant (benchmark_bilevel's hia_lr), whatever lr_y's schedule
    prob, inner, outer, rho = quadratic(seed=16)
    x0, y0 = start()
    lr_y = lambda t: 0.2 / (1 + t) ** (1 / 3)
    a = tb.mrbo(prob, lr_x=0.05, lr_y=lr_y, eta_x=0.5, eta_y=0.5, neumann_steps=3)
    b = tb.mrbo(prob, lr_x=0.05, lr_y=lr_y, eta_x=0.5, eta_y=0.5, neumann_steps=3, eta=0.2)
    for s, r in zip(run(a, x0, y0, inner, outer, steps=6), run(b, x0, y0, inner, outer, steps=6)):
        assert torch.equal(s.xf, r.xf) and torch.equal(s.yf, r.yf)


# ------------------------------------------------------------------ BOME (Liu et al. 2022)
def bome_reference(inner, outer, rho, x, y, *, lr, lr_inner, T, eta, rule="grad_norm", steps=STEPS):
    """θ_0 = y_k, T steps θ ← θ − γ∇y g(x_k, θ); ∇q̂ = (∇x g(x, y) − ∇x g(x, θ_T), ∇y g(x, y));
    φ = η‖∇q̂‖² (or η q̂); λ = max(φ − ⟨∇f, ∇q̂⟩, 0)/‖∇q̂‖²; (x, y) ← (x, y) − ξ(∇f + λ∇q̂).
    Samples: one per path step, then ζ (inner) and c (outer)."""
    it_in, it_out = cycle(inner), cycle(outer)
    out = []
    for _ in range(steps):
        th = y
        for _ in range(T):
            A, B = next(it_in)
            th = th - lr_inner * (A @ th - B @ x)
        (A, B), c = next(it_in), next(it_out)
        qx, qy = -B.T @ y + B.T @ th, A @ y - B @ x
        fx, fy = rho * x, y - c
        n2 = qx @ qx + qy @ qy
        gval = lambda w: 0.5 * w @ A @ w - w @ B @ x
        phi = eta * (n2 if rule == "grad_norm" else gval(y) - gval(th))
        lam = max(float(phi - (fx @ qx + fy @ qy)), 0.0) / float(n2)
        x, y = x - lr * (fx + lam * qx), y - lr * (fy + lam * qy)
        out.append((x, y, lam))
    return out


@pytest.mark.parametrize("eta,rule", [(0.5, "grad_norm"), (5.0, "grad_norm"), (2.0, "value")])
def test_bome_reproduces_the_paper_including_eta_above_one(eta, rule):
    prob, inner, outer, rho = quadratic(seed=17)
    x0, y0 = start()
    algo = tb.bome(prob, lr_x=0.03, lr_y=0.03, lr_inner=0.3, inner_steps=4, phi=eta, phi_rule=rule)
    states = run(algo, x0, y0, inner, outer)
    ref = bome_reference(inner, outer, rho, x0, y0, lr=0.03, lr_inner=0.3, T=4, eta=eta, rule=rule)
    for s, (x, y, lam) in zip(states, ref):
        torch.testing.assert_close(s.x["h"], x, **TOL)
        torch.testing.assert_close(s.y["w"], y, **TOL)
        assert float(s.lam) == pytest.approx(lam, rel=1e-10, abs=1e-12)
    assert any(lam > 0 for _, _, lam in ref)                     # the barrier was active


def test_new_options_check_their_arguments():
    prob, _, _, _ = quadratic()
    kw = dict(lr_x=0.1, lr_y=0.1, lr_z=0.1)
    with pytest.raises(TypeError, match="shared_inner_sample"):
        tb.f2sa(prob, shared_inner_sample=1, **kw)
    with pytest.raises(ValueError, match="penalty"):
        tb.f2sa(prob, penalty=lambda k: 1.0, penalty_schedule="benchmark_bilevel", **kw)
    with pytest.raises(ValueError, match="penalty_step"):
        tb.f2sa(prob, penalty_schedule="benchmark_bilevel", penalty_step=-1.0, **kw)
    with pytest.raises(TypeError, match="phi"):
        tb.bome(prob, lr_x=0.1, lr_y=0.1, phi="5")
    algo = tb.bome(prob, lr_x=0.1, lr_y=0.1, phi=lambda t: -1.0)         # a schedule is checked per step
    x0, y0 = start()
    with pytest.raises(ValueError, match=r"phi\(0\)"):
        algo.step(algo.init({"h": x0}, {"w": y0}), (torch.eye(5, dtype=DT), torch.ones(5, 4, dtype=DT)),
                  torch.zeros(5, dtype=DT))
