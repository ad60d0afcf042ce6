"""Clear errors that name the offending argument, FloatingPointError naming the stage where
NaN/inf arose, and the caller's tensors untouched after every failure."""
import math

import pytest
import torch

import torchbilevel as tb

DT = torch.float64


def inner(x, y, batch):
    return 0.5 * ((y["w"] - x["a"]) ** 2).sum() + 0.1 * (y["w"] ** 2).sum()


def outer(x, y, batch):
    return ((y["w"] - 1.0) ** 2).sum() + (x["a"] ** 2).sum()


PROBLEM = tb.Bilevel(outer=outer, inner=inner)
ESTIMATORS = [tb.aid(tb.cg(steps=3)), tb.aid(tb.fixed_point(steps=3, lr=0.5)), tb.itd(3, 0.5),
              tb.stocbio(3, 0.5), tb.pzobo(3, 0.5, 4, 1e-3, generator=torch.Generator().manual_seed(0))]
EST_IDS = ["aid-cg", "aid-fp", "itd", "stocbio", "pzobo"]


def params():
    return {"a": torch.tensor([0.5, -1.0, 2.0], dtype=DT)}, {"w": torch.tensor([0.1, 0.2, 0.3], dtype=DT)}


class Untouched:
    """Snapshot dicts of tensors; on exit assert values, dtypes and autograd flags are unchanged."""

    def __init__(self, *trees):
        self.trees = trees
        self.copies = [{k: (t.clone(), t.requires_grad) for k, t in tr.items()} for tr in trees]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tr, cp in zip(self.trees, self.copies):
            assert tr.keys() == cp.keys()
            for k, (c, rg) in cp.items():
                assert tr[k].dtype == c.dtype and torch.equal(tr[k].detach(), c) and tr[k].requires_grad == rg
                assert tr[k].grad is None
        return False


# ---------------------------------------------------------------- objectives
def test_non_callable_objectives():
    with pytest.raises(TypeError, match="outer"):
        tb.Bilevel(outer=3.0, inner=inner)
    with pytest.raises(TypeError, match="inner"):
        tb.Bilevel(outer=outer, inner="loss")


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("which", ["outer", "inner"])
@pytest.mark.parametrize("bad,exc", [(lambda v: float(v), TypeError), (lambda v: v * torch.ones(3, dtype=DT), ValueError),
                                     (lambda v: [v], TypeError)])
def test_objective_must_return_scalar_tensor(est, which, bad, exc):
    wrap = lambda fn: (lambda x, y, b: bad(fn(x, y, b)))
    prob = tb.Bilevel(outer=wrap(outer) if which == "outer" else outer,
                      inner=wrap(inner) if which == "inner" else inner)
    x, y = params()
    with Untouched(x, y), pytest.raises(exc, match=f"{which} objective"):
        tb.hypergrad(prob, est)(x, y, None, None)


