"""SABA, SRBA, AmIGO, TTSA, FSLA and VRBO (issue 19): each against a dense float64
re-derivation of its paper's update on the quadratic of test_single_loop (closed-form
derivatives, no library code), convergence to the closed-form x* with full batches, a 100x
cut of the true ‖∇Φ‖² with minibatches of 64, and the contract the other methods' tests
check (arguments, resume, stage-naming guards, data parallel, train-mode models, the
g-uses-y check, named exhausted iterators, the (i, batch) pairs of the finite-sum methods)."""
import inspect
import itertools
import math
import re

import pytest
import torch

import torchbilevel as tb
from test_family import dropout_batchnorm_problem
from test_single_loop import closed_form_minimiser, mean_problem, quadratic
from torchbilevel.experiments.compare import finite_sum_quadratic

DT = torch.float64
N_B = 6                                   # batches of test_single_loop.quadratic

# name -> (constructor, keyword arguments of a stable run on test_single_loop.quadratic)
ALGOS = {
    "saba": (tb.saba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, n_inner=N_B, n_outer=N_B)),
    "srba": (tb.srba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, n_inner=N_B, n_outer=N_B, period=3)),
    "amigo": (tb.amigo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, inner_steps=2, v_steps=2)),
    "ttsa": (tb.ttsa, dict(lr_x=0.1, lr_y=0.3, neumann_steps=4)),
    "fsla": (tb.fsla, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5)),
}
if hasattr(tb, "vrbo"):
    ALGOS["vrbo"] = (tb.vrbo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, inner_steps=2, neumann_steps=3, period=3))
NAMES = list(ALGOS)
PAIRED = {"saba", "srba"}                 # batches are (i, batch) pairs


def build(name, problem, fixed=False, **over):
    """The algorithm; ``fixed``: for one fixed batch (the finite-sum methods get n = 1)."""
    ctor, kw = ALGOS[name]
    kw = dict(kw)
    if fixed and name in PAIRED:
        kw.update(n_inner=1, n_outer=1)
    return ctor(problem, **{**kw, **over})


def fixed(name, b_in, b_out):
    """One fixed batch per level, as the method takes it."""
    return ((0, b_in), (0, b_out)) if name in PAIRED else (b_in, b_out)


def stream(name, seq, skip=0, counter=None, key=None):
    """Cycle over ``seq`` ((i, item) pairs for the finite-sum methods), from draw ``skip``."""
    for k, item in enumerate(itertools.cycle(range(len(seq)))):
        if k >= skip:
            if counter is not None:
                counter[key] += 1
            yield (item, seq[item]) if name in PAIRED else seq[item]


