"""tb.hypergrad under torch.func.vmap over tasks (shared x, one y and one dataset per task)
equals a Python loop over the tasks."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import torchbilevel as tb

DT = torch.float64
TASKS = 3


def inner(x, y, batch):
    X, t = batch
    logits = torch.tanh(X @ x["proj"]) @ y["w"] + y["b"]
    return F.softplus(-t * logits).mean() + 0.5 * torch.exp(x["loglam"]) * (y["w"] ** 2).sum() + 0.05 * y["b"] ** 2


def outer(x, y, batch):
    X, t = batch
    return F.softplus(-t * (torch.tanh(X @ x["proj"]) @ y["w"] + y["b"])).mean()


PROBLEM = tb.Bilevel(outer=outer, inner=inner)


def tasks(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    x = {"proj": 0.5 * r(4, 3), "loglam": torch.tensor(-1.0, dtype=DT)}        # shared (a 0-d entry too)
    ys = {"w": r(TASKS, 3), "b": r(TASKS)}                                     # one y per task
    sign = lambda a: torch.where(a > 0, 1.0, -1.0).to(DT)
    ib = (r(TASKS, 20, 4), sign(r(TASKS, 20)))                                 # task-specific data
    ob = (r(TASKS, 15, 4), sign(r(TASKS, 15)))
    return x, ys, ib, ob


ESTIMATORS = {
    "aid-cg": tb.aid(tb.cg(steps=6)),
    "aid-cg-func": tb.aid(tb.cg(steps=6), mode="func"),
    "aid-fp": tb.aid(tb.fixed_point(steps=15, lr=0.5)),
    "itd": tb.itd(steps=5, lr=0.5),
    "stocbio": tb.stocbio(neumann_steps=8, eta=0.5),
}


def task(tree, i):
    return {k: t[i] for k, t in tree.items()}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_vmap_over_tasks_equals_loop(name):
    x, ys, ib, ob = tasks()
    hg = tb.hypergrad(PROBLEM, ESTIMATORS[name], has_aux=True)
    # ITD's aux.v, aux.solve and aux.inner_loss are None: vmap needs out_dims=None for those leaves
    solved = None if name == "itd" else 0
    out_dims = (0, tb.HypergradAux(0, solved, 0, solved, solved))
    dx, aux = vmap(hg, in_dims=(None, 0, 0, 0), out_dims=out_dims)(x, ys, ib, ob)
    plain = vmap(tb.hypergrad(PROBLEM, ESTIMATORS[name]), in_dims=(None, 0, 0, 0))(x, ys, ib, ob)
    if name != "itd":                       # the solve's report (AID, stocBiO) is per task, as tensors
        assert aux.solve.residual.shape == (TASKS,) and aux.solve.nonpositive_curvature.shape == (TASKS,)
    for k in x:
        torch.testing.assert_close(plain[k], dx[k], rtol=0, atol=0)
    assert dx["proj"].shape == (TASKS, 4, 3) and dx["loglam"].shape == (TASKS,)
    for i in range(TASKS):
        ref, ref_aux = hg(x, task(ys, i), tuple(t[i] for t in ib), tuple(t[i] for t in ob))
        for k in x:
            torch.testing.assert_close(dx[k][i], ref[k], rtol=1e-10, atol=1e-12)
        for k in ys:
            torch.testing.assert_close(aux.y[k][i], ref_aux.y[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(aux.outer_loss[i], ref_aux.outer_loss)
        if ref_aux.v is not None:
            for k in ys:
                torch.testing.assert_close(aux.v[k][i], ref_aux.v[k], rtol=1e-10, atol=1e-12)
    # the per-task hypergradients differ (the test is not comparing one task with itself)
    assert not torch.allclose(dx["proj"][0], dx["proj"][1])


def test_vmap_mean_over_tasks_is_the_meta_gradient():
    # the hypergradient of the task-averaged objective is the mean of the per-task ones
    x, ys, ib, ob = tasks(1)
    hg = tb.hypergrad(PROBLEM, tb.aid(tb.cg(steps=6)))
    dx = vmap(hg, in_dims=(None, 0, 0, 0))(x, ys, ib, ob)
    loop = [hg(x, task(ys, i), tuple(t[i] for t in ib), tuple(t[i] for t in ob)) for i in range(TASKS)]
    for k in x:
        torch.testing.assert_close(dx[k].mean(0), torch.stack([d[k] for d in loop]).mean(0), rtol=1e-10, atol=1e-12)


def test_vmap_warm_start_v0_per_task():
    x, ys, ib, ob = tasks(2)
    hg = tb.hypergrad(PROBLEM, tb.aid(tb.cg(steps=2)), has_aux=True)
    _, aux = vmap(hg, in_dims=(None, 0, 0, 0))(x, ys, ib, ob)
    dx, _ = vmap(hg, in_dims=(None, 0, 0, 0, 0))(x, ys, ib, ob, aux.v)
    for i in range(TASKS):
        args = (x, task(ys, i), tuple(t[i] for t in ib), tuple(t[i] for t in ob))
        _, a = hg(*args)
        ref, _ = hg(*args, v0=a.v)
        for k in x:
            torch.testing.assert_close(dx[k][i], ref[k], rtol=1e-10, atol=1e-12)
