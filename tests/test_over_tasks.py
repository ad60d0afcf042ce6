"""tb.over_tasks: the meta-gradient (mean over tasks of the per-task hypergradients) in loop
and vmap mode equals a Python loop of tb.hypergrad calls on single tasks (float64, 1e-10),
for every estimator, with aux, declared features, train-mode BatchNorm (per-task batch
statistics, running statistics untouched) and dropout (one stream per task, common random
numbers within it); bad meta-batches raise errors naming the argument."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb

DT = torch.float64
TASKS, WAYS, SHOT, QUERY = 2, 3, 2, 4


class Net(nn.Module):
    """A one-block CNN body (conv, BatchNorm, ReLU, max-pool) and a linear head."""

    def __init__(self, norm=True, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if norm else []) + [
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()] + ([nn.Dropout(dropout)] if dropout else [])
        self.body, self.head = nn.Sequential(*layers), nn.Linear(4 * 4 * 4, WAYS)

    def forward(self, images):
        return self.head(self.body(images))


def make_model(norm=True, dropout=0.0):
    return Net(norm, dropout).to(DT).train()


def problems(model):
    """(declared, undeclared) forms of the ANIL problem: body x, head y, L2 on the head."""
    phi, head = tb.nn.features(model, body="body", head="head")
    reg = lambda y: 0.05 * sum((v * v).sum() for v in y.values())
    declared = tb.Bilevel(outer=lambda z, y, b: F.cross_entropy(head(z, y), b[1]),
                          inner=lambda z, y, b: F.cross_entropy(head(z, y), b[1]) + reg(y), features=phi)
    full = lambda x, y, b: F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1])
    undeclared = tb.Bilevel(outer=full, inner=lambda x, y, b: full(x, y, b) + reg(y))
    return declared, undeclared


def meta_batch(seed=0, tasks=TASKS):
    gen = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(WAYS).repeat(k).expand(tasks, WAYS * k).clone()
    support = (torch.randn(tasks, WAYS * SHOT, 1, 8, 8, dtype=DT, generator=gen), labels(SHOT))
    query = (torch.randn(tasks, WAYS * QUERY, 1, 8, 8, dtype=DT, generator=gen), labels(QUERY))
    return support, query


def start(model, tasks=TASKS, seed=1):
    x, y = tb.nn.split(model, inner=["head"])
    gen = torch.Generator().manual_seed(seed)
    ys = {k: 0.1 * torch.randn(tasks, *v.shape, dtype=DT, generator=gen) for k, v in y.items()}
    return dict(x), ys


def task(tree, i):
    return tuple(t[i] for t in tree) if isinstance(tree, tuple) else {k: t[i] for k, t in tree.items()}


# PZOBO with mu = 1e-3: its difference quotient divides rounding by mu (at 1e-5 the modes,
# whose batched and per-task convolutions round differently, agreed to 8e-10 only)
ESTIMATORS = {
    "itd": lambda: tb.itd(4, 0.5),
    "itd-checkpoint": lambda: tb.itd(4, 0.5, checkpoint=True),
    "aid-cg": lambda: tb.aid(tb.cg(steps=4)),
    "aid-fp": lambda: tb.aid(tb.fixed_point(steps=4, lr=0.3)),
    "stocbio": lambda: tb.stocbio(4, 0.3),
    "pzobo": lambda: tb.pzobo(3, 0.5, 2, 1e-3, generator=torch.Generator().manual_seed(3)),
    "pzobo-sphere": lambda: tb.pzobo(3, 0.5, 2, 1e-3, distribution="sphere",
                                     generator=torch.Generator().manual_seed(3)),
    "first_order": lambda: tb.first_order(),
}


def close(a, b, tol=1e-10):
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def per_task_reference(problem, est, x, ys, support, query):
    """A Python loop of tb.hypergrad calls on single tasks: (mean dx, list of aux)."""
    hg = tb.hypergrad(problem, est, has_aux=True)
    outs = [hg(x, task(ys, i), task(support, i), task(query, i)) for i in range(TASKS)]
    mean = {k: torch.stack([d[k] for d, _ in outs]).mean(0) for k in x}
    return mean, [a for _, a in outs]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_modes_equal_a_loop_of_hypergrad_calls(name):
    model = make_model()
    declared, _ = problems(model)
    x, ys = start(model)
    support, query = meta_batch()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    ref, ref_aux = per_task_reference(declared, ESTIMATORS[name](), x, ys, support, query)
    for mode in ("loop", "vmap"):          # ("auto" is "loop" on CPU: test_auto_picks_loop_on_cpu)
        dx, aux = tb.over_tasks(tb.hypergrad(declared, ESTIMATORS[name](), has_aux=True), mode=mode)(
            x, ys, support, query)
        close(dx, ref)
        for i in range(TASKS):
            close(task(aux.y, i), ref_aux[i].y)
            torch.testing.assert_close(aux.outer_loss[i], ref_aux[i].outer_loss, rtol=1e-10, atol=1e-10)
            assert (aux.v is None) == (ref_aux[i].v is None)
            if aux.v is not None:
                close(task(aux.v, i), ref_aux[i].v)
    if name in ("itd", "aid-cg"):       # without aux: the dict alone
        plain = tb.over_tasks(tb.hypergrad(declared, ESTIMATORS[name]()), mode="auto")(x, ys, support, query)
        close(plain, ref)
    # per-task BatchNorm: running statistics untouched in every mode
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    # the tasks differ (the mean is not over one task repeated)
    assert not torch.allclose(ref_aux[0].outer_loss, ref_aux[1].outer_loss)


@pytest.mark.parametrize("name", ["itd", "aid-cg", "first_order"])
def test_declared_features_give_the_composed_numbers(name):
    model = make_model()
    declared, undeclared = problems(model)
    x, ys = start(model)
    support, query = meta_batch(2)
    ref = tb.over_tasks(tb.hypergrad(undeclared, ESTIMATORS[name]()), mode="loop")(x, ys, support, query)
    for mode in ("loop", "vmap"):
        close(tb.over_tasks(tb.hypergrad(declared, ESTIMATORS[name]()), mode=mode)(x, ys, support, query), ref)


def test_batchnorm_uses_each_tasks_own_statistics():
    # a task whose images are scaled by 3: BatchNorm with that task's batch statistics
    # removes the change (conv(3a) = 3·Wa + b, normalised per channel), so its inner path and
    # outer loss are the unscaled task's (up to BatchNorm's eps); statistics pooled over the
    # meta-batch would not remove it
    model = make_model()
    declared, _ = problems(model)
    x, y1 = start(model, tasks=1)
    (xs, ts), (xq, tq) = meta_batch(4, tasks=1)
    ys = {k: v.expand(2, *v.shape[1:]).clone() for k, v in y1.items()}
    support = (torch.cat([xs, 3.0 * xs]), torch.cat([ts, ts]))
    query = (torch.cat([xq, 3.0 * xq]), torch.cat([tq, tq]))
    for mode in ("loop", "vmap"):
        dx, aux = tb.over_tasks(tb.hypergrad(declared, tb.itd(3, 0.5), has_aux=True), mode=mode)(x, ys, support, query)
        torch.testing.assert_close(aux.outer_loss[0], aux.outer_loss[1], rtol=1e-4, atol=0)
        close(task(aux.y, 0), task(aux.y, 1), tol=1e-4)
    # pooled statistics (one task of both halves) do not remove the scale
    pooled = (torch.cat([xs, 3.0 * xs], 1), torch.cat([ts, ts], 1))
    one = {k: v[:1] for k, v in ys.items()}
    _, aux = tb.over_tasks(tb.hypergrad(declared, tb.itd(3, 0.5), has_aux=True), mode="loop")(
        x, one, pooled, (torch.cat([xq, 3.0 * xq], 1), torch.cat([tq, tq], 1)))
    per_half = tb.nn.call(model, x, task(one, 0), xq[0])
    assert not torch.allclose(per_half, tb.nn.call(model, x, task(one, 0), pooled[0][0])[: len(xq[0])])


def test_dropout_one_stream_per_task_and_common_numbers_within():
    net = Net(norm=False, dropout=0.5).to(DT).train()
    x, y = tb.nn.split(net, inner=["head"])
    x = dict(x)
    full = lambda x, y, b: F.cross_entropy(tb.nn.call(net, x, y, b[0]), b[1])
    problem = tb.Bilevel(outer=full, inner=lambda x, y, b: full(x, y, b) + 0.05 * (y["head.weight"] ** 2).sum())
    (xs, ts), (xq, tq) = meta_batch(5, tasks=1)
    support, query = (xs.expand(2, *xs.shape[1:]), ts.expand(2, -1)), (xq.expand(2, *xq.shape[1:]), tq.expand(2, -1))
    ys = {k: v.expand(2, *v.shape).clone() for k, v in y.items()}
    # loop mode: the tasks' calls are tb.hypergrad calls drawing one after another
    torch.manual_seed(7)
    ref, _ = per_task_reference(problem, tb.itd(3, 0.5), x, {k: v[:1].expand(3, *v.shape[1:]) for k, v in ys.items()},
                                tuple(t[:1].expand(3, *t.shape[1:]) for t in support),
                                tuple(t[:1].expand(3, *t.shape[1:]) for t in query))
    torch.manual_seed(7)
    hg = tb.hypergrad(problem, tb.itd(3, 0.5), has_aux=True)
    first = [hg(x, task(ys, 0), task(support, 0), task(query, 0)), hg(x, task(ys, 1), task(support, 1), task(query, 1))]
    torch.manual_seed(7)
    dx, aux = tb.over_tasks(hg, mode="loop")(x, ys, support, query)
    close(dx, {k: (first[0][0][k] + first[1][0][k]) / 2 for k in x})
    for mode in ("loop", "vmap"):
        torch.manual_seed(7)
        _, aux = tb.over_tasks(hg, mode=mode)(x, ys, support, query)
        # two identical tasks, two streams: different masks, different losses
        assert not torch.allclose(aux.outer_loss[0], aux.outer_loss[1]), mode
    # common random numbers within a task: PZOBO's perturbed and unperturbed paths share the
    # masks (with independent masks the difference / mu would be ~1/mu = 1e7 times too large;
    # Gaussian PZOBO with 4 directions has variance ~ dim(x) / 4 around the true value)
    est = lambda: tb.pzobo(3, 0.5, 4, 1e-7, generator=torch.Generator().manual_seed(0))
    for mode in ("loop", "vmap"):
        torch.manual_seed(3)
        dz = tb.over_tasks(tb.hypergrad(problem, est()), mode=mode)(x, ys, support, query)
        torch.manual_seed(3)
        fo = tb.over_tasks(tb.hypergrad(problem, tb.first_order()), mode=mode)(x, ys, support, query)
        ratio = tb.tree.norm(dz) / tb.tree.norm(fo)
        assert 0.05 < float(ratio) < 1e3, (mode, float(ratio))   # mask noise / mu would be ~1e6


def test_list_of_task_batches_is_stacked():
    model = make_model()
    declared, _ = problems(model)
    x, ys = start(model)
    support, query = meta_batch(6)
    listed = [task(support, i) for i in range(TASKS)], [task(query, i) for i in range(TASKS)]
    hg = tb.hypergrad(declared, tb.itd(2, 0.5))
    close(tb.over_tasks(hg, "loop")(x, ys, *listed), tb.over_tasks(hg, "loop")(x, ys, support, query))


def test_auto_picks_loop_on_cpu():
    assert tb.tasks.choose_mode({"a": torch.zeros(1)}) == "loop"
    assert tb.tasks.choose_mode({"a": torch.zeros(1, device="meta")}) == "vmap"   # any accelerator
    # and "auto" on CPU tensors runs the loop: its meta-gradient is the loop's, bit for bit
    model = make_model()
    declared, _ = problems(model)
    x, ys = start(model)
    support, query = meta_batch(4)
    hg = tb.hypergrad(declared, tb.itd(2, 0.5))
    auto = tb.over_tasks(hg, mode="auto")(x, ys, support, query)
    loop = tb.over_tasks(hg, mode="loop")(x, ys, support, query)
    assert all(torch.equal(auto[k], loop[k]) for k in loop)


def test_bad_meta_batches_name_the_argument():
    model = make_model()
    declared, _ = problems(model)
    x, ys = start(model, tasks=2)          # 2 tasks: not the head's first axis (3 ways)
    support, query = meta_batch(8, tasks=2)
    meta = tb.over_tasks(tb.hypergrad(declared, tb.itd(2, 0.5)), mode="loop")
    # different support sizes in one meta-batch (a list of per-task batches)
    uneven = [task(support, 0), (task(support, 1)[0][:-1], task(support, 1)[1][:-1])]
    with pytest.raises(ValueError, match="inner_batch.*different support sizes"):
        meta(x, ys, uneven, query)
    # y without the task dimension
    _, y1 = tb.nn.split(model, inner=["head"])
    with pytest.raises(ValueError, match="y must have a leading task dimension"):
        meta(x, dict(y1), support, query)
    # a batch whose task dimension differs from y's
    with pytest.raises(ValueError, match="outer_batch: task dimension 1.*y has 2 tasks"):
        meta(x, ys, support, tuple(t[:1] for t in query))
    with pytest.raises(ValueError, match="inner_batch: task dimension 1.*y has 2 tasks"):
        meta(x, ys, tuple(t[:1] for t in support), query)
    with pytest.raises(ValueError, match="inner_batch: its tensors have different"):
        meta(x, ys, (support[0], support[1][:1]), query)
    with pytest.raises(TypeError, match="inner_batch.*iterator"):
        meta(x, ys, iter([support]), query)
    with pytest.raises(ValueError, match="mode must be one of"):
        tb.over_tasks(meta, mode="parallel")
    with pytest.raises(TypeError, match="fn must be"):
        tb.over_tasks(None)


def test_nonfinite_meta_gradient_raises_in_vmap_mode():
    model = make_model()
    declared, _ = problems(model)
    x, ys = start(model)
    support, query = meta_batch(9)
    bad = (support[0].clone(), support[1])
    bad[0][1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        tb.over_tasks(tb.hypergrad(declared, tb.itd(2, 0.5)), mode="vmap")(x, ys, bad, query)
