"""FdeHBO and FMBO (Alg. 1-2 of the FdeHBO paper): against a hand-written float64
reference of eq. (6), (12), (13), a closed-form minimiser, and real data."""
import itertools
import math

import pytest
import torch

import torchbilevel as tb

DT = torch.float64


def quadratic(seed=0, p=4, d=5, n_batches=6, rho=0.5):
    """Stochastic quadratic bilevel problem with exact derivatives.

    g(x, y; (A, B)) = ½ yᵀA y − yᵀB x,   f(x, y; c) = ½‖y − c‖² + ½ρ‖x‖².
    """
    gen = torch.Generator().manual_seed(seed)
    inner, outer = [], []
    for _ in range(n_batches):
        q = torch.randn(d, d, generator=gen, dtype=DT)
        inner.append((q @ q.T / d + torch.eye(d, dtype=DT), torch.randn(d, p, generator=gen, dtype=DT)))
        outer.append(torch.randn(d, generator=gen, dtype=DT))

    def g(x, y, b):
        A, B = b
        return 0.5 * y["w"] @ A @ y["w"] - y["w"] @ B @ x["h"]

    def f(x, y, c):
        r = y["w"] - c
        return 0.5 * r @ r + 0.5 * rho * x["h"] @ x["h"]

    return tb.Bilevel(f, g), inner, outer, rho


def closed_form_minimiser(inner, outer, rho):
    """x* of the full-batch problem: y*(x) = Ā⁻¹B̄x, Φ(x) = ½‖Mx − c̄‖² + ½ρ‖x‖² (up to a constant)."""
    A = sum(a for a, _ in inner) / len(inner)
    B = sum(b for _, b in inner) / len(inner)
    c = sum(outer) / len(outer)
    M = torch.linalg.solve(A, B)
    return torch.linalg.solve(M.T @ M + rho * torch.eye(M.shape[1], dtype=DT), M.T @ c)


def mean_problem(prob, inner, outer):
    A = sum(a for a, _ in inner) / len(inner)
    B = sum(b for _, b in inner) / len(inner)
    return (A, B), sum(outer) / len(outer)


def cycle(seq):
    return iter(itertools.cycle(seq))


def reference_fmbo(inner, outer, rho, x0, y0, steps, lr_x, lr_y, lr_v, eta_x, eta_y, eta_v, radius):
    """Alg. 2 of the FdeHBO paper written out with dense products, same draw order as the
    library (ζ, ψ from the inner stream, ψ's outer part from the outer stream)."""
    it_in, it_out = cycle(inner), cycle(outer)
    x, y, v = x0.clone(), y0.clone(), torch.zeros_like(y0)
    xp = yp = vp = None
    hg = hR = hf = None
    for t in range(steps):
        (Az, Bz), (Ap, Bp), c = next(it_in), next(it_in), next(it_out)
        gy = lambda x_, y_: Az @ y_ - Bz @ x_                     # ∇y g(·; ζ)
        R = lambda x_, y_, v_: Ap @ v_ - (y_ - c)                  # eq. (5): ∇yy g v − ∇y f
        F = lambda x_, y_, v_: rho * x_ + Bp.T @ v_                # eq. (3): ∇x f − ∇xy g v
        if t == 0:
            hg, hR, hf = gy(x, y), R(x, y, v), F(x, y, v)
        else:
            hg = eta_y * gy(x, y) + (1 - eta_y) * (hg + gy(x, y) - gy(xp, yp))          # eq. (6)
            hR = eta_v * R(x, y, v) + (1 - eta_v) * (hR + R(x, y, v) - R(xp, yp, vp))  # eq. (12), on h^R
            hf = eta_x * F(x, y, v) + (1 - eta_x) * (hf + F(x, y, v) - F(xp, yp, vp))  # eq. (13)
        xp, yp, vp = x, y, v
        y = y - lr_y * hg
        w = v - lr_v * hR
        v = w * min(1.0, radius / max(w.norm().item(), 1e-300))                        # line 6
        x = x - lr_x * hf
    return x, y, v


