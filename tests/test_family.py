"""SOBA, MA-SOBA, MRBO, F2SA and BOME: SOBA, FMBO(η = 1, r = ∞) and MA-SOBA(momentum 0)
each against a dense re-derivation of SOBA's equations, MA-SOBA against a dense reference, convergence to the closed-form x* of quadratic problems (full
batch) and a 100x cut of the true ‖∇Φ‖² with minibatches of 64, argument checks, resume,
guards, data parallel and a dropout/BatchNorm model."""
import itertools
import math

import pytest
import torch
from torch import nn

import torchbilevel as tb
from test_single_loop import closed_form_minimiser, cycle, mean_problem, quadratic
from torchbilevel.experiments.compare import finite_sum_quadratic

DT = torch.float64

# name -> (constructor, keyword arguments of a stable run on test_single_loop.quadratic)
ALGOS = {
    "soba": (tb.soba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3)),
    "ma_soba": (tb.ma_soba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, momentum=0.5)),
    "mrbo": (tb.mrbo, dict(lr_x=0.1, lr_y=0.3, eta_x=0.5, eta_y=0.5, neumann_steps=4)),
    "f2sa": (tb.f2sa, dict(lr_x=0.1, lr_y=0.3, lr_z=0.3, inner_steps=3)),
    "bome": (tb.bome, dict(lr_x=0.1, lr_y=0.3, inner_steps=3)),
}
NAMES = list(ALGOS)


def build(name, problem, **over):
    ctor, kw = ALGOS[name]
    return ctor(problem, **{**kw, **over})


