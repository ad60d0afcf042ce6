"""Non-finite guards of every public entry point (tb.hypergrad, double_loop, fdehbo, fmbo):
NaN/inf raises FloatingPointError naming the stage where it first appeared, and every
tensor passed in (parameters, state, batches) is bit-for-bit unchanged."""
import itertools
import math
import re

import pytest
import torch

import torchbilevel as tb
from torchbilevel import guards as G

DT = torch.float64
D = 4
N = 12


def batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=gen, dtype=DT)
    Xv = torch.randn(N, D, generator=gen, dtype=DT)
    return (X, torch.randn(N, generator=gen, dtype=DT)), (Xv, torch.randn(N, generator=gen, dtype=DT))


def inner(x, y, batch):
    X, t = batch
    return 0.5 * ((X @ y["w"] - t) ** 2).mean() + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()


def outer(x, y, batch):
    X, t = batch
    return 0.5 * ((X @ y["w"] - t) ** 2).mean() + 0.01 * (x["h"] ** 2).sum()


def params():
    return {"h": torch.full((D,), -0.5, dtype=DT)}, {"w": torch.linspace(-1, 1, D, dtype=DT)}


class NanAt:
    """Wrap an objective so that its ``k``-th call (1-based) returns NaN (with NaN gradients)."""

    def __init__(self, fn, k):
        self.fn, self.k, self.calls = fn, k, 0

    def __call__(self, x, y, batch):
        self.calls += 1
        val = self.fn(x, y, batch)
        return val * torch.tensor(math.nan, dtype=val.dtype) if self.calls == self.k else val


def prechecked(prob, x, y, ib):
    """Run the once-per-problem checks that g depends on y and f or g on x (one call of g:
    here g uses x) before counting calls, so that NanAt's k counts the method's own calls."""
    prob.check_uses(x, y, ib, ib)
    for fn in (prob.inner_fn, prob.outer_fn):
        if isinstance(fn, NanAt):
            fn.calls = 0
    return prob


def tensors(*objs):
    """Every tensor reachable through dicts, tuples, lists and NamedTuples."""
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, dict):
            out += tensors(*o.values())
        elif isinstance(o, (tuple, list)):
            out += tensors(*o)
    return out


class Untouched:
    """Context manager: the given objects' tensors are bit-for-bit the same afterwards
    (same objects, same storage, same bytes — NaN-safe)."""

    def __init__(self, *objs):
        self.objs = objs

    def __enter__(self):
        self.before = [(t, t.data_ptr(), t.detach().clone()) for t in tensors(*self.objs)]
        assert self.before, "nothing to watch"
        return self

    def __exit__(self, *exc):
        for t, ptr, copy in self.before:
            assert t.data_ptr() == ptr
            assert torch.equal(t.detach().reshape(-1).view(torch.uint8), copy.reshape(-1).view(torch.uint8))
        return False


def stage(name):
    return re.escape(name)


# ---------------------------------------------------------------- tb.hypergrad
HG_CASES = [
    # (id, estimator, which objective returns NaN, at which call, expected stage)
    ("aid-cg-g1", tb.aid(tb.cg(steps=4)), "inner", 1, G.LINEAR),
    ("aid-fp-g1", tb.aid(tb.fixed_point(steps=4, lr=0.5)), "inner", 1, G.LINEAR),
    ("aid-cg-f1", tb.aid(tb.cg(steps=4)), "outer", 1, G.OUTER),
    ("stocbio-g1", tb.stocbio(4, 0.5), "inner", 1, G.LINEAR),
    ("stocbio-f1", tb.stocbio(4, 0.5), "outer", 1, G.OUTER),
    ("itd-g2", tb.itd(4, 0.5), "inner", 2, G.INNER),
    ("itd-f1", tb.itd(4, 0.5), "outer", 1, G.OUTER),
    ("pzobo-g1", tb.pzobo(3, 0.5, 2, 1e-3, generator=torch.Generator().manual_seed(0)), "inner", 1, G.INNER),
    # calls 1-3: the unperturbed path; call 5: the second step of the first perturbed path
    ("pzobo-g5", tb.pzobo(3, 0.5, 2, 1e-3, generator=torch.Generator().manual_seed(0)), "inner", 5, G.PATHS),
    ("pzobo-f1", tb.pzobo(3, 0.5, 2, 1e-3, generator=torch.Generator().manual_seed(0)), "outer", 1, G.OUTER),
]


@pytest.mark.parametrize("case", HG_CASES, ids=[c[0] for c in HG_CASES])
def test_hypergrad_names_the_stage_of_a_nan_call(case):
    _, est, which, k, where = case
    x, y = params()
    ib, ob = batches()
    prob = prechecked(tb.Bilevel(outer=NanAt(outer, k) if which == "outer" else outer,
                                 inner=NanAt(inner, k) if which == "inner" else inner), x, y, ib)
    with Untouched(x, y, ib, ob), pytest.raises(FloatingPointError, match=stage(where)) as err:
        tb.hypergrad(prob, est)(x, y, ib, ob)
    assert "non-finite hypergradient" in str(err.value)


