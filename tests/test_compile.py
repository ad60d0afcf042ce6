"""torch.compile of the hypergradient transforms and of algorithm steps: same results as
eager; one graph (fullgraph=True) wherever the method allows; sync-free single-loop steps
with ``check_finite=False`` (given or default ``delta``); the finite guard still fires when
compiled.

Compilation is slow on a 2-core CPU, so the default inductor backend compiles the two main
cases (AID hypergradient, FdeHBO step) and the ``aot_eager`` backend — the same Dynamo
capture and AOT autograd, without code generation — covers the other methods.
"""
import math

import pytest
import torch

import torchbilevel as tb

DT = torch.float64
N, D = 24, 5
RTOL = 1e-10


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def problem():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(N, D, generator=gen, dtype=DT)
    B = torch.randn(N, D, generator=gen, dtype=DT)

    def inner(x, y, b):
        return 0.5 * ((A @ y["w"] - b) ** 2).mean() + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()

    def outer(x, y, b):
        return 0.5 * ((B @ y["w"] - b) ** 2).mean() + 0.01 * (x["h"] ** 2).sum()

    b = torch.randn(N, generator=gen, dtype=DT)
    x = {"h": torch.linspace(-1.0, 0.0, D, dtype=DT)}
    y = {"w": torch.randn(D, generator=gen, dtype=DT)}
    return tb.Bilevel(outer=outer, inner=inner), x, y, b


def assert_close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=1e-12)


def test_aid_hypergrad_fullgraph_inductor_matches_eager():
    prob, x, y, b = problem()
    hg = tb.hypergrad(prob, tb.aid(tb.cg(steps=5)), has_aux=True, check_finite=False)
    dx, aux = hg(x, y, b, b)
    cdx, caux = torch.compile(hg, fullgraph=True)(x, y, b, b)
    assert_close(cdx, dx)
    assert_close(caux.v, aux.v)


def test_fdehbo_step_is_sync_free_one_graph_and_matches_eager():
    # fullgraph=True fails on any host read (a graph break): with check_finite=False and a
    # given delta the step has none.  Steps 0, 1 and t >= 2 give three graphs (t == 0 is
    # the plain first step; then the step counter becomes a dynamic integer).  The run's
    # first-step decisions (pair mode, ∇y g from the pair) are taken at init from a sample,
    # eagerly: otherwise they would be a graph break at the first step.
    torch._dynamo.reset()                       # count this test's graphs only (other files compile too)
    torch._dynamo.utils.counters.clear()
    prob, x, y, b = problem()
    algo = tb.fdehbo(prob, lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0,
                     delta=1e-4, check_finite=False)
    step = torch.compile(algo.step, fullgraph=True)
    s, c = algo.init(x, y), algo.init(x, y, inner_batch=b)
    for _ in range(4):
        s, c = algo.step(s, b, b), step(c, b, b)
        for field in ("xf", "yf", "vf", "h_f", "h_g", "h_R"):
            torch.testing.assert_close(getattr(c, field), getattr(s, field), rtol=RTOL, atol=1e-12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


@pytest.mark.parametrize("est", [tb.aid(tb.fixed_point(5, 0.3)), tb.stocbio(5, 0.3), tb.itd(4, 0.3),
                                 tb.itd(4, 0.3, checkpoint=True)],
                         ids=["aid-fixed-point", "stocbio", "itd", "itd-checkpoint"])
def test_every_estimator_captures_in_one_graph(est):
    prob, x, y, b = problem()
    hg = tb.hypergrad(prob, est, check_finite=False)
    assert_close(torch.compile(hg, fullgraph=True, backend="aot_eager")(x, y, b, b), hg(x, y, b, b))


def test_pzobo_with_a_generator_compiles_with_a_graph_break():
    # torch.Generator objects are not traceable: the directions are drawn eagerly (a graph
    # break), so the compiled estimate uses the same random numbers as eager
    prob, x, y, b = problem()
    gen = torch.Generator()
    hg = tb.hypergrad(prob, tb.pzobo(3, 0.3, 4, 1e-3, generator=gen), check_finite=False)
    gen.manual_seed(0)
    ref = hg(x, y, b, b)
    gen.manual_seed(0)
    assert_close(torch.compile(hg, backend="aot_eager")(x, y, b, b), ref)


def test_double_loop_step_compiles():
    prob, x, y, b = problem()
    algo = tb.double_loop(prob, tb.aid(tb.cg(steps=4)), lr_x=0.1, inner_steps=2, lr_y=0.3, outer="adam",
                          check_finite=False)
    step = torch.compile(algo.step, fullgraph=True, backend="aot_eager")
    s, c = algo.init(x, y), algo.init(x, y)
    for _ in range(3):
        s, c = algo.step(s, b, b), step(c, b, b)
    assert_close(c.x, s.x)
    assert_close(c.y, s.y)


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_single_loop_step_compiles_in_one_graph(ctor):
    # FdeHBO with the default δ_t (a 0-d device tensor, no host read) and FMBO: one graph
    # with check_finite=False, equal to eager
    prob, x, y, b = problem()
    algo = ctor(prob, lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0,
                check_finite=False)
    step = torch.compile(algo.step, fullgraph=True, backend="aot_eager")
    s, c = algo.init(x, y), algo.init(x, y, inner_batch=b)
    for _ in range(3):
        s, c = algo.step(s, b, b), step(c, b, b)
    assert (c.pair_mode, c.gy_from_pair) == (s.pair_mode, s.gy_from_pair)   # the same decisions
    torch.testing.assert_close(c.xf, s.xf, rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(c.vf, s.vf, rtol=RTOL, atol=1e-12)


def test_finite_guards_fire_under_compile():
    # check_finite=True costs one host read (a graph break, so not fullgraph) and still
    # raises, naming the stage
    prob, x, y, b = problem()
    bad = torch.full_like(b, math.nan)
    hg = tb.hypergrad(prob, tb.aid(tb.cg(steps=3)))
    with pytest.raises(FloatingPointError, match="outer gradient"):
        torch.compile(hg, backend="aot_eager")(x, y, b, bad)
    algo = tb.fdehbo(prob, lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    s = algo.init(x, y)
    with pytest.raises(FloatingPointError, match="fdehbo step 0: .*inner gradient"):
        torch.compile(algo.step, backend="aot_eager")(s, bad, b)