def start(p=4, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ({"h": torch.randn(p, generator=gen, dtype=DT)}, {"w": torch.randn(d, generator=gen, dtype=DT)})


def tensors(state):
    return [t for t in state if isinstance(t, torch.Tensor)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dense re-derivations
# test_single_loop.quadratic: g = ½yᵀAy − yᵀBx, f = ½‖y − c‖² + ½ρ‖x‖², so
# ∇y g = Ay − Bx, ∇yy g·v = Av, ∇xy g·v = −Bᵀv, ∇y f = y − c, ∇x f = ρx (v solves A v = ∇y f).

def test_saba_is_saga_on_each_of_sobas_directions():
    prob, inner, outer, rho = quadratic(seed=3)
    x0, y0 = start(seed=3)
    a = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2)
    algo = tb.saba(prob, **a, n_inner=N_B, n_outer=N_B)
    gen = torch.Generator().manual_seed(7)
    idx = [(int(i), int(j)) for i, j in torch.randint(N_B, (12, 2), generator=gen)]
    s = algo.init(x0, y0)
    for i, j in idx:
        s = algo.step(s, (i, inner[i]), (j, outer[j]))
    x, y, v = x0["h"].clone(), y0["w"].clone(), torch.zeros(5, dtype=DT)
    # memories of the three inner and two outer terms, zero at the start (reference's "zero" mode)
    mg = {k: [torch.zeros(n, dtype=DT) for _ in range(N_B)] for k, n in (("gy", 5), ("hv", 5), ("jv", 4))}
    mf = {k: [torch.zeros(n, dtype=DT) for _ in range(N_B)] for k, n in (("fy", 5), ("fx", 4))}
    for i, j in idx:
        (A, B), c = inner[i], outer[j]
        rows = {"gy": A @ y - B @ x, "hv": A @ v, "jv": -B.T @ v, "fy": y - c, "fx": rho * x}
        D = {}
        for k, r in rows.items():
            mem, at = (mg, i) if k in mg else (mf, j)
            D[k] = r - mem[k][at] + sum(mem[k]) / N_B          # SAGA: fresh − stored + mean of stored
            mem[k][at] = r
        y, v, x = y - a["lr_y"] * D["gy"], v - a["lr_v"] * (D["hv"] - D["fy"]), x - a["lr_x"] * (D["fx"] - D["jv"])
    close(s.x["h"], x), close(s.y["w"], y), close(s.v["w"], v)


def test_srba_is_sarah_restarted_from_full_sums_every_period():
    prob, inner, outer, rho = quadratic(seed=4)
    x0, y0 = start(seed=4)
    a = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2)
    period, steps = 3, 8
    gen = torch.Generator().manual_seed(8)
    draws_in = [int(i) for i in torch.randint(N_B, (400,), generator=gen)]
    draws_out = [int(i) for i in torch.randint(N_B, (400,), generator=gen)]
    algo = tb.srba(prob, **a, n_inner=N_B, n_outer=N_B, period=period)
    s = algo.init(x0, y0)
    it_in = iter([(i, inner[i]) for i in draws_in])
    it_out = iter([(j, outer[j]) for j in draws_out])
    for _ in range(steps):
        s = algo.step(s, it_in, it_out)

    def rows(x, y, v, i, j):
        (A, B), c = inner[i], outer[j]
        return torch.cat([A @ y - B @ x, A @ v, -B.T @ v]), torch.cat([y - c, rho * x])

    def until_all(draws):                 # a full sum draws until every index was seen
        seen = set()
        while len(seen) < N_B:
            seen.add(draws.pop(0))

    x, y, v = x0["h"].clone(), y0["w"].clone(), torch.zeros(5, dtype=DT)
    prev = None
    for t in range(steps):
        if t % period == 0:
            until_all(draws_in), until_all(draws_out)
            parts = [rows(x, y, v, k, k) for k in range(N_B)]
            dg = sum(p[0] for p in parts) / N_B
            df = sum(p[1] for p in parts) / N_B
        else:
            i, j = draws_in.pop(0), draws_out.pop(0)
            (g1, f1), (g0, f0) = rows(x, y, v, i, j), rows(*prev, i, j)
            dg, df = dg + g1 - g0, df + f1 - f0
        prev = (x, y, v)
        y, v, x = (y - a["lr_y"] * dg[:5], v - a["lr_v"] * (dg[5:10] - df[:5]),
                   x - a["lr_x"] * (df[5:] - dg[10:]))
    close(s.x["h"], x), close(s.y["w"], y), close(s.v["w"], v)


def test_amigo_warm_starts_y_and_v():
    prob, inner, outer, rho = quadratic(seed=5)
    x0, y0 = start(seed=5)
    a = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2)
    T_, M = 3, 2
    algo = tb.amigo(prob, **a, inner_steps=T_, v_steps=M)
    s = algo.init(x0, y0)
    it_in, it_out = stream("amigo", inner), stream("amigo", outer)
    for _ in range(5):
        s = algo.step(s, it_in, it_out)
    it_in, it_out = stream("amigo", inner), stream("amigo", outer)
    x, y, v = x0["h"].clone(), y0["w"].clone(), torch.zeros(5, dtype=DT)
    for _ in range(5):
        for _ in range(T_):
            A, B = next(it_in)
            y = y - a["lr_y"] * (A @ y - B @ x)
        c = next(it_out)
        for _ in range(M):
            A, _ = next(it_in)
            v = v - a["lr_v"] * (A @ v - (y - c))
        _, B = next(it_in)
        x = x - a["lr_x"] * (rho * x + B.T @ v)
    close(s.x["h"], x), close(s.y["w"], y), close(s.v["w"], v)