def test_stocbio_streams_name_the_linear_system_and_the_mixed_product():
    # with an iterator every Neumann term and the mixed product linearise g on a fresh batch
    # (one call of g each): NaN at term 2 is the linear system, at the last call the mixed product
    x, y = params()
    ib, ob = batches()
    q = 4
    for k, where in ((2, G.LINEAR), (q + 1, G.MIXED)):
        prob = prechecked(tb.Bilevel(outer, NanAt(inner, k)), x, y, ib)
        with Untouched(x, y, ib, ob), pytest.raises(FloatingPointError, match=stage(where)):
            tb.hypergrad(prob, tb.stocbio(q, 0.5))(x, y, itertools.repeat(ib), ob)


@pytest.mark.parametrize("est", [tb.aid(tb.cg(steps=3)), tb.stocbio(3, 0.5), tb.itd(3, 0.5),
                                 tb.itd(3, 0.5, checkpoint=True)],
                         ids=["aid", "stocbio", "itd", "itd-checkpoint"])
def test_nan_batches_name_the_stage(est):
    x, y = params()
    ib, ob = batches()
    bad_in = (ib[0].clone(), ib[1].clone())
    bad_in[0][3, 1] = math.nan
    bad_out = (ob[0], ob[1].clone())
    bad_out[1][0] = math.inf
    inner_stage = G.INNER if isinstance(est, tb.estimators.ITD) else G.LINEAR
    hg = tb.hypergrad(tb.Bilevel(outer, inner), est)
    with Untouched(x, y, bad_in, ob), pytest.raises(FloatingPointError, match=stage(inner_stage)):
        hg(x, y, bad_in, ob)
    with Untouched(x, y, ib, bad_out), pytest.raises(FloatingPointError, match=stage(G.OUTER)):
        hg(x, y, ib, bad_out)


def test_nan_inputs_are_named():
    x, y = params()
    ib, ob = batches()
    hg = tb.hypergrad(tb.Bilevel(outer, inner), tb.aid(tb.cg(steps=3)))
    y_bad = {"w": y["w"].clone()}
    y_bad["w"][1] = math.nan
    with Untouched(x, y_bad), pytest.raises(FloatingPointError, match=r"inputs: y\['w'\]"):
        hg(x, y_bad, ib, ob)
    v0 = {"w": torch.full((D,), math.inf, dtype=DT)}
    with Untouched(x, y, v0), pytest.raises(FloatingPointError, match=r"inputs: v0\['w'\]"):
        hg(x, y, ib, ob, v0=v0)


def test_check_finite_false_returns_the_nan():
    x, y = params()
    ib, ob = batches()
    prob = prechecked(tb.Bilevel(outer=outer, inner=NanAt(inner, 1)), x, y, ib)
    dx = tb.hypergrad(prob, tb.aid(tb.cg(steps=3)), check_finite=False)(x, y, ib, ob)
    assert torch.isnan(dx["h"]).all()


# ---------------------------------------------------------------- double_loop
DL_CASES = [
    # (id, estimator, inner_steps, objective, call, stage); AID: calls 1-3 of g are the
    # warm-start inner steps, call 4 the linearisation; f is called once per step
    ("aid-inner-step", tb.aid(tb.cg(steps=3)), 3, "inner", 2, G.INNER),
    ("aid-linear-system", tb.aid(tb.cg(steps=3)), 3, "inner", 4, G.LINEAR),
    ("aid-outer", tb.aid(tb.cg(steps=3)), 3, "outer", 1, G.OUTER),
    ("stocbio-inner-step", tb.stocbio(3, 0.5), 2, "inner", 1, G.INNER),
    ("stocbio-linear-system", tb.stocbio(3, 0.5), 2, "inner", 3, G.LINEAR),
    ("itd-unroll", tb.itd(3, 0.5), 0, "inner", 2, G.INNER),
    ("itd-outer", tb.itd(3, 0.5), 0, "outer", 1, G.OUTER),
    ("pzobo-path", tb.pzobo(2, 0.5, 2, 1e-3, generator=torch.Generator().manual_seed(0)), 0, "inner", 3, G.PATHS),
]