def start(p=4, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ({"h": torch.randn(p, generator=gen, dtype=DT)}, {"w": torch.randn(d, generator=gen, dtype=DT)})


def tensors(state):
    return [t for t in state if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------- SOBA = FMBO(η = 1, r = ∞)
def soba_reference(it_in, it_out, x0, y0, steps, lr_x, lr_y, lr_v):
    """SOBA (Dagréou et al. 2022, eq. (5)-(7)) written out with the dense derivatives of
    test_single_loop.quadratic, no library code: on one step t, with ζ = (A_ζ, B_ζ) and
    ψ = (A_ψ, B_ψ) drawn from the inner stream and c from the outer one,
        y ← y − β_t (A_ζ y − B_ζ x)                         (∇y g on ζ)
        v ← v − λ_t (A_ψ v − (y − c))                       (∇yy g·v − ∇y f on ψ)
        x ← x − α_t (ρ x + B_ψᵀ v)                          (∇x f − ∇xy g·v on ψ)
    all three at the current (x, y, v); v solves ∇yy g·v = +∇y f (the paper's v is −v).
    FdeHBO paper eq. (12)-(13) with η = 1 and no projection is the same update."""
    sched = lambda lr, t: lr(t) if callable(lr) else lr
    x, y, v = x0["h"].clone(), y0["w"].clone(), torch.zeros_like(y0["w"])
    out = []
    for t in range(steps):
        (Az, Bz), (Ap, Bp), c = next(it_in), next(it_in), next(it_out)
        rho = 0.5
        y, v, x = (y - sched(lr_y, t) * (Az @ y - Bz @ x),
                   v - sched(lr_v, t) * (Ap @ v - (y - c)),
                   x - sched(lr_x, t) * (rho * x + Bp.T @ v))
        out.append((x.clone(), y.clone(), v.clone()))
    return out


@pytest.mark.parametrize("which", ["soba", "fmbo_eta1_no_ball", "ma_soba_momentum0"])
def test_soba_fmbo_eta_one_and_ma_soba_without_momentum_follow_the_soba_equations(which):
    """Each of the three is checked against the dense re-derivation above (not against
    another library engine): to 1e-12 in float64 at every one of 8 steps."""
    prob, inner, outer, rho = quadratic()
    assert rho == 0.5
    x0, y0 = start()
    kw = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2)
    algo = {"soba": lambda: tb.soba(prob, **kw),
            "fmbo_eta1_no_ball": lambda: tb.fmbo(prob, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius=float("inf"), **kw),
            "ma_soba_momentum0": lambda: tb.ma_soba(prob, momentum=0.0, order="current", **kw)}[which]()
    ref = soba_reference(cycle(inner), cycle(outer), x0, y0, 8, **kw)
    s = algo.init(x0, y0)
    it_in, it_out = cycle(inner), cycle(outer)
    for t in range(8):
        s = algo.step(s, it_in, it_out)
        assert s.step == t + 1
        x, y, v = ref[t]
        torch.testing.assert_close(s.x["h"], x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.y["w"], y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.vf, v, rtol=1e-12, atol=1e-12)
    # two samples from the inner stream and one from the outer per step, as the reference
    assert torch.equal(next(it_in)[0], inner[16 % len(inner)][0])


@pytest.mark.parametrize("which", ["soba", "fmbo_eta1_no_ball"])
def test_soba_with_step_size_schedules_follows_the_soba_equations(which):
    prob, inner, outer, _ = quadratic(seed=1)
    x0, y0 = start(seed=1)
    kw = dict(lr_x=lambda t: 0.1 / (1 + t), lr_y=lambda t: 0.3 / (1 + t) ** 0.5, lr_v=0.2)
    algo = (tb.soba(prob, **kw) if which == "soba"
            else tb.fmbo(prob, eta_x=1.0, eta_y=1.0, eta_v=1.0, radius=float("inf"), **kw))
    s = algo.init(x0, y0)
    full_in, full_out = itertools.repeat(inner[0]), itertools.repeat(outer[0])
    ref = soba_reference(full_in, full_out, x0, y0, 5, **kw)
    for t in range(5):
        s = algo.step(s, inner[0], outer[0])
        torch.testing.assert_close(s.x["h"], ref[t][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.y["w"], ref[t][1], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- MA-SOBA
def test_ma_soba_current_order_matches_a_dense_moving_average_reference():
    # the "current" order (the average includes D_t before the x step); the paper's order
    # is re-derived in tests/test_family_fidelity.py
    prob, inner, outer, rho = quadratic(seed=3)
    x0, y0 = start(seed=3)
    lr_x, lr_y, lr_v, mom = 0.05, 0.2, 0.2, 0.7
    algo = tb.ma_soba(prob, lr_x=lr_x, lr_y=lr_y, lr_v=lr_v, momentum=mom, order="current")
    s = algo.init(x0, y0)
    it_in, it_out = cycle(inner), cycle(outer)
    for _ in range(6):
        s = algo.step(s, it_in, it_out)
    # dense reference: same draw order as SOBA (ζ, ψ inner, ψ outer)
    it_in, it_out = cycle(inner), cycle(outer)
    x, y, v, h = x0["h"].clone(), y0["w"].clone(), torch.zeros(5, dtype=DT), None
    for t in range(6):
        (Az, Bz), (Ap, Bp), c = next(it_in), next(it_in), next(it_out)
        D = rho * x + Bp.T @ v                              # ∇x f − ∇xy g·v
        h = D if t == 0 else mom * h + (1 - mom) * D
        y, v, x = y - lr_y * (Az @ y - Bz @ x), v - lr_v * (Ap @ v - (y - c)), x - lr_x * h
    torch.testing.assert_close(s.x["h"], x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.y["w"], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.h_f, h, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- deterministic convergence
# F2SA's x direction has an O(1/λ) bias: a penalty growing linearly removes it; BOME with a
# constant step settles in an O(step) neighbourhood of x* (a period-2 cycle across the
# constraint), hence its small steps and looser tolerance.
CONVERGE = {
    "soba": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.5), 150, 1e-6),
    "ma_soba": (dict(lr_x=0.1, lr_y=0.5, lr_v=0.5), 400, 1e-5),    # the lagged average rings at lr_x 0.3
    "mrbo": (dict(lr_x=0.3, lr_y=0.5, neumann_steps=20), 100, 1e-6),
    "f2sa": (dict(lr_x=0.3, lr_y=0.5, lr_z=0.5, penalty_growth=1.0), 300, 1e-3),
    "bome": (dict(lr_x=0.03, lr_y=0.03, lr_inner=0.5, inner_steps=4), 300, 1e-2),
}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_convergence_to_closed_form(name):
    prob, inner, outer, rho = quadratic(seed=2)
    batch_in, batch_out = mean_problem(prob, inner, outer)
    xstar = closed_form_minimiser(inner, outer, rho)
    kw, steps, tol = CONVERGE[name]
    algo = ALGOS[name][0](prob, **kw)
    s = algo.init({"h": torch.zeros(4, dtype=DT)}, {"w": torch.zeros(5, dtype=DT)})
    for _ in range(steps):
        s = algo.step(s, batch_in, batch_out)
    assert (s.x["h"] - xstar).norm() < tol * (1 + xstar.norm())


# ---------------------------------------------------------------- stochastic acceptance
def batches(n, size, seed):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(n, (size,), generator=gen)


# lr from the grid {0.03, 0.1, 0.3, 1}, lr_x = lr/5, MRBO's eta = lr_y, other arguments at
# their defaults (bench/RESULTS-compare.md lists the whole grid)
ACCEPT = {
    "soba": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr),
    "ma_soba": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr),
    "mrbo": lambda lr: dict(lr_x=lr / 5, lr_y=lr, eta=lr),
    "f2sa": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_z=lr),
    "bome": lambda lr: dict(lr_x=lr / 5, lr_y=lr),
}
ACCEPT_LR = {"soba": 0.1, "ma_soba": 0.1, "mrbo": 0.3, "f2sa": 0.1, "bome": 0.3}