def test_ttsa_two_timescales_and_truncated_neumann_series():
    prob, inner, outer, rho = quadratic(seed=6)
    x0, y0 = start(seed=6)
    Q, eta, seed = 4, 0.15, 3
    algo = tb.ttsa(prob, lr_x=0.05, lr_y=0.2, neumann_steps=Q, eta=eta, seed=seed)
    s = algo.init(x0, y0)
    it_in, it_out = stream("ttsa", inner), stream("ttsa", outer)
    for _ in range(7):
        s = algo.step(s, it_in, it_out)
    it_in, it_out = stream("ttsa", inner), stream("ttsa", outer)
    gen = torch.Generator().manual_seed(seed)
    x, y = x0["h"].clone(), y0["w"].clone()
    for t in range(7):
        p = int(torch.randint(Q, (1,), generator=gen))
        A1, B1 = next(it_in)
        y = y - 0.2 / (t + 1) ** 0.4 * (A1 @ y - B1 @ x)
        c = next(it_out)
        v = y - c
        for _ in range(p):
            A, _ = next(it_in)
            v = v - eta * (A @ v)
        v = Q * eta * v
        x = x - 0.05 / (t + 1) ** 0.6 * (rho * x + B1.T @ v)
    close(s.x["h"], x), close(s.y["w"], y)


def test_fsla_storm_direction_compares_new_and_previous_points():
    prob, inner, outer, rho = quadratic(seed=7)
    x0, y0 = start(seed=7)
    a = dict(lr_x=0.05, lr_y=0.2, lr_v=0.2)
    eta = 0.3
    algo = tb.fsla(prob, **a, eta_x=eta)
    s = algo.init(x0, y0)
    it_in, it_out = stream("fsla", inner), stream("fsla", outer)
    for _ in range(6):
        s = algo.step(s, it_in, it_out)
    it_in, it_out = stream("fsla", inner), stream("fsla", outer)
    x, y, v, h, x_prev = x0["h"].clone(), y0["w"].clone(), torch.zeros(5, dtype=DT), None, None
    for t in range(6):
        A1, B1 = next(it_in)
        y_new = y - a["lr_y"] * (A1 @ y - B1 @ x)
        (A2, _), c1 = next(it_in), next(it_out)
        v_new = v - a["lr_v"] * (A2 @ v - (y_new - c1))
        _, (_, B3) = next(it_out), next(it_in)                # c unused by ∇x
        D = lambda xx, yy, vv: rho * xx + B3.T @ vv
        h = D(x, y_new, v_new) if t == 0 else D(x, y_new, v_new) + (1 - eta) * (h - D(x_prev, y, v))
        x_prev, x, y, v = x, x - a["lr_x"] * h, y_new, v_new
    close(s.x["h"], x), close(s.y["w"], y), close(s.v["w"], v)


@pytest.mark.skipif(not hasattr(tb, "vrbo"), reason="no VRBO")
def test_vrbo_sarah_chain_of_stocbio_estimates_with_large_batch_restarts():
    prob, inner, outer, rho = quadratic(seed=8)
    x0, y0 = start(seed=8)
    a = dict(lr_x=0.05, lr_y=0.2, lr_v=0.15)
    m, Q, period, L, steps = 2, 2, 3, 2, 5
    algo = tb.vrbo(prob, **a, inner_steps=m, neumann_steps=Q, period=period, large_batches=L)
    s = algo.init(x0, y0)
    it_in, it_out = stream("vrbo", inner), stream("vrbo", outer)
    for _ in range(steps):
        s = algo.step(s, it_in, it_out)
    it_in, it_out = stream("vrbo", inner), stream("vrbo", outer)

    def sample():                         # ζ, D_F, then B_1..B_Q and D_G
        zeta, c = next(it_in), next(it_out)
        return zeta, c, [next(it_in) for _ in range(Q + 1)]

    def estimate(x, y, smp):              # (∇y g, stocBiO ∇x f − ∇xy g·η Σ_q Π (I − ηA_j) ∇y f)
        (Az, Bz), c, rest = smp
        r = acc = y - c
        for A, _ in rest[:Q]:
            r = r - a["lr_v"] * (A @ r)
            acc = acc + r
        return Az @ y - Bz @ x, rho * x + rest[Q][1].T @ (a["lr_v"] * acc)

    x, y = x0["h"].clone(), y0["w"].clone()
    for t in range(steps):
        if t % period == 0:
            rows = [estimate(x, y, sample()) for _ in range(L)]
            u, w = sum(r[0] for r in rows) / L, sum(r[1] for r in rows) / L
            ax, ay = x, y
        x = x - a["lr_x"] * w
        for _ in range(m):
            smp = sample()
            (g1, w1), (g0, w0) = estimate(x, y, smp), estimate(ax, ay, smp)
            u, w = u + g1 - g0, w + w1 - w0
            ax, ay = x, y
            y = y - a["lr_y"] * u
    close(s.x["h"], x), close(s.y["w"], y), close(s.w, w), close(s.u, u)


