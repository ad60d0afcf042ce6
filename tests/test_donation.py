"""Buffer donation (issue 25): ``step(state, ..., donate=True)`` writes the new state into the
old one's buffers.  Checked here: the donated run against the same run without donation (F2SA
and BOME: bitwise, the same operations in place; FdeHBO, FMBO, SOBA: to rounding, the momenta
accumulated term by term instead of in one fused pass), on a problem in float64 and on a
network with BatchNorm and dropout in train mode (module buffers included); resume through a
saved state_dict and two interleaved runs, bit for bit; the new state lives in the old
state's storage; a consumed state (and a state_dict taken before the donation, in memory or
saved) is refused; bad ``donate`` values, algorithms without an in-place step and transforms
are refused; a failure names the donation.  The memory a donated step saves is measured by
bench/memory_methods.py (bench/RESULTS.md §16), not asserted here."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torchbilevel as tb
from torchbilevel.optim import donation

from test_run_state import TOTAL, SPLIT, problem as run_problem, algorithms as run_algorithms

DONATING = ["fdehbo", "fmbo", "soba", "f2sa", "bome"]
BITWISE = {"f2sa", "bome"}        # the same operations, in place: bitwise equal to the plain step
# FdeHBO: the finite-difference products amplify rounding by ~1/δ (δ ~ 6e-6 in float64)
RTOL = {"fdehbo": 1e-8, "fmbo": 1e-12, "soba": 1e-12}


def flat_state(s):
    """Every tensor field of a state (flat buffers), in a fixed order."""
    return [v for k, v in s._asdict().items() if isinstance(v, torch.Tensor) and not k.startswith("layout")]


def run(name, steps, donate, seed=0, dtype=torch.float64):
    prob, x, y, b = run_problem(seed, dtype)
    algo = run_algorithms(prob)[name]
    s = algo.init(x, y)
    infos = []
    for _ in range(steps):
        s, info = algo.step(s, b, b, has_aux=True, donate=donate)
        infos.append(tb.progress(info))
    return algo, s, infos


def assert_states(a, b, name):
    for u, v in zip(flat_state(a), flat_state(b)):
        if name in BITWISE:
            assert torch.equal(u, v), name
        else:
            torch.testing.assert_close(u, v, rtol=RTOL[name], atol=RTOL[name] * 1e-2, msg=name)


@pytest.mark.parametrize("name", DONATING)
def test_donated_run_equals_the_plain_run(name):
    _, plain, plain_info = run(name, 10, donate=False)
    _, donated, donated_info = run(name, 10, donate=True)
    assert_states(plain, donated, name)
    for p, d in zip(plain_info, donated_info):          # the step reports agree too
        assert set(p) == set(d)
        for k in p:
            assert p[k] == pytest.approx(d[k], rel=1e-7, abs=1e-12), (name, k)


@pytest.mark.parametrize("name", DONATING)
def test_donated_state_lives_in_the_old_buffers(name):
    prob, x, y, b = run_problem(0, torch.float64)
    algo = run_algorithms(prob)[name]
    s = algo.step(algo.init(x, y), b, b)             # after init the previous iterate is the iterate
    old = {t.untyped_storage().data_ptr() for t in flat_state(s) if t.dim() > 0}
    new = algo.step(s, b, b, donate=True)
    ptrs = {t.untyped_storage().data_ptr() for t in flat_state(new) if t.dim() > 0}
    assert ptrs <= old, name                         # no vector of the new state was allocated


@pytest.mark.parametrize("name", DONATING)
def test_resume_and_interleaving_are_bit_identical_with_donation(name, tmp_path):
    _, ref, _ = run(name, TOTAL, donate=True)
    # resume: SPLIT donated steps, save, a newly built algorithm loads and continues donating
    prob, x, y, b = run_problem(0, torch.float64)
    algo = run_algorithms(prob)[name]
    s = algo.init(x, y)
    for _ in range(SPLIT):
        s = algo.step(s, b, b, donate=True)
    torch.save(algo.state_dict(s), tmp_path / "s.pt")
    fresh = run_algorithms(run_problem(0, torch.float64)[0])[name]
    r = fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for _ in range(TOTAL - SPLIT):
        r = fresh.step(r, b, b, donate=True)
    for u, v in zip(flat_state(ref), flat_state(r)):
        assert torch.equal(u, v), name
    # two donated runs interleaved on one algorithm object equal the runs alone
    alone = [run(name, 6, donate=True, seed=seed)[1] for seed in (0, 1)]
    prob0, x0, y0, b0 = run_problem(0, torch.float64)
    _, x1, y1, b1 = run_problem(1, torch.float64)
    shared = run_algorithms(prob0)[name]
    s0, s1 = shared.init(x0, y0), shared.init(x1, y1)
    # (problem(1) differs from problem(0) in its data and start only: the objectives read the batch)
    for _ in range(6):
        s0 = shared.step(s0, b0, b0, donate=True)
        s1 = shared.step(s1, b1, b1, donate=True)
    for got, want in ((s0, alone[0]), (s1, alone[1])):
        for u, v in zip(flat_state(got), flat_state(want)):
            assert torch.equal(u, v), name


@pytest.mark.parametrize("name", DONATING)
def test_a_consumed_state_is_refused(name, tmp_path):
    prob, x, y, b = run_problem(0, torch.float64)
    algo = run_algorithms(prob)[name]
    s = algo.step(algo.init(x, y), b, b)
    before = algo.state_dict(s)                       # aliases s's buffers
    torch.save(before, tmp_path / "before.pt")        # saved before the donation: a valid checkpoint
    new = algo.step(s, b, b, donate=True)
    for call in (lambda: algo.step(s, b, b), lambda: algo.step(s, b, b, donate=True),
                 lambda: algo.state_dict(s), lambda: algo.load_state_dict(before)):
        with pytest.raises(ValueError, match="donated"):
            call()
    # a dict saved after the donation holds the newer values under the older step: refused on load
    torch.save(before, tmp_path / "after.pt")
    with pytest.raises(ValueError, match="donated"):
        algo.load_state_dict(torch.load(tmp_path / "after.pt", weights_only=True))
    # the checkpoint written before the donation is valid and continues like the donated state
    again = algo.step(algo.load_state_dict(torch.load(tmp_path / "before.pt", weights_only=True)), b, b,
                      donate=True)
    for u, v in zip(flat_state(new), flat_state(again)):
        assert torch.equal(u, v), name
    algo.step(new, b, b, donate=True)                 # the returned state can be donated in turn


def test_bad_donate_values_and_algorithms_without_an_in_place_step():
    prob, x, y, b = run_problem(0, torch.float64)
    algos = run_algorithms(prob)
    s = algos["fdehbo"].init(x, y)
    with pytest.raises(TypeError, match="donate"):
        algos["fdehbo"].step(s, b, b, donate="yes")
    for name in ("double_loop-aid-cg", "mrbo", "ma_soba", "amigo", "saba"):
        algo = algos[name]
        st = algo.init(x, y)
        bb = (0, b) if name == "saba" else b
        with pytest.raises(ValueError, match="fdehbo, fmbo, soba, f2sa, bome"):
            algo.step(st, bb, bb, donate=True)
        algo.step(st, bb, bb, donate=False)          # the plain step is untouched


def test_donation_is_refused_inside_transforms(monkeypatch):
    prob, x, y, b = run_problem(0, torch.float64)
    algo = run_algorithms(prob)["f2sa"]
    s = algo.init(x, y)
    monkeypatch.setattr(donation, "in_functorch_transform", lambda: True)
    with pytest.raises(ValueError, match="eagerly"):
        algo.step(s, b, b, donate=True)
    monkeypatch.undo()
    algo.step(s, b, b, donate=True)                 # the refusal consumed nothing


@pytest.mark.parametrize("name", ["fdehbo", "f2sa", "bome"])
def test_a_failed_donated_step_names_the_donation_and_consumes_the_state(name):
    prob, x, y, b = run_problem(0, torch.float64)
    algo = run_algorithms(prob)[name]
    s = algo.step(algo.init(x, y), b, b)
    X, t = b
    bad = (X.clone(), t.clone())
    bad[1][0] = float("nan")
    with pytest.raises(FloatingPointError, match="donated"):
        algo.step(s, bad, bad, donate=True)
    with pytest.raises(ValueError, match="donated"):
        algo.step(s, b, b)
    # without donation the same failure leaves the state usable
    s2 = algo.step(algo.init(x, y), b, b)
    with pytest.raises(FloatingPointError, match="unchanged"):
        algo.step(s2, bad, bad)
    algo.step(s2, b, b)


class Net(torch.nn.Module):
    """x: a body with BatchNorm and dropout (train mode); y: the head."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                        torch.nn.Dropout(0.3))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, inp):
        return self.head(self.body(inp))