@pytest.mark.parametrize("name", NAMES)
def test_minibatches_of_64_cut_the_true_hypergradient_100x_within_1500_steps(name):
    # g_i = ½yᵀA_i y − yᵀB_i x − a_iᵀy, f_j = ½‖y − c_j‖² + ½ρ‖x‖², n = 512, p = d = 10
    n = 512
    prob, grad_phi = finite_sum_quadratic(n=n)
    algo = ALGOS[name][0](prob, **ACCEPT[name](ACCEPT_LR[name]))
    s = algo.init({"h": torch.zeros(10, dtype=DT)}, {"w": torch.zeros(10, dtype=DT)})
    g0 = grad_phi(s.x["h"]).pow(2).sum()
    it_in, it_out = batches(n, 64, 0), batches(n, 64, 1)
    ratio = lambda st: float(grad_phi(st.x["h"]).pow(2).sum() / g0)
    below = None
    for t in range(1500):
        s = algo.step(s, it_in, it_out)
        if t % 25 == 24 and ratio(s) < 1e-2:
            below = t + 1
            break
    assert below is not None, f"{name}: ‖∇Φ‖² only cut to {ratio(s):.3g} of its start in 1500 steps"
    for _ in range(100):               # and it stays there
        s = algo.step(s, it_in, it_out)
    assert ratio(s) < 1e-2


# ---------------------------------------------------------------- arguments
BAD = [
    ("soba", "lr_x", 0.0), ("soba", "lr_v", float("nan")), ("soba", "backend", "cuda"),
    ("ma_soba", "momentum", 1.0), ("ma_soba", "momentum", -0.1), ("ma_soba", "lr_y", -1.0),
    ("mrbo", "eta_x", 1.5), ("mrbo", "eta_y", -0.2), ("mrbo", "neumann_steps", 0), ("mrbo", "eta", 0.0),
    ("mrbo", "lr_x", float("inf")), ("mrbo", "backend", "gpu"),
    ("ma_soba", "order", "lagged"), ("ma_soba", "radius", 0.0),
    ("f2sa", "lr_z", 0.0), ("f2sa", "penalty", -1.0), ("f2sa", "penalty_growth", -0.5),
    ("f2sa", "penalty_growth", float("inf")), ("f2sa", "inner_steps", 0),
    ("f2sa", "penalty_schedule", "linear"), ("f2sa", "penalty_step", 0.1),
    ("bome", "inner_steps", 0), ("bome", "phi", -0.5), ("bome", "phi", float("inf")), ("bome", "phi_rule", "norm"), ("bome", "lr_inner", 0.0),
    ("bome", "lr_y", float("nan")),
]