def test_shape_one_objective_is_accepted():
    prob = tb.Bilevel(outer=lambda x, y, b: outer(x, y, b).reshape(1), inner=inner)
    x, y = params()
    dx = tb.hypergrad(prob, tb.aid(tb.cg(steps=3)))(x, y, None, None)
    ref = tb.hypergrad(PROBLEM, tb.aid(tb.cg(steps=3)))(x, y, None, None)
    assert torch.equal(dx["a"], ref["a"])


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("make,name", [
    (lambda: tb.cg(steps=0), "steps"),
    (lambda: tb.fixed_point(steps=0, lr=0.1), "steps"),
    (lambda: tb.itd(0, 0.1), "steps"),
    (lambda: tb.stocbio(0, 0.1), "neumann_steps"),
    (lambda: tb.pzobo(0, 0.1, 4, 0.01), "steps"),
    (lambda: tb.pzobo(3, 0.1, 0, 0.01), "directions"),
    (lambda: tb.double_loop(PROBLEM, tb.itd(2, 0.1), inner_steps=-1), "inner_steps"),
])
def test_steps_below_one(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make,name", [
    (lambda: tb.cg(steps=2.5), "steps"),
    (lambda: tb.itd(True, 0.1), "steps"),
    (lambda: tb.stocbio("3", 0.1), "neumann_steps"),
])
def test_steps_not_integer(make, name):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize("value", [0.0, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("make,name", [
    (lambda v: tb.fixed_point(steps=3, lr=v), "lr"),
    (lambda v: tb.itd(3, v), "lr"),
    (lambda v: tb.stocbio(3, v), "eta"),
    (lambda v: tb.pzobo(3, v, 4, 0.01), "lr"),
    (lambda v: tb.pzobo(3, 0.1, 4, v), "mu"),
    (lambda v: tb.cg(steps=3, tol=v), "tol"),
    (lambda v: tb.double_loop(PROBLEM, tb.itd(2, 0.1), lr_x=v), "lr_x"),
    (lambda v: tb.double_loop(PROBLEM, tb.itd(2, 0.1), lr_y=v), "lr_y"),
])
def test_non_positive_step_sizes(make, name, value):
    with pytest.raises(ValueError, match=name):
        make(value)


@pytest.mark.parametrize("make,name", [
    (lambda: tb.itd(3, "0.1"), "lr"),
    (lambda: tb.stocbio(3, None), "eta"),
    (lambda: tb.pzobo(3, 0.1, 4, [0.01]), "mu"),
])
def test_step_size_not_a_number(make, name):
    with pytest.raises(TypeError, match=name):
        make()


def test_schedule_value_checked_when_used():
    x, y = params()
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=2)), lr_x=lambda k: 0.1 if k == 0 else -1.0)
    s = algo.step(algo.init(x, y), None, None)
    with Untouched(s.x, s.y), pytest.raises(ValueError, match=r"lr_x\(1\)"):
        algo.step(s, None, None)


@pytest.mark.parametrize("solver", [None, 10, {"steps": 3}, tb.itd(3, 0.1)])
def test_aid_needs_a_solver_config(solver):
    with pytest.raises(TypeError, match="solver"):
        tb.aid(solver)


def test_mode_values():
    with pytest.raises(ValueError, match="mode"):
        tb.aid(tb.cg(steps=2), mode="jvp")
    with pytest.raises(ValueError, match="mode"):
        tb.stocbio(2, 0.1, mode="jvp")


@pytest.mark.parametrize("est", [None, tb.cg(steps=3), "aid", lambda *a: None])
def test_estimator_must_be_an_estimator(est):
    with pytest.raises(TypeError, match="estimator"):
        tb.hypergrad(PROBLEM, est)
    with pytest.raises(TypeError, match="estimator"):
        tb.double_loop(PROBLEM, est)


def test_problem_must_be_bilevel():
    with pytest.raises(TypeError, match="problem"):
        tb.hypergrad((outer, inner), tb.itd(2, 0.1))
    with pytest.raises(TypeError, match="problem"):
        tb.double_loop(outer, tb.itd(2, 0.1))


def test_other_config_errors():
    with pytest.raises(ValueError, match="outer"):
        tb.double_loop(PROBLEM, tb.itd(2, 0.1), outer="rmsprop")
    with pytest.raises(TypeError, match="generator"):
        tb.pzobo(3, 0.1, 4, 0.01, generator=0)


# ---------------------------------------------------------------- parameters
@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_parameter_validation(est):
    hg = tb.hypergrad(PROBLEM, est)
    x, y = params()
    cases = [
        ({"a": torch.tensor([1, 2, 3])}, y, TypeError, r"x\['a'\].*int64"),
        (x, {"w": torch.tensor([1, 2, 3])}, TypeError, r"y\['w'\].*int64"),
        ({"a": x["a"].float()}, y, TypeError, "x and y"),
        ({}, y, ValueError, "x is an empty dict"),
        (x, {}, ValueError, "y is an empty dict"),
        ([x["a"]], y, TypeError, "x must be a dict"),
        (x, {"w": [0.1, 0.2, 0.3]}, TypeError, r"y\['w'\]"),
    ]
    for xx, yy, exc, msg in cases:
        with Untouched(*(d for d in (xx, yy) if isinstance(d, dict) and all(isinstance(t, torch.Tensor) for t in d.values()))):
            with pytest.raises(exc, match=msg):
                hg(xx, yy, None, None)


def test_double_loop_init_validates_parameters():
    algo = tb.double_loop(PROBLEM, tb.itd(2, 0.1))
    x, y = params()
    with pytest.raises(TypeError, match="x and y"):
        algo.init(x, {"w": y["w"].float()})
    with pytest.raises(ValueError, match="empty"):
        algo.init(x, {})