def build(name, net):
    ce = lambda x, y, b: F.cross_entropy(tb.nn.call(net, x, y, b[0]), b[1])
    ridge = lambda y: 1e-2 * sum((w ** 2).sum() for w in y.values())
    prob = tb.Bilevel(outer=ce, inner=lambda x, y, b: ce(x, y, b) + ridge(y))
    common = dict(lr_x=0.05, lr_y=0.2)
    return {"fdehbo": lambda: tb.fdehbo(prob, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0, **common),
            "fmbo": lambda: tb.fmbo(prob, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0, **common),
            "soba": lambda: tb.soba(prob, lr_v=0.2, **common),
            "f2sa": lambda: tb.f2sa(prob, lr_z=0.2, inner_steps=2, **common),
            "bome": lambda: tb.bome(prob, inner_steps=2, **common)}[name]()


@pytest.mark.parametrize("name", DONATING)
def test_donation_on_a_network_with_batchnorm_and_dropout(name):
    torch.manual_seed(0)
    net0 = Net().double().train()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    batch = (X, torch.randint(0, 3, (32,), generator=gen))
    results = []
    for donate in (False, True):
        net = copy.deepcopy(net0)
        algo = build(name, net)
        torch.manual_seed(5)                           # dropout masks: one stream for both runs
        x, y = tb.nn.split(net, inner=["head"])
        s = algo.init(x, y)
        for _ in range(6):
            s = algo.step(s, batch, batch, donate=donate)
        results.append((s, {k: v.clone() for k, v in net.state_dict().items() if "running" in k}))
    (plain, stats_plain), (donated, stats_donated) = results
    assert_states(plain, donated, name)
    for k in stats_plain:                               # running statistics moved the same way
        if name in BITWISE:
            assert torch.equal(stats_plain[k], stats_donated[k]), k
        else:
            torch.testing.assert_close(stats_plain[k], stats_donated[k], rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(stats_plain[k], net0.state_dict()[k]) for k in stats_plain)


