"""Half precision: bfloat16 (and float16) parameters work with every method, finite-difference
steps stay float32, and an FdeHBO trajectory in bfloat16 tracks the float32 one.

Tolerances (smooth logistic problem, all numbers measured on this problem):
- hypergradients in bfloat16 vs float64: relative error <= 3e-2 (measured 0.3-0.6%);
  bfloat16 keeps 8 significant bits, unit roundoff u = 2^-8 = 3.9e-3;
- FdeHBO / FMBO with bfloat16 state vs float32, 150 steps: max over steps of
  ||z_bf16 - z_f32|| / max(1, ||z_f32||) <= 6e-2 with z = (x, y) (measured 2.3% FdeHBO,
  4.2% FMBO): the state itself is stored in bfloat16, so an update smaller than half an
  ulp of x is lost and the iterates stall within a few ulps of the float32 path;
  float16 (11 bits) <= 1e-2 (measured 0.3-0.4%);
- float32 master parameters with bfloat16 compute inside the objectives (the usual mixed
  precision recipe): <= 1e-2 for FMBO and for FdeHBO with delta=0.2 (measured 0.2% and
  0.5%; 4.1% with the default δ, whose float32 rule is too small for bfloat16 gradients).
"""
import pytest
import torch

import torchbilevel as tb
from torchbilevel import derivatives as Dv

D = 6
N = 128


def cast(t, dt):
    return {k: v.to(dt) for k, v in t.items()} if isinstance(t, dict) else tuple(v.to(dt) for v in t)


def setup():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    Xv = torch.randn(N, D, generator=gen, dtype=torch.float64)
    wt = torch.randn(D, generator=gen, dtype=torch.float64)
    lab = (X @ wt + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64) > 0).double()
    return (X, lab), (Xv, (Xv @ wt > 0).double())


def inner(x, y, b):
    X, lab = b
    z = X @ y["w"] + y["b"]
    return torch.nn.functional.binary_cross_entropy_with_logits(z, lab) + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()


def outer(x, y, b):
    X, lab = b
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ y["w"] + y["b"], lab)


PROBLEM = tb.Bilevel(outer=outer, inner=inner)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny float32 matmuls on a shared 2-core machine: a second intra-op thread only waits
    # for a busy core (measured 96 ms vs 5 ms per step); results do not depend on it
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def start(dt, h=-1.0):
    gen = torch.Generator().manual_seed(1)
    return ({"h": torch.full((D,), h, dtype=dt)},
            {"w": (0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dt), "b": torch.tensor(0.1, dtype=dt)})


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