def test_v0_keys_must_match_y():
    x, y = params()
    hg = tb.hypergrad(PROBLEM, tb.aid(tb.cg(steps=3)))
    with Untouched(x, y), pytest.raises(ValueError, match="v0"):
        hg(x, y, None, None, v0={"other": torch.zeros(3, dtype=DT)})


def test_exhausted_iterator():
    x, y = params()
    hg = tb.hypergrad(PROBLEM, tb.stocbio(3, 0.5))
    with Untouched(x, y), pytest.raises(ValueError, match="exhausted"):
        hg(x, y, iter([None, None]), None)


# ---------------------------------------------------------------- non-finite values
def nan_inner(x, y, batch):
    return inner(x, y, batch) * torch.tensor(math.nan, dtype=DT)


def nan_outer(x, y, batch):
    return outer(x, y, batch) * torch.tensor(math.nan, dtype=DT)      # NaN value and gradients


@pytest.mark.parametrize("est,stage", [
    (tb.aid(tb.cg(steps=3)), "linear-system solution v"),
    (tb.aid(tb.fixed_point(steps=3, lr=0.5)), "linear-system solution v"),
    (tb.stocbio(3, 0.5), "linear-system solution v"),
    (tb.itd(3, 0.5), "inner iterate"),
    (tb.pzobo(3, 0.5, 4, 1e-3), "inner iterate"),
], ids=EST_IDS)
def test_nan_inner_objective_names_the_stage(est, stage):
    x, y = params()
    prob = tb.Bilevel(outer=outer, inner=nan_inner)
    with Untouched(x, y), pytest.raises(FloatingPointError, match=stage):
        tb.hypergrad(prob, est)(x, y, None, None)
    # without the check the NaN comes back (no silent zero either)
    dx = tb.hypergrad(prob, est, check_finite=False)(x, y, None, None)
    assert torch.isnan(dx["a"]).any()


@pytest.mark.parametrize("est", ESTIMATORS, ids=EST_IDS)
def test_nan_outer_objective_names_the_stage(est):
    x, y = params()
    prob = tb.Bilevel(outer=nan_outer, inner=inner)
    with Untouched(x, y), pytest.raises(FloatingPointError, match="outer objective f"):
        tb.hypergrad(prob, est)(x, y, None, None)


def test_nan_outer_value_with_finite_gradients_is_not_an_error():
    # a NaN constant in f leaves every gradient finite: the hypergradient is finite too
    prob = tb.Bilevel(outer=lambda x, y, b: outer(x, y, b) + torch.log(torch.tensor(-1.0, dtype=DT)), inner=inner)
    x, y = params()
    dx, aux = tb.hypergrad(prob, tb.aid(tb.cg(steps=3)), has_aux=True)(x, y, None, None)
    ref = tb.hypergrad(PROBLEM, tb.aid(tb.cg(steps=3)))(x, y, None, None)
    assert torch.equal(dx["a"], ref["a"]) and torch.isnan(aux.outer_loss)


def test_nan_mixed_product_names_the_hypergradient():
    # finite g, ∇y g and HVP; only ∇xy g is NaN (x enters through a sqrt at a negative value,
    # whose derivative only the mixed product sees)
    def g(x, y, batch):
        return 0.5 * (y["w"] ** 2).sum() - (y["w"] * torch.nan_to_num(torch.sqrt(x["a"]))).sum()
    x, y = params()
    with Untouched(x, y), pytest.raises(FloatingPointError, match="hypergradient"):
        tb.hypergrad(tb.Bilevel(outer=outer, inner=g), tb.aid(tb.cg(steps=3)))(x, y, None, None)


def test_double_loop_nan_leaves_state_untouched():
    x, y = params()
    prob = tb.Bilevel(outer=outer, inner=lambda x, y, b: inner(x, y, b) * b)
    algo = tb.double_loop(prob, tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=2, lr_y=0.5)
    s = algo.step(algo.init(x, y), 1.0, None)
    snapshot = [s.x, s.y, s.v]
    with Untouched(*snapshot), pytest.raises(FloatingPointError):
        algo.step(s, math.nan, None)
    assert s.step == 1
    # and the same state still steps normally afterwards
    assert algo.step(s, 1.0, None).step == 2