COMMON = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2, eta_x=0.3, eta_y=0.6, eta_v=0.45)


@pytest.mark.parametrize("radius", [100.0, 0.3])
def test_fmbo_matches_handwritten_algorithm_2(radius):
    prob, inner, outer, rho = quadratic()
    x0, y0 = torch.randn(4, dtype=DT), torch.randn(5, dtype=DT)
    algo = tb.fmbo(prob, radius=radius, backend="torch", **COMMON)
    s = algo.init({"h": x0}, {"w": y0})
    it_in, it_out = cycle(inner), cycle(outer)
    for _ in range(7):
        s = algo.step(s, it_in, it_out)
    xr, yr, vr = reference_fmbo(inner, outer, rho, x0, y0, 7, radius=radius, **COMMON)
    torch.testing.assert_close(s.x["h"], xr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.y["w"], yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.v["w"], vr, rtol=1e-10, atol=1e-12)
    assert s.v["w"].norm() <= radius * (1 + 1e-12)


def test_fdehbo_equals_fmbo_on_quadratic_inner_problem():
    # For g quadratic in y the central differences of eq. (9), (11) are exact, so the
    # Hessian-free trajectory must equal the exact-product one up to rounding.
    prob, inner, outer, _ = quadratic(seed=1)
    x0, y0 = {"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)}
    runs = []
    for algo in (tb.fdehbo(prob, radius=2.0, **COMMON), tb.fmbo(prob, radius=2.0, **COMMON)):
        s = algo.init(x0, y0)
        it_in, it_out = cycle(inner), cycle(outer)
        for _ in range(10):
            s = algo.step(s, it_in, it_out)
        runs.append(s)
    torch.testing.assert_close(runs[0].x["h"], runs[1].x["h"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(runs[0].y["w"], runs[1].y["w"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("ctor,eta", [(tb.fdehbo, 1.0), (tb.fdehbo, 0.5), (tb.fmbo, 0.5)])
def test_deterministic_convergence_to_closed_form(ctor, eta):
    prob, inner, outer, rho = quadratic(seed=2)
    batch_in, batch_out = mean_problem(prob, inner, outer)
    xstar = closed_form_minimiser(inner, outer, rho)
    algo = ctor(prob, lr_x=0.2, lr_y=0.3, lr_v=0.3, eta_x=eta, eta_y=eta, eta_v=eta, radius=50.0)
    s = algo.init({"h": torch.zeros(4, dtype=DT)}, {"w": torch.zeros(5, dtype=DT)})
    for _ in range(600):
        s = algo.step(s, batch_in, batch_out)
    assert (s.x["h"] - xstar).norm() < 1e-6 * (1 + xstar.norm())


def test_stochastic_fdehbo_with_momentum_approaches_minimiser():
    # Minibatches drawn at random, Theorem 1's schedule (α_t ∝ (w+t)^{-1/3}, η ∝ α²):
    # the averaged iterate gets within a noise ball of x* (relative error 1 at the start).
    prob, inner, outer, rho = quadratic(seed=3, n_batches=8)
    xstar = closed_form_minimiser(inner, outer, rho)
    algo = tb.fdehbo(prob, radius=50.0, **tb.schedules.theorem1(w=4.0, scale=0.1, c_eta_f=0.5, c_eta_r=0.5,
                                                                c_eta_g=0.5))
    s = algo.init({"h": torch.zeros(4, dtype=DT)}, {"w": torch.zeros(5, dtype=DT)})
    gen = torch.Generator().manual_seed(0)
    rand_in = iter(lambda: inner[torch.randint(len(inner), (1,), generator=gen).item()], None)
    rand_out = iter(lambda: outer[torch.randint(len(outer), (1,), generator=gen).item()], None)
    avg, n = torch.zeros(4, dtype=DT), 0
    for k in range(1200):
        s = algo.step(s, rand_in, rand_out)
        if k >= 400:
            avg, n = avg + s.x["h"], n + 1
    assert (avg / n - xstar).norm() < 0.35 * xstar.norm()


def test_first_step_uses_plain_gradients_and_draw_counts():
    prob, inner, outer, _ = quadratic()
    calls = {"in": 0, "out": 0}

    def stream(seq, key):
        for item in itertools.cycle(seq):
            calls[key] += 1
            yield item

    x0, y0 = {"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)}
    algo = tb.fdehbo(prob, radius=10.0, **COMMON)
    s = algo.init(x0, y0)
    s1 = algo.step(s, stream(inner, "in"), stream(outer, "out"))
    assert calls == {"in": 2, "out": 1}        # ζ and ψ from the inner stream, ψ's outer part
    A, B = inner[0]
    torch.testing.assert_close(s1.h_g, A @ y0["w"] - B @ x0["h"])   # h^g_0 = ∇y g(x0, y0; ζ0)
    calls.update({"in": 0, "out": 0})
    algo2 = tb.fdehbo(prob, radius=10.0, independent_outer_sample=True, **COMMON)
    algo2.step(algo2.init(x0, y0), stream(inner, "in"), stream(outer, "out"))
    assert calls == {"in": 3, "out": 2}


def test_projection_keeps_v_in_ball_and_state_is_not_modified():
    prob, inner, outer, _ = quadratic()
    algo = tb.fdehbo(prob, radius=0.05, **COMMON)
    s = algo.init({"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)})
    it_in, it_out = cycle(inner), cycle(outer)
    for _ in range(20):
        before = [t.clone() for t in s if isinstance(t, torch.Tensor)]
        s_new = algo.step(s, it_in, it_out)
        after = [t for t in s if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert s_new.v["w"].norm() <= 0.05 * (1 + 1e-9)
        s = s_new


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_checkpoint_resume_is_bit_identical(tmp_path, ctor):
    prob, inner, outer, _ = quadratic()
    algo = ctor(prob, radius=3.0, **COMMON)
    x0, y0 = {"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)}
    s = algo.init(x0, y0)
    it_in, it_out = cycle(inner), cycle(outer)
    for _ in range(5):
        s = algo.step(s, it_in, it_out)
    torch.save(algo.state_dict(s), tmp_path / "ckpt.pt")
    straight = s
    for _ in range(5):
        straight = algo.step(straight, it_in, it_out)
    resumed = algo.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    it_in, it_out = cycle(inner), cycle(outer)
    for _ in range(5):           # the streams restart: skip what the first 5 steps drew
        next(it_in), next(it_in), next(it_out)
    for _ in range(5):
        resumed = algo.step(resumed, it_in, it_out)
    for a, b in zip(straight, resumed):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kw,bad", [("radius", 0.0), ("radius", -1.0), ("delta", 0.0), ("eta_x", 1.5),
                                    ("eta_v", -0.1), ("lr_x", 0.0), ("lr_y", -1.0), ("lr_v", float("nan"))])
def test_bad_hyperparameters_raise_at_construction(kw, bad):
    prob, _, _, _ = quadratic()
    args = dict(COMMON, radius=1.0)
    args[kw] = bad
    with pytest.raises(ValueError, match=kw):
        tb.fdehbo(prob, **args)


def test_fmbo_takes_no_delta_and_backend_is_checked():
    prob, _, _, _ = quadratic()
    with pytest.raises(TypeError):
        tb.fmbo(prob, radius=1.0, delta=1e-3, **COMMON)
    with pytest.raises(ValueError, match="backend"):
        tb.fdehbo(prob, radius=1.0, backend="cuda", **COMMON)


def test_nan_in_a_step_raises_and_leaves_state_usable():
    prob, inner, outer, _ = quadratic()
    algo = tb.fdehbo(prob, radius=1.0, **COMMON)
    s = algo.init({"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)})
    s = algo.step(s, inner[0], outer[0])
    snapshot = [t.clone() for t in s if isinstance(t, torch.Tensor)]
    bad_outer = torch.full((5,), float("nan"), dtype=DT)
    with pytest.raises(FloatingPointError, match="outer gradient"):
        algo.step(s, inner[0], bad_outer)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [t for t in s if isinstance(t, torch.Tensor)]))
    algo.step(s, inner[0], outer[0])      # the old state still steps


def test_fdehbo_reduces_true_validation_loss_of_weight_decay_on_real_data():
    # Per-feature weight decay (the stocBiO paper's 20 Newsgroup problem) on breast_cancer:
    # x = log weight decay per feature, y = logistic regression; Φ evaluated at an
    # accurately solved y*(x) (the true validation loss), not at the iterate.
    datasets = pytest.importorskip("sklearn.datasets")
    X, lab = datasets.load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    lab = torch.tensor(lab, dtype=torch.float64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:300], perm[300:]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def g(x, y, b):
        return bce(X[tr] @ y["w"], lab[tr]) + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()

    def f(x, y, b):
        return bce(X[va] @ y["w"], lab[va])

    prob = tb.Bilevel(f, g)

    def true_val_loss(x):
        y = {"w": torch.zeros(30, dtype=torch.float64)}
        for _ in range(60):   # Newton on the strongly convex inner problem
            gr = torch.func.grad(g, argnums=1)(x, y, None)["w"]
            H = torch.func.hessian(lambda w: g(x, {"w": w}, None))(y["w"])
            y = {"w": y["w"] - torch.linalg.solve(H, gr)}
        return f(x, y, None).item()

    x0 = {"lam": torch.full((30,), 0.0, dtype=torch.float64)}
    algo = tb.fdehbo(prob, lr_x=0.5, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=100.0)
    s = algo.init(x0, {"w": torch.zeros(30, dtype=torch.float64)})
    for _ in range(300):
        s = algo.step(s, None, None)
    start, end = true_val_loss(x0), true_val_loss(s.x)
    assert math.isfinite(end) and end < 0.85 * start


@pytest.mark.parametrize("ctor", [tb.fdehbo])
def test_vmapped_evaluations_equal_the_loop(ctor):
    # batched=True: the ± points of eq. (9), (11) in one vmap over the sign; False: two calls
    prob, inner, outer, _ = quadratic(seed=4)
    x0, y0 = {"h": torch.randn(4, dtype=DT)}, {"w": torch.randn(5, dtype=DT)}
    runs = []
    for batched in (False, True):
        algo = ctor(prob, radius=2.0, batched=batched, **COMMON)
        s = algo.init(x0, y0)
        it_in, it_out = cycle(inner), cycle(outer)
        for _ in range(4):
            s = algo.step(s, it_in, it_out)
        runs.append(s)
    torch.testing.assert_close(runs[0].xf, runs[1].xf, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(runs[0].vf, runs[1].vf, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_triton_backend_trajectory_equals_torch_backend(ctor):
    # Runs the Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors.
    pytest.importorskip("triton")
    from torchbilevel import kernels
    prob, inner, outer, _ = quadratic(seed=5)
    x0 = {"h": torch.randn(4, dtype=DT).float()}
    y0 = {"w": torch.randn(5, dtype=DT).float()}
    f32 = lambda b: tuple(t.float() for t in b) if isinstance(b, tuple) else b.float()
    inner32, outer32 = [f32(b) for b in inner], [f32(c) for c in outer]
    prob32 = tb.Bilevel(prob.outer_fn, prob.inner_fn)
    before = sum(kernels.triton_launches().values())
    runs = []
    for backend in ("torch", "triton"):
        algo = ctor(prob32, radius=0.5, backend=backend, **COMMON)
        s = algo.init(x0, y0)
        it_in, it_out = cycle(inner32), cycle(outer32)
        for _ in range(4):
            s = algo.step(s, it_in, it_out)
        runs.append(s)
    assert sum(kernels.triton_launches().values()) >= before + 3 * 4   # really launched
    # float32: the kernels round differently from the reference (fused multiply-adds), and
    # FD products amplify such differences in v by ~1/δ over the steps
    for a, b in ((runs[0].xf, runs[1].xf), (runs[0].yf, runs[1].yf), (runs[0].vf, runs[1].vf)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fdehbo_inner_gradient_from_the_pair_when_one_batch_serves_both():
    # with ζ_t = ψ_t (one batch object), FdeHBO takes ∇y g from the ± pair's gradients,
    # (∇y g(y+δv) + ∇y g(y−δv))/2 = ∇y g(y) + O(δ²): one evaluation of g per point instead of
    # two, and in float64 the same trajectory as separate ∇y g evaluations (distinct batch
    # objects holding the same tensors) to ~1e-10
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(0)
    X, t = torch.randn(40, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    calls = [0]

    def g(x, y, b):
        calls[0] += 1
        z = torch.tanh(b[0] @ x["A"])
        return F.cross_entropy(z @ y["W"], b[1]) + 0.05 * (y["W"] ** 2).sum()

    def f(x, y, b):
        return F.cross_entropy(torch.tanh(b[0] @ x["A"]) @ y["W"], b[1])

    x0 = {"A": torch.randn(5, 4, dtype=torch.float64, generator=gen)}
    y0 = {"W": 0.1 * torch.randn(4, 3, dtype=torch.float64, generator=gen)}
    prob = tb.Bilevel(outer=f, inner=g)
    kw = dict(lr_x=0.1, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=100.0)

    def run(same_object):
        algo = tb.fdehbo(prob, **kw)
        s = algo.init(x0, y0)
        batches = (lambda: (X, t)) if not same_object else None
        b = (X, t)
        for _ in range(6):
            if same_object:
                s = algo.step(s, b, b)
            else:
                s = algo.step(s, iter([batches(), batches(), batches()]), b)
        return s

    calls[0] = 0
    shared = run(True)
    n_shared = calls[0]
    calls[0] = 0
    separate = run(False)
    n_separate = calls[0]
    for k in x0:
        torch.testing.assert_close(shared.x[k], separate.x[k], rtol=1e-9, atol=1e-10)
    for k in y0:
        torch.testing.assert_close(shared.y[k], separate.y[k], rtol=1e-9, atol=1e-10)
    assert n_shared < n_separate


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_eta_one_skips_the_previous_iterate_with_the_same_result(ctor):
    # η = 1 (constant) multiplies the momentum bracket by 0: the engine does not evaluate the
    # previous iterate; the same η given as a schedule (evaluated) gives the same iterates
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(1)
    X, t = torch.randn(30, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    calls = [0]

    def g(x, y, b):
        calls[0] += 1
        return F.cross_entropy(torch.tanh(b[0] @ x["A"]) @ y["W"], b[1]) + 0.05 * (y["W"] ** 2).sum()

    f = lambda x, y, b: F.cross_entropy(torch.tanh(b[0] @ x["A"]) @ y["W"], b[1])
    x0 = {"A": torch.randn(5, 4, dtype=torch.float64, generator=gen)}
    y0 = {"W": 0.1 * torch.randn(4, 3, dtype=torch.float64, generator=gen)}
    prob = tb.Bilevel(outer=f, inner=g)
    runs = []
    for eta in (1.0, lambda step: 1.0):
        algo = ctor(prob, lr_x=0.1, lr_y=0.5, lr_v=0.5, eta_x=eta, eta_y=eta, eta_v=eta, radius=50.0)
        s = algo.init(x0, y0)
        calls[0] = 0
        for _ in range(4):
            s = algo.step(s, (X, t), (X, t))
        runs.append((s, calls[0]))
    (a, n_const), (b, n_sched) = runs
    for k in x0:
        torch.testing.assert_close(a.x[k], b.x[k], rtol=1e-12, atol=1e-13)
    for k in y0:
        torch.testing.assert_close(a.y[k], b.y[k], rtol=1e-12, atol=1e-13)
    assert n_const < n_sched