ESTIMATORS = {
    "aid-cg": lambda: tb.aid(tb.cg(8)),
    "aid-fixed-point": lambda: tb.aid(tb.fixed_point(8, 0.5)),
    "stocbio": lambda: tb.stocbio(8, 0.5),
    "itd": lambda: tb.itd(8, 0.5),
    "itd-checkpoint": lambda: tb.itd(8, 0.5, checkpoint=True),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_half_precision_hypergradients_match_float64(name, dt):
    train, val = setup()
    ref = tb.hypergrad(PROBLEM, ESTIMATORS[name]())(*start(torch.float64), train, val)
    dx, aux = tb.hypergrad(PROBLEM, ESTIMATORS[name](), has_aux=True)(*start(dt), cast(train, dt), cast(val, dt))
    assert dx["h"].dtype == dt and all(t.dtype == dt for t in aux.y.values())
    assert rel(dx["h"], ref["h"]) <= 3e-2


class GivenDirections(tb.estimators.PZOBO):
    """PZOBO with directions fixed in advance (to compare precisions on the same draws)."""
    directions_value = None

    def sample_directions(self, x):
        return {k: t.to(next(iter(x.values())).dtype) for k, t in GivenDirections.directions_value.items()}


def test_half_precision_pzobo_matches_float64_on_the_same_directions():
    train, val = setup()
    x16, y16 = start(torch.bfloat16)
    est16 = tb.pzobo(8, 0.5, directions=6, mu=0.2, generator=torch.Generator().manual_seed(0))
    GivenDirections.directions_value = est16.sample_directions(x16)
    est16 = GivenDirections(*est16)
    est64 = GivenDirections(*tb.pzobo(8, 0.5, directions=6, mu=0.2))
    dx16 = tb.hypergrad(PROBLEM, est16)(x16, y16, cast(train, torch.bfloat16), cast(val, torch.bfloat16))
    dx64 = tb.hypergrad(PROBLEM, est64)(*start(torch.float64), train, val)
    assert dx16["h"].dtype == torch.bfloat16
    assert rel(dx16["h"], dx64["h"]) <= 5e-2


def test_fd_step_and_difference_are_float32_for_half_inputs():
    train, _ = setup()
    x, y = start(torch.bfloat16)
    v = {"w": torch.ones(D, dtype=torch.bfloat16), "b": torch.tensor(1.0, dtype=torch.bfloat16)}
    p = Dv.fd_products(inner, x, y, v, cast(train, torch.bfloat16), delta=0.2)
    assert p.delta.dtype == torch.float32                    # δ never rounded to bfloat16
    assert all(t.dtype == torch.bfloat16 for t in p.hvp.values())
    exact = Dv.hvp(inner, *start(torch.float64), cast(v, torch.float64), train)
    err = sum(((p.hvp[k].double() - exact[k]) ** 2).sum() for k in exact).sqrt() / \
        sum((exact[k] ** 2).sum() for k in exact).sqrt()
    assert err <= 3e-2                                         # measured 2.4% with δ = 0.2
    assert Dv.fd_delta(y, v).dtype == torch.float32
    # the default δ uses bfloat16's ε (ε^(1/3) ≈ 0.2): accurate like the hand-picked δ
    p_default = Dv.fd_products(inner, x, y, v, cast(train, torch.bfloat16))
    err_default = sum(((p_default.hvp[k].double() - exact[k]) ** 2).sum() for k in exact).sqrt() / \
        sum((exact[k] ** 2).sum() for k in exact).sqrt()
    assert err_default <= 5e-2


def trajectory(problem, ctor, dt, steps=150, **kw):
    train, val = setup()
    algo = ctor(problem, lr_x=0.5, lr_y=1.0, lr_v=1.0, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0, **kw)
    s = algo.init(*start(dt, h=0.0))
    ib, ob = cast(train, dt), cast(val, dt)
    out = []
    for _ in range(steps):
        s = algo.step(s, ib, ob)
        out.append(torch.cat([s.xf.double(), s.yf.double()]))
    return torch.stack(out), s


def max_rel_deviation(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1.0)).max().item()


@pytest.mark.parametrize("ctor", [tb.fdehbo, tb.fmbo])
def test_half_precision_trajectory_tracks_float32(ctor):
    ref, s32 = trajectory(PROBLEM, ctor, torch.float32)
    bf, sb = trajectory(PROBLEM, ctor, torch.bfloat16)
    assert sb.xf.dtype == torch.bfloat16 and sb.h_f.dtype == torch.bfloat16 and sb.vf.dtype == torch.bfloat16
    assert torch.isfinite(bf).all()
    assert max_rel_deviation(bf, ref) <= 6e-2
    fp, _ = trajectory(PROBLEM, ctor, torch.float16)
    assert max_rel_deviation(fp, ref) <= 1e-2
    # and the outer loss reached is within 3% of the float32 run's
    _, val = setup()
    loss = lambda s: outer(cast(s.x, torch.float64), cast(s.y, torch.float64), val).item()
    assert abs(loss(sb) - loss(s32)) <= 3e-2 * loss(s32)


def test_float32_master_parameters_with_bfloat16_compute():
    # the usual recipe: parameters and optimiser state in float32, objectives evaluated in
    # bfloat16.  FD products then need a δ suited to bfloat16 gradients (ε_bf16^(1/3) ≈ 0.2)
    def inner16(x, y, b):
        return inner(cast(x, torch.bfloat16), cast(y, torch.bfloat16), cast(b, torch.bfloat16)).float()

    def outer16(x, y, b):
        return outer(cast(x, torch.bfloat16), cast(y, torch.bfloat16), cast(b, torch.bfloat16)).float()

    mixed = tb.Bilevel(outer=outer16, inner=inner16)
    ref, _ = trajectory(PROBLEM, tb.fmbo, torch.float32)
    for ctor, kw in ((tb.fmbo, {}), (tb.fdehbo, {"delta": 0.2})):
        traj, s = trajectory(mixed, ctor, torch.float32, **kw)
        assert s.xf.dtype == torch.float32
        assert max_rel_deviation(traj, ref) <= 1e-2, ctor.__name__