# ---------------------------------------------------------------- deterministic convergence
CONVERGE = {
    "saba": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.5), 300, 1e-6),
    "srba": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.5), 300, 1e-6),
    "amigo": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.5), 100, 1e-6),
    "ttsa": (dict(lr_x=0.5, lr_y=0.5, neumann_steps=20, eta=0.3), 300, 3e-2),
    "fsla": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.5), 300, 1e-6),
    "vrbo": (dict(lr_x=0.3, lr_y=0.5, lr_v=0.3, neumann_steps=30), 50, 1e-3),
}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_convergence_to_closed_form(name):
    # VRBO: a truncated Neumann series of Q terms keeps a (1 − ηµ)^Q bias; TTSA's randomly
    # truncated series is random even on full batches (p ~ U{0..Q−1}: unbiased only on
    # average), so its x jitters around x* with its decaying steps (7.5e-3 at 300 steps, Q = 40)
    prob, inner, outer, rho = quadratic(seed=2)
    batch_in, batch_out = mean_problem(prob, inner, outer)
    xstar = closed_form_minimiser(inner, outer, rho)
    kw, steps, tol = CONVERGE[name]
    algo = build(name, prob, fixed=True, **{k: v for k, v in kw.items()})
    s = algo.init({"h": torch.zeros(4, dtype=DT)}, {"w": torch.zeros(5, dtype=DT)})
    ib, ob = fixed(name, batch_in, batch_out)
    for _ in range(steps):
        s = algo.step(s, ib, ob)
    assert (s.x["h"] - xstar).norm() < tol * (1 + xstar.norm())