@pytest.mark.parametrize("name,kw,bad", BAD)
def test_bad_arguments_raise_naming_the_argument(name, kw, bad):
    prob, _, _, _ = quadratic()
    with pytest.raises(ValueError, match=kw):
        build(name, prob, **{kw: bad})


@pytest.mark.parametrize("name", NAMES)
def test_wrong_types_raise(name):
    prob, _, _, _ = quadratic()
    with pytest.raises(TypeError, match="lr_x"):
        build(name, prob, lr_x="0.1")
    with pytest.raises(TypeError, match="problem"):
        build(name, object())
    algo = build(name, prob)
    with pytest.raises(TypeError, match="state"):
        algo.step(("not", "a", "state"), None, None)


# ---------------------------------------------------------------- resume, guards
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_identical(tmp_path, name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob)
    s = algo.init(*start())
    calls = {"in": 0, "out": 0}

    def stream(seq, key, skip=0):
        for i, item in enumerate(itertools.cycle(seq)):
            if i >= skip:
                calls[key] += 1
                yield item

    it_in, it_out = stream(inner, "in"), stream(outer, "out")
    for _ in range(4):
        s = algo.step(s, it_in, it_out)
    torch.save(algo.state_dict(s), tmp_path / "ckpt.pt")
    drawn = dict(calls)
    straight = s
    for _ in range(4):
        straight = algo.step(straight, it_in, it_out)
    resumed = algo.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert type(resumed) is type(s) and resumed.step == 4
    it_in, it_out = stream(inner, "in", drawn["in"]), stream(outer, "out", drawn["out"])
    for _ in range(4):
        resumed = algo.step(resumed, it_in, it_out)
    assert all(torch.equal(a, b) for a, b in zip(tensors(straight), tensors(resumed)))
    with pytest.raises(ValueError, match=name):
        algo.load_state_dict({"algorithm": "other"})


@pytest.mark.parametrize("name", NAMES)
def test_nan_raises_floating_point_error_and_leaves_state_usable(name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob)
    s = algo.step(algo.init(*start()), inner[0], outer[0])
    snapshot = [t.clone() for t in tensors(s)]
    bad = torch.full((5,), float("nan"), dtype=DT)
    with pytest.raises(FloatingPointError, match=rf"{name} step 1: .*outer gradient"):
        algo.step(s, inner[0], bad)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, tensors(s)))
    s2 = algo.step(s, inner[0], outer[0])           # the old state still steps
    assert s2.step == 2 and all(bool(torch.isfinite(t).all()) for t in tensors(s2))
    with pytest.raises(FloatingPointError, match="init"):
        algo.init({"h": torch.full((4,), float("inf"), dtype=DT)}, start()[1])


# ---------------------------------------------------------------- data parallel
# all-reduces per step: SOBA/MA-SOBA one; F2SA and BOME one per inner step + one;
# MRBO per point: the stocBiO estimate's (∇f, Q products, the mixed product) + one for ∇y g
REDUCES = {"soba": 1, "ma_soba": 1, "f2sa": 3 + 1, "bome": 3 + 1, "mrbo": 2 * (4 + 2) + 1}