@pytest.mark.parametrize("case", DL_CASES, ids=[c[0] for c in DL_CASES])
def test_double_loop_step_names_the_stage_and_keeps_the_state(case):
    _, est, inner_steps, which, k, where = case
    x0, y0 = params()
    ib, ob = batches()
    fi, fo = NanAt(inner, 0), NanAt(outer, 0)          # k = 0: never NaN
    algo = tb.double_loop(tb.Bilevel(outer=fo, inner=fi), est, lr_x=0.1, inner_steps=inner_steps, lr_y=0.3,
                          outer="adam")
    s = algo.step(algo.init(x0, y0), ib, ob)          # a state with Adam moments (and v for AID)
    target = fi if which == "inner" else fo
    target.calls, target.k = 0, k
    with Untouched(s, ib, ob), pytest.raises(FloatingPointError, match=stage(where)) as err:
        algo.step(s, ib, ob)
    assert "double_loop step 1" in str(err.value) and "unchanged" in str(err.value)
    target.k = 0
    assert algo.step(s, ib, ob).step == 2                  # the old state still steps


def test_double_loop_outer_update_overflow_is_named():
    x0, y0 = params()
    ib, ob = batches()
    algo = tb.double_loop(tb.Bilevel(outer, inner), tb.aid(tb.cg(steps=3)), lr_x=1e308, inner_steps=1, lr_y=0.3)
    s = algo.init(x0, {"w": torch.full((D,), 30.0, dtype=DT)})
    with Untouched(s), pytest.raises(FloatingPointError, match=stage(G.UPDATE)):
        algo.step(s, ib, ob)


def test_double_loop_nan_state_and_init_are_named():
    x0, y0 = params()
    ib, ob = batches()
    algo = tb.double_loop(tb.Bilevel(outer, inner), tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=1, lr_y=0.3)
    bad = {"h": x0["h"].clone()}
    bad["h"][0] = math.nan
    with Untouched(bad, y0), pytest.raises(FloatingPointError, match=r"init: x\['h'\] holds NaN/inf"):
        algo.init(bad, y0)
    s = algo.init(x0, y0)._replace(x=bad)                  # e.g. a corrupted checkpoint
    with Untouched(s), pytest.raises(FloatingPointError, match=r"state\.x\['h'\]"):
        algo.step(s, ib, ob)
    # check_finite=False: no checks at all, the NaN propagates
    loose = tb.double_loop(tb.Bilevel(outer, inner), tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=1,
                           lr_y=0.3, check_finite=False)
    assert torch.isnan(loose.step(loose.init(bad, y0), ib, ob).x["h"]).all()


def test_nan_inner_batch_in_the_warm_start_loop_is_the_inner_stage():
    x0, y0 = params()
    ib, ob = batches()
    algo = tb.double_loop(tb.Bilevel(outer, inner), tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=3, lr_y=0.3)
    s = algo.init(x0, y0)
    nan_batch = (ib[0], torch.full_like(ib[1], math.nan))
    stream = iter([ib, nan_batch] + [ib] * 10)           # the second warm-start step is NaN
    with Untouched(s, ib, nan_batch), pytest.raises(FloatingPointError, match=stage(G.INNER)):
        algo.step(s, stream, ob)


# ---------------------------------------------------------------- fdehbo / fmbo
SINGLE = {"fdehbo": tb.fdehbo, "fmbo": tb.fmbo}
HYPER = dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)


@pytest.mark.parametrize("name", list(SINGLE))
@pytest.mark.parametrize("draw,where", [(0, "inner gradient"), (1, "linear-system products"), ("outer", "outer gradient")],
                         ids=["zeta", "psi", "outer"])
def test_single_loop_nan_batch_names_the_stage(name, draw, where):
    # each step draws ζ_t then ψ_t from the inner stream and ψ_t's outer part from the outer one
    x0, y0 = params()
    ib, ob = batches()
    algo = SINGLE[name](tb.Bilevel(outer, inner), **HYPER)
    s = algo.init(x0, y0)
    for _ in range(3):
        s = algo.step(s, ib, ob)
    nan_in = (torch.full_like(ib[0], math.nan), ib[1])      # NaN features: NaN gradients and products
    nan_out = (ob[0], torch.full_like(ob[1], math.nan))
    if draw == "outer":
        inner_stream, outer_stream = iter([ib] * 4), iter([nan_out] * 4)
    else:
        inner_stream, outer_stream = iter([nan_in if i == draw else ib for i in range(4)]), iter([ob] * 4)
    with Untouched(s, ib, ob, nan_in, nan_out), pytest.raises(FloatingPointError, match=where) as err:
        algo.step(s, inner_stream, outer_stream)
    assert f"{name} step 3" in str(err.value) and "unchanged" in str(err.value)
    assert algo.step(s, ib, ob).step == 4


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_loop_nan_objective_at_a_call_count(name):
    x0, y0 = params()
    ib, ob = batches()
    fi = NanAt(inner, 0)
    algo = SINGLE[name](tb.Bilevel(outer, fi), **HYPER)
    s = algo.init(x0, y0)
    for _ in range(2):
        s = algo.step(s, ib, ob)
    fi.calls = 0                                      # calls per step depend on the engine: count one
    algo.step(s, ib, ob)
    per_step = fi.calls
    for k in range(1, per_step + 1):                  # NaN at every possible call of a step
        fi.calls, fi.k = 0, k
        with Untouched(s), pytest.raises(FloatingPointError, match=f"{name} step 2"):
            algo.step(s, ib, ob)
    fi.k = 0
    assert algo.step(s, ib, ob).step == 3


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_loop_init_rejects_nan(name):
    x0, y0 = params()
    algo = SINGLE[name](tb.Bilevel(outer, inner), **HYPER)
    bad = {"w": y0["w"].clone()}
    bad["w"][0] = math.inf
    with Untouched(x0, bad), pytest.raises(FloatingPointError, match=r"init: y\['w'\] holds NaN/inf"):
        algo.init(x0, bad)