# ---------------------------------------------------------------- stochastic acceptance
N_SUM, BATCH = 512, 64
PARTS = torch.randperm(N_SUM, generator=torch.Generator().manual_seed(5)).view(N_SUM // BATCH, BATCH)


def minibatches(seed):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(N_SUM, (BATCH,), generator=gen)


def fixed_minibatches(seed):
    """The finite sum as n = 8 fixed minibatches of 64, drawn uniformly: (i, batch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        i = int(torch.randint(len(PARTS), (1,), generator=gen))
        yield i, PARTS[i]


# lr from the grid {0.03, 0.1, 0.3, 1}, lr_x = lr/5 as tests/test_family.py; TTSA with
# constant steps (with its default decays 0.6/0.4 the grid's best, lr = 0.3, reaches 2.3e-2
# in 1500 steps: the decayed x step is too small by then); AmIGO with T = M = 3 inner steps
# (the default 10 passes too, at lr = 0.3 in 75 steps, 3x slower); VRBO with m = 2 y-steps
# per x-step and Q = 3 Neumann terms (24 gradient evaluations a step; with m = 10 it passes
# at lr = 0.3 in 56 steps, 10x slower)
ACCEPT = {
    "saba": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr, n_inner=len(PARTS), n_outer=len(PARTS)),
    "srba": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr, n_inner=len(PARTS), n_outer=len(PARTS)),
    "amigo": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr, inner_steps=3),
    "ttsa": lambda lr: dict(lr_x=lr / 5, lr_y=lr, decay_x=0.0, decay_y=0.0),
    "fsla": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr),
    "vrbo": lambda lr: dict(lr_x=lr / 5, lr_y=lr, lr_v=lr, inner_steps=2, neumann_steps=3),
}
ACCEPT_LR = {"saba": 0.3, "srba": 0.3, "amigo": 0.3, "ttsa": 0.3, "fsla": 0.3, "vrbo": 0.3}


@pytest.mark.parametrize("name", NAMES)
def test_minibatches_of_64_cut_the_true_hypergradient_100x_within_1500_steps(name):
    prob, grad_phi = finite_sum_quadratic(n=N_SUM)
    algo = ALGOS[name][0](prob, **ACCEPT[name](ACCEPT_LR[name]))
    s = algo.init({"h": torch.zeros(10, dtype=DT)}, {"w": torch.zeros(10, dtype=DT)})
    g0 = grad_phi(s.x["h"]).pow(2).sum()
    draw = fixed_minibatches if name in PAIRED else minibatches
    it_in, it_out = draw(0), draw(1)
    ratio = lambda st: float(grad_phi(st.x["h"]).pow(2).sum() / g0)
    below = None
    for t in range(1500):
        s = algo.step(s, it_in, it_out)
        if t % 25 == 24 and ratio(s) < 1e-2:
            below = t + 1
            break
    assert below is not None, f"{name}: ‖∇Φ‖² only cut to {ratio(s):.3g} of its start in 1500 steps"
    # and it stays there for 100 more inner steps (VRBO: 50 outer steps of m = 2 y-steps)
    for _ in range(100 // ACCEPT[name](0.1).get("inner_steps", 1) if name == "vrbo" else 100):
        s = algo.step(s, it_in, it_out)
    assert ratio(s) < 1e-2


# ---------------------------------------------------------------- arguments
BAD = [
    ("saba", "lr_x", 0.0), ("saba", "lr_v", float("nan")), ("saba", "n_inner", 0), ("saba", "n_outer", -1),
    ("srba", "period", 0), ("srba", "lr_y", -1.0), ("srba", "n_inner", 0),
    ("amigo", "inner_steps", 0), ("amigo", "v_steps", 0), ("amigo", "lr_v", float("inf")),
    ("ttsa", "neumann_steps", 0), ("ttsa", "eta", 0.0), ("ttsa", "decay_x", 1.5), ("ttsa", "decay_y", -0.1),
    ("ttsa", "seed", -1), ("fsla", "eta_x", 1.5), ("fsla", "lr_v", 0.0),
    ("vrbo", "period", 0), ("vrbo", "inner_steps", 0), ("vrbo", "neumann_steps", 0), ("vrbo", "lr_v", 0.0),
    ("vrbo", "large_batches", 0),
]


@pytest.mark.parametrize("name,kw,bad", [b for b in BAD if b[0] in ALGOS])
def test_bad_arguments_raise_naming_the_argument(name, kw, bad):
    prob, _, _, _ = quadratic()
    with pytest.raises(ValueError, match=kw):
        build(name, prob, **{kw: bad})


def test_ttsa_needs_eta_with_a_schedule_for_lr_y():
    prob, _, _, _ = quadratic()
    with pytest.raises(ValueError, match="eta"):
        tb.ttsa(prob, lr_x=0.1, lr_y=lambda t: 0.1)
    tb.ttsa(prob, lr_x=0.1, lr_y=lambda t: 0.1, eta=0.1)


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


@pytest.mark.parametrize("name", NAMES)
def test_docstring_opens_with_paper_algorithm_and_cost(name):
    paper = {"saba": "Dagréou, Ablin, Vaiter, Moreau", "srba": "Dagréou, Moreau, Vaiter, Ablin",
             "amigo": "Arbel, Mairal", "ttsa": "Hong, Wai, Wang, Yang", "fsla": "Li, Gu, Huang",
             "vrbo": "Yang, Ji, Liang"}[name]
    fn = getattr(tb, name)
    module_doc = inspect.getmodule(fn).__doc__
    assert paper in module_doc.split("\n\n")[0] and re.search(r"Alg\.", module_doc.split("\n\n")[0])
    assert "Cost" in module_doc and "Cost" in inspect.getdoc(fn) and "Alg." in inspect.getdoc(fn)


# ---------------------------------------------------------------- (i, batch) pairs
@pytest.mark.parametrize("name", sorted(PAIRED))
def test_finite_sum_methods_check_their_pairs(name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob)
    s = algo.init(*start())
    snap = [t.clone() for t in tensors(s)]
    with pytest.raises(ValueError, match=r"inner_batch yielded index 6, outside \[0, n_inner=6\)"):
        algo.step(s, iter([(6, inner[0])] * 10), stream(name, outer))
    with pytest.raises(ValueError, match=r"outer_batch yielded index -1"):
        algo.step(s, stream(name, inner), iter([(-1, outer[0])] * 10))
    with pytest.raises(TypeError, match=r"inner_batch must yield \(i, batch\) pairs"):
        algo.step(s, iter([inner[0][0]] * 10), stream(name, outer))
    with pytest.raises(TypeError, match="index of type float"):
        algo.step(s, iter([(1.0, inner[1])] * 10), stream(name, outer))
    assert all(torch.equal(a, b) for a, b in zip(snap, tensors(s)))
    # a 0-d integer tensor is an index (step 1: SRBA's first SARAH step, one pair of each)
    s1 = algo.step(s, stream(name, inner), stream(name, outer))
    s1 = algo.step(s1, iter([(torch.tensor(1), inner[1])]), iter([(torch.tensor(2), outer[2])]))
    assert s1.step == 2
    # the state of another n is refused, fresh or from a checkpoint
    other = build(name, prob, n_inner=N_B + 1)
    with pytest.raises(ValueError, match=r"n_inner=6.*n_inner=7"):
        other.step(s1, stream(name, inner), stream(name, outer))
    with pytest.raises(ValueError, match="cannot change"):
        other.step(other.load_state_dict(algo.state_dict(s1)), stream(name, inner), stream(name, outer))


def test_srba_full_sum_names_the_minibatches_never_visited():
    prob, inner, outer, _ = quadratic()
    algo = build("srba", prob)
    s = algo.init(*start())
    with pytest.raises(ValueError, match=r"inner_batch did not visit indices \[4, 5\]"):
        algo.step(s, itertools.cycle([(k, inner[k]) for k in range(4)]), stream("srba", outer))
    # shuffled epochs or sampling with replacement both work: draws until all were seen
    for it in (stream("srba", inner), fixed_pairs_with_replacement(inner)):
        assert algo.step(s, it, stream("srba", outer)).step == 1


def fixed_pairs_with_replacement(seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    while True:
        i = int(torch.randint(len(seq), (1,), generator=gen))
        yield i, seq[i]


# ---------------------------------------------------------------- resume, guards
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_resume_is_bit_identical(tmp_path, name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob)
    s = algo.init(*start())
    calls = {"in": 0, "out": 0}
    it_in, it_out = stream(name, inner, 0, calls, "in"), stream(name, outer, 0, calls, "out")
    for _ in range(4):
        s = algo.step(s, it_in, it_out)
    torch.save(algo.state_dict(s), tmp_path / "ckpt.pt")
    drawn = dict(calls)
    straight = s
    for _ in range(4):
        straight = algo.step(straight, it_in, it_out)
    # a newly built algorithm continues (TTSA's built with another seed: the truncation
    # generator it continues with is the state's)
    fresh = build(name, prob, **({"seed": 99} if name == "ttsa" else {}))
    resumed = fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert type(resumed) is type(s) and resumed.step == 4
    it_in, it_out = stream(name, inner, drawn["in"]), stream(name, outer, drawn["out"])
    for _ in range(4):
        resumed = fresh.step(resumed, it_in, it_out)
    assert all(torch.equal(a, b) for a, b in zip(tensors(straight), tensors(resumed)))
    with pytest.raises(ValueError, match=name):
        algo.load_state_dict({"algorithm": "other"})


@pytest.mark.parametrize("name", NAMES)
def test_nan_raises_floating_point_error_naming_the_stage_and_leaves_state_usable(name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob, fixed=True)
    s = algo.step(algo.init(*start()), *fixed(name, inner[0], outer[0]))
    snapshot = [t.clone() for t in tensors(s)]
    rng = torch.get_rng_state()
    bad = torch.full((5,), float("nan"), dtype=DT)
    with pytest.raises(FloatingPointError, match=rf"{name} step 1: .*outer gradient"):
        algo.step(s, *fixed(name, inner[0], bad))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, tensors(s)))
    assert torch.equal(torch.get_rng_state(), rng)
    nan_in = (torch.full_like(inner[0][0], float("nan")), inner[0][1])
    with pytest.raises(FloatingPointError, match=rf"{name} step 1: .*inner gradient"):
        algo.step(s, *fixed(name, nan_in, outer[0]))
    s2 = algo.step(s, *fixed(name, inner[0], outer[0]))           # the old state still steps
    assert s2.step == 2 and all(bool(torch.isfinite(t.double()).all()) for t in tensors(s2))
    with pytest.raises(FloatingPointError, match="init"):
        algo.init({"h": torch.full((4,), float("inf"), dtype=DT)}, start()[1])


@pytest.mark.parametrize("name", NAMES)
def test_inner_objective_that_ignores_y_is_rejected(name):
    prob0, inner, outer, _ = quadratic()
    prob = tb.Bilevel(prob0.outer_fn, lambda x, y, b: (x["h"] ** 2).sum() + 0.0 * b[0].sum())
    algo = build(name, prob, fixed=True)
    x0, y0 = start()
    s = algo.init(x0, y0)
    with pytest.raises(ValueError, match="does not depend on y"):
        algo.step(s, *fixed(name, inner[0], outer[0]))
    assert torch.equal(s.x["h"], x0["h"])


@pytest.mark.parametrize("name", NAMES)
def test_outer_objective_without_x_runs(name):
    # hyper-cleaning's f depends on x only through y*: ∇x f = 0 must not be an error
    prob0, inner, outer, _ = quadratic()
    prob = tb.Bilevel(lambda x, y, c: 0.5 * ((y["w"] - c) ** 2).sum(), prob0.inner_fn)
    algo = build(name, prob)
    s = algo.init(*start())
    it_in, it_out = stream(name, inner), stream(name, outer)
    for _ in range(3):
        s = algo.step(s, it_in, it_out)
    assert not torch.equal(s.x["h"], start()[0]["h"]) and torch.isfinite(s.x["h"]).all()


@pytest.mark.parametrize("which", ["inner_batch", "outer_batch"])
@pytest.mark.parametrize("name", NAMES)
def test_exhausted_iterator_is_named(name, which):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob)
    s = algo.init(*start())
    ib, ob = stream(name, inner), stream(name, outer)
    ib, ob = (iter([]), ob) if which == "inner_batch" else (ib, iter([]))
    with pytest.raises(ValueError, match=which):
        algo.step(s, ib, ob)


# ---------------------------------------------------------------- data parallel
def _reduces(name, state):
    """All-reduces of one step (the second), from each method's docstring."""
    kw = ALGOS[name][1]
    if name in ("saba", "srba"):
        return 1
    if name == "amigo":
        return kw["inner_steps"] + kw["v_steps"] + 2
    if name == "ttsa":
        gen = torch.Generator()
        gen.set_state(state.rng)
        return 3 + int(torch.randint(kw["neumann_steps"], (1,), generator=gen))
    if name == "fsla":
        return 3
    if name == "vrbo":       # step 1 is a SARAH step: per inner step the ∇y g pair, then two stocBiO estimates
        return kw["inner_steps"] * (1 + 2 * (kw["neumann_steps"] + 2))


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
    streams = [(stream(name, inner), stream(name, outer)) for _ in range(2)]
    s, r = a.step(s, *streams[0]), b.step(r, *streams[1])
    calls[0] = 0
    expected = _reduces(name, r)
    s, r = a.step(s, *streams[0]), b.step(r, *streams[1])
    assert calls[0] == expected
    for u, w in zip(tensors(s), tensors(r)):
        torch.testing.assert_close(u, w, rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------- a module with dropout and BatchNorm
@pytest.mark.parametrize("name", NAMES)
def test_dropout_and_batchnorm_model_in_train_mode_stays_finite(name):
    model, x, y, g, f = dropout_batchnorm_problem()

    parts = torch.arange(64).view(4, 16)

    def draws(seed):
        gg = torch.Generator().manual_seed(seed)
        while True:
            i = int(torch.randint(4, (1,), generator=gg))
            yield (i, parts[i]) if name in PAIRED else torch.randint(64, (16,), generator=gg)

    over = dict(lr_x=0.05, lr_y=0.1)
    if name in PAIRED:
        over.update(n_inner=4, n_outer=4)
    algo = build(name, tb.Bilevel(f, g), **over)
    s = algo.init(x, y)
    bn = model[1]
    mean0 = bn.running_mean.clone()
    batches0 = int(bn.num_batches_tracked)
    it_in, it_out = draws(2), draws(3)
    for _ in range(6):
        s = algo.step(s, it_in, it_out)
    assert all(bool(torch.isfinite(t.double()).all()) for t in tensors(s))
    assert not torch.equal(bn.running_mean, mean0)                   # training moved the statistics
    per_step = {"amigo": ALGOS["amigo"][1]["inner_steps"]}.get(name, 1)
    if name == "vrbo":
        per_step = ALGOS["vrbo"][1]["inner_steps"]
    assert int(bn.num_batches_tracked) - batches0 == 6 * per_step    # once per inner gradient step
    with torch.no_grad():
        assert torch.isfinite(f(s.x, s.y, torch.arange(64)))


# ---------------------------------------------------------------- NaN at every call, NaN state
class NanAt:
    """Wrap an objective so that its ``k``-th call (1-based) returns NaN (0: never)."""

    def __init__(self, fn, k=0):
        self.fn, self.k, self.calls = fn, k, 0

    def __call__(self, x, y, batch):
        self.calls += 1
        val = self.fn(x, y, batch)
        return val * torch.tensor(math.nan, dtype=val.dtype) if self.calls == self.k else val


@pytest.mark.parametrize("name", NAMES)
def test_nan_at_every_call_of_g_in_a_step_is_caught_and_named(name):
    prob0, inner, outer, _ = quadratic()
    fi = NanAt(prob0.inner_fn)
    algo = build(name, tb.Bilevel(prob0.outer_fn, fi), fixed=True)
    ib, ob = fixed(name, inner[0], outer[0])
    s = algo.init(*start())
    for _ in range(2):
        s = algo.step(s, ib, ob)
    fi.calls = 0
    algo.step(s, ib, ob)
    per_step = fi.calls
    assert per_step >= 2
    snap = [t.clone() for t in tensors(s)]
    for k in range(1, per_step + 1):                  # NaN at every possible call of a step
        fi.calls, fi.k = 0, k
        with pytest.raises(FloatingPointError, match=rf"{name} step 2: NaN/inf arose in .*unchanged"):
            algo.step(s, ib, ob)
        assert all(torch.equal(a, b) for a, b in zip(snap, tensors(s)))
    fi.k = 0
    assert algo.step(s, ib, ob).step == 3


CORRUPT = {"saba": "mem_g", "srba": "d_g", "amigo": "vf", "ttsa": "yf", "fsla": "h", "vrbo": "w"}


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_the_state_is_named(name):
    prob, inner, outer, _ = quadratic()
    algo = build(name, prob, fixed=True)
    ib, ob = fixed(name, inner[0], outer[0])
    s = algo.step(algo.init(*start()), ib, ob)
    field = CORRUPT[name]
    s = s._replace(**{field: torch.full_like(getattr(s, field), math.nan)})     # e.g. a corrupted checkpoint
    with pytest.raises(FloatingPointError, match=rf"inputs: state\.{field} holds NaN/inf"):
        algo.step(s, ib, ob)


# ---------------------------------------------------------------- the model zoo in train mode
def _zoo():
    import test_model_zoo as Z
    return Z


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model", ["mlp_dropout", "cnn_bn", "lstm_dropout"])    # dropout, BatchNorm, recurrent
def test_every_zoo_model_runs_in_train_mode(name, model):
    Z = _zoo()
    if model not in Z.MODELS:
        pytest.skip(f"{model} not in the zoo")
    z = Z.Zoo(model)
    small = dict(lr_x=0.01, lr_y=0.1)
    if name != "ttsa":
        small["lr_v"] = 0.1
    algo = build(name, z.prob, fixed=True, **small)
    s = algo.init(z.x, z.y)
    x0 = {k: t.clone() for k, t in z.x.items()}
    ib, ob = fixed(name, z.ib, z.ob)
    counts = [z.nbt()]
    for _ in range(1 if name == "vrbo" else 2):          # a VRBO step already holds its SARAH differences
        s = algo.step(s, ib, ob)
        counts.append(z.nbt())
    assert all(bool(torch.isfinite(t).all()) for t in list(s.x.values()) + list(s.y.values()))
    assert any(not torch.equal(s.x[k], x0[k]) for k in x0)               # x moved
    assert z.m.training
    per_step = {"amigo": ALGOS["amigo"][1]["inner_steps"], "vrbo": ALGOS["vrbo"][1]["inner_steps"]}.get(name, 1)
    for before, after in zip(counts, counts[1:]):                         # BatchNorm: once per inner step
        assert [a - b for a, b in zip(after, before)] == [per_step] * len(before), counts