@pytest.mark.parametrize("name", NAMES)
def test_data_parallel_hook_gives_the_same_trajectory_with_few_all_reduces(name):
    prob, inner, outer, _ = quadratic()
    calls = [0]

    def hook(flat):
        calls[0] += 1
        return flat.clone()

    dp = tb.Bilevel(prob.outer_fn, prob.inner_fn, reduce=hook)
    a, b = build(name, prob), build(name, dp)
    s, r = a.init(*start()), b.init(*start())
    s = a.step(s, inner[0], outer[0])
    r = b.step(r, inner[0], outer[0])
    calls[0] = 0
    s = a.step(s, inner[1], outer[1])
    r = b.step(r, inner[1], outer[1])
    assert calls[0] == REDUCES[name]
    for u, w in zip(tensors(s), tensors(r)):
        torch.testing.assert_close(u, w, rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------- a module with dropout and BatchNorm
def dropout_batchnorm_problem():
    """A body with BatchNorm and dropout in train mode (outer) under a linear head (inner):
    (model, x, y, g, f), objectives on index batches of 64 samples (shared by the family's
    tests in test_family.py and test_family_new.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    model.train()
    x, y = tb.nn.split(model, inner=["4"])                 # body outer, linear head inner
    gen = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(64, 6, generator=gen, dtype=DT), torch.randn(64, 6, generator=gen, dtype=DT)
    lab, labv = torch.randint(3, (64,), generator=gen), torch.randint(3, (64,), generator=gen)
    ce = nn.functional.cross_entropy

    def g(x, y, b):
        return ce(tb.nn.call(model, x, y, X[b]), lab[b]) + 0.05 * sum((t ** 2).sum() for t in y.values())

    def f(x, y, b):
        return ce(tb.nn.call(model, x, y, Xv[b]), labv[b])
    return model, x, y, g, f


@pytest.mark.parametrize("name", NAMES)
def test_dropout_and_batchnorm_model_in_train_mode_stays_finite(name):
    model, x, y, g, f = dropout_batchnorm_problem()

    def stream(seed):
        gg = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randint(64, (16,), generator=gg)

    kw = {"lr_x": 0.05, "lr_y": 0.1}
    kw.update({"soba": dict(lr_v=0.1), "ma_soba": dict(lr_v=0.1), "mrbo": dict(neumann_steps=3),
               "f2sa": dict(lr_z=0.1, inner_steps=3), "bome": dict(inner_steps=3)}[name])
    algo = ALGOS[name][0](tb.Bilevel(f, g), **kw)
    s = algo.init(x, y)
    bn = model[1]
    mean0 = bn.running_mean.clone()
    batches0 = int(bn.num_batches_tracked)
    it_in, it_out = stream(2), stream(3)
    for _ in range(6):
        s = algo.step(s, it_in, it_out)
    assert all(bool(torch.isfinite(t).all()) for t in tensors(s))
    assert not torch.equal(bn.running_mean, mean0)                   # training moved the statistics
    per_step = 3 if name == "f2sa" else 1                            # F2SA: once per inner step
    assert int(bn.num_batches_tracked) - batches0 == 6 * per_step
    with torch.no_grad():
        assert torch.isfinite(f(s.x, s.y, torch.arange(64)))


# ---------------------------------------------------------------- options
def test_f2sa_penalty_schedule_and_bome_value_rule():
    prob, inner, outer, _ = quadratic()
    a = tb.f2sa(prob, lr_x=0.1, lr_y=0.3, lr_z=0.3, penalty=lambda t: 5.0 * (1 + t) ** 0.5)
    b = tb.f2sa(prob, lr_x=0.1, lr_y=0.3, lr_z=0.3, penalty=5.0, penalty_growth=0.5)
    s, r = a.init(*start()), b.init(*start())
    for k in range(4):
        s, r = a.step(s, inner[k], outer[k]), b.step(r, inner[k], outer[k])
    assert torch.equal(s.xf, r.xf) and torch.equal(s.zf, r.zf)
    # BOME with the φ = η q̂ rule: λ stays finite and ≥ 0
    algo = tb.bome(prob, lr_x=0.05, lr_y=0.05, phi_rule="value", inner_steps=5)
    s = algo.init(*start())
    for _ in range(20):
        s = algo.step(s, inner[0], outer[0])
        assert float(s.lam) >= 0.0 and math.isfinite(float(s.lam))