def test_single_loop_overflowing_step_is_named():
    x0, y0 = params()
    ib, ob = batches()
    algo = tb.fdehbo(tb.Bilevel(outer, inner), **dict(HYPER, lr_y=1e308))
    s = algo.init(x0, {"w": torch.full((D,), 1e3, dtype=DT)})
    with Untouched(s), pytest.raises(FloatingPointError, match="update"):
        algo.step(s, ib, ob)


# ---------------------------------------------------------------- malformed inputs
def test_malformed_inputs_battery():
    """Clear errors naming the argument; nothing passed in is modified."""
    x0, y0 = params()
    ib, ob = batches()
    prob = tb.Bilevel(outer, inner)
    dl = tb.double_loop(prob, tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=1, lr_y=0.3)
    fd = tb.fdehbo(prob, **HYPER)
    hg = tb.hypergrad(prob, tb.aid(tb.cg(steps=3)))
    s_dl, s_fd = dl.init(x0, y0), fd.init(x0, y0)
    cases = [
        (lambda: hg(x0, {"w": y0["w"].float()}, ib, ob), TypeError, "x and y"),
        (lambda: hg(x0, {"w": y0["w"].long()}, ib, ob), TypeError, r"y\['w'\]"),
        (lambda: hg({}, y0, ib, ob), ValueError, "x is an empty dict"),
        (lambda: hg(x0, y0, ib, ob, v0={"u": y0["w"]}), ValueError, "v0"),
        (lambda: hg(x0, y0, ib, ob, v0={"w": torch.zeros(D + 1, dtype=DT)}), ValueError, r"v0\['w'\]"),
        (lambda: hg(x0, y0, iter([]), ob), ValueError, "exhausted"),
        (lambda: dl.step((x0, y0), ib, ob), TypeError, "state"),
        (lambda: dl.step(s_fd, ib, ob), TypeError, "state"),
        (lambda: fd.step(s_dl, ib, ob), TypeError, "state"),
        (lambda: fd.step(s_fd, iter([ib]), ob), ValueError, "exhausted"),
        (lambda: dl.load_state_dict(fd.state_dict(s_fd)), ValueError, "checkpoint"),
        (lambda: fd.load_state_dict(dl.state_dict(s_dl)), ValueError, "checkpoint"),
        (lambda: tb.double_loop(prob, tb.aid(tb.cg(steps=3)), lr_x=-1.0), ValueError, "lr_x"),
        (lambda: tb.fdehbo(prob, **dict(HYPER, eta_v=2.0)), ValueError, "eta_v"),
        (lambda: tb.fdehbo(prob, **dict(HYPER, radius=math.nan)), ValueError, "radius"),
        (lambda: tb.distributed.data_parallel(prob), RuntimeError, "init_process_group"),
    ]
    for fn, exc, msg in cases:
        with Untouched(x0, y0, ib, ob, s_dl, s_fd), pytest.raises(exc, match=msg):
            fn()


def test_guards_cost_nothing_when_disabled():
    # no trace is open without check_finite: record() is a no-op
    assert not G._traces()
    G.record(G.INNER, {"w": torch.tensor([math.nan])})
    assert not G._traces()
    with G.tracing(False) as tr:
        assert tr is None and not G._traces()
    with G.tracing(True) as tr:
        G.record(G.OUTER, torch.ones(2))
        G.record(G.LINEAR, {"v": torch.tensor([1.0, math.inf])})
        assert tr.first_nonfinite() == G.LINEAR
    assert not G._traces()


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_loop_nan_state_is_named(name):
    x0, y0 = params()
    ib, ob = batches()
    algo = SINGLE[name](tb.Bilevel(outer, inner), **HYPER)
    s = algo.step(algo.init(x0, y0), ib, ob)
    s = s._replace(h_f=torch.full_like(s.h_f, math.nan))         # e.g. a corrupted checkpoint
    with Untouched(s), pytest.raises(FloatingPointError, match=r"inputs: state\.h_f holds NaN/inf"):
        algo.step(s, ib, ob)