def test_a_donated_half_precision_failure_names_the_update():
    """A float16 gradient whose entries are finite but whose sum overflows (above 65504) is not
    blamed: the stage named is the update that overflowed, as without donation."""
    dt = torch.float16
    inner = lambda x, y, b: 1000.0 * (y["w"] ** 2).sum() + (x["s"] * y["w"]).sum()
    outer = lambda x, y, b: (y["w"] ** 2).sum() + (x["s"] ** 2).sum()
    prob = tb.Bilevel(outer=outer, inner=inner)
    x, y = {"s": torch.ones(100, dtype=dt)}, {"w": torch.ones(100, dtype=dt)}
    for make in (lambda: tb.fmbo(prob, lr_x=0.1, lr_y=1000.0, lr_v=0.1, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=1e3),
                 lambda: tb.soba(prob, lr_x=0.1, lr_y=1000.0, lr_v=0.1)):
        for donate in (False, True):
            algo = make()
            with pytest.raises(FloatingPointError, match="the update"):
                algo.step(algo.init(x, y), None, None, donate=donate)


@pytest.mark.parametrize("name", ["fdehbo", "fmbo", "soba"])
def test_donated_steps_report_an_indefinite_inner_hessian_as_the_plain_steps_do(name):
    """g = ½ yᵀAy − xᵀy with A indefinite (two negative eigenvalues): the implicit-function
    formula's assumption fails.  Started at v along a negative direction, the step's solve
    report says vᵀ∇yy g v ≤ 0, donated as without donation (the same flags, the same
    residuals to rounding)."""
    from test_nonconvex import indefinite
    A, _ = indefinite(6, seed=3)
    w, Q = torch.linalg.eigh(A)
    prob = tb.Bilevel(outer=lambda x, y, b: 0.5 * (y["y"] ** 2).sum() + 0.1 * (x["x"] ** 2).sum(),
                      inner=lambda x, y, b: 0.5 * y["y"] @ A @ y["y"] - x["x"] @ y["y"])
    x0, y0 = {"x": torch.ones(6, dtype=torch.float64)}, {"y": torch.full((6,), 0.1, dtype=torch.float64)}
    kw = dict(lr_x=0.01, lr_y=0.05, lr_v=0.05)
    build = {"fdehbo": lambda: tb.fdehbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0, **kw),
             "fmbo": lambda: tb.fmbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0, **kw),
             "soba": lambda: tb.soba(prob, **kw)}[name]
    reports = []
    for donate in (False, True):
        algo = build()
        s = algo.init(x0, y0, v={"y": Q[:, 0].clone()})          # v along the most negative direction
        rows = []
        for _ in range(4):
            s, info = algo.step(s, None, None, has_aux=True, donate=donate)
            rows.append(tb.progress(info))
        reports.append(rows)
    plain, donated = reports
    assert plain[0]["solve_nonpositive_curvature"] == 1.0        # said, at the first step
    for p, d in zip(plain, donated):
        assert p["solve_nonpositive_curvature"] == d["solve_nonpositive_curvature"]
        assert d["solve_residual"] == pytest.approx(p["solve_residual"], rel=1e-9)
