"""Issue 9: real models in train mode (dropout, BatchNorm, Transformer, LSTM, residual,
embedding + LayerNorm) through every method.

Each model's linear head is y (``tb.nn.split(model, inner=[head])``), the rest is x; the
objectives go through ``tb.nn.call``; float64, train mode, tiny sizes (CPU, one thread).

What is checked (issue 9, item 4 and the acceptance list):
* every model x every method runs two steps in train mode and stays finite, and
  ``num_batches_tracked`` grows by ``inner_steps`` per double_loop step and by exactly 1
  per FdeHBO / FMBO step (and the running statistics are those of ordinary training);
* ``tb.hypergrad`` leaves every module buffer bit-identical, for every estimator;
* with dropout, finite-difference products (default pair mode and ``batched=False``) are
  within the usual FD error of the exact products taken at the same random stream;
* PZOBO with dropout is as close to its expectation (ITD of the same path) as without;
* ITD ``checkpoint=True`` with dropout equals plain ITD at the same random stream;
* eval mode gives the plain-autograd reference results (dropout = identity, BatchNorm
  with its running statistics written out by hand);
* a failing step leaves the global random stream (and PZOBO's generator) where it was;
* an LSTM inside y makes FdeHBO fall back from vmap to two evaluations;
* vmap over tasks with BatchNorm neither crashes nor touches the buffers.
One case is xfail(strict=True): a torch limitation (dropout's mask order under vmap on a
non-contiguous tensor), described in its reason.
"""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchbilevel as tb
from torchbilevel import derivatives as D

DT = torch.float64
N = 12          # batch size


# --------------------------------------------------------------------------- models

class Res(nn.Module):
    """A small residual net with two BatchNorms."""
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(1, 3, 3, padding=1)
        s.bn = nn.BatchNorm2d(3)
        s.c2 = nn.Conv2d(3, 3, 3, padding=1)
        s.bn2 = nn.BatchNorm2d(3)
        s.head = nn.Linear(3 * 5 * 5, 3)

    def forward(s, X):
        h = F.relu(s.bn(s.c1(X)))
        h = h + F.relu(s.bn2(s.c2(h)))
        return s.head(h.flatten(1))


class LSTMNet(nn.Module):
    def __init__(s):
        super().__init__()
        s.lstm = nn.LSTM(4, 6, batch_first=True)
        s.drop = nn.Dropout(0.2)
        s.head = nn.Linear(6, 3)

    def forward(s, X):
        return s.head(s.drop(s.lstm(X)[0][:, -1]))


class Trans(nn.Module):
    def __init__(s):
        super().__init__()
        s.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True), 1,
                                      enable_nested_tensor=False)
        s.head = nn.Linear(8, 3)

    def forward(s, X):
        return s.head(s.enc(X).mean(1))


class Emb(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(20, 8)
        s.ln = nn.LayerNorm(8)
        s.head = nn.Linear(8, 3)

    def forward(s, X):
        return s.head(s.ln(s.emb(X)).mean(1))


class MLP(nn.Module):
    def __init__(s, p=0.3):
        super().__init__()
        s.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(p))
        s.head = nn.Linear(8, 3)

    def forward(s, X):
        return s.head(s.body(X))


class CNN(nn.Module):
    def __init__(s):
        super().__init__()
        s.conv = nn.Conv2d(1, 2, 3)
        s.bn = nn.BatchNorm2d(2)
        s.head = nn.Linear(2 * 3 * 3, 3)

    def forward(s, X):
        return s.head(F.relu(s.bn(s.conv(X))).flatten(1))


MODELS = {
    "mlp_dropout": (MLP, lambda n, gen: torch.randn(n, 6, generator=gen, dtype=DT)),
    "cnn_bn": (CNN, lambda n, gen: torch.randn(n, 1, 5, 5, generator=gen, dtype=DT)),
    "transformer": (Trans, lambda n, gen: torch.randn(n, 4, 8, generator=gen, dtype=DT)),
    "lstm_dropout": (LSTMNet, lambda n, gen: torch.randn(n, 3, 4, generator=gen, dtype=DT)),
    "resnet_bn": (Res, lambda n, gen: torch.randn(n, 1, 5, 5, generator=gen, dtype=DT)),
    "emb_ln": (Emb, lambda n, gen: torch.randint(0, 20, (n, 5), generator=gen)),
}
DROPOUT = ["mlp_dropout", "transformer", "lstm_dropout"]
BATCHNORM = ["cnn_bn", "resnet_bn"]


class Zoo:
    """model, problem, x, y and batches of one zoo entry (deterministic from the seed)."""

    def __init__(self, name, seed=0, model=None):
        torch.manual_seed(seed)
        mk, data = MODELS[name]
        self.m = (mk() if model is None else model).double().train()
        self.x, self.y = tb.nn.split(self.m, inner=["head"])
        gen = torch.Generator().manual_seed(seed + 1)
        self.batches = [(data(N, gen), torch.randint(0, 3, (N,), generator=gen)) for _ in range(4)]
        self.ib, self.ob = self.batches[0], self.batches[1]
        m = self.m

        def g(x, y, b):
            return F.cross_entropy(tb.nn.call(m, x, y, b[0]), b[1]) + 1e-2 * sum((p ** 2).sum() for p in y.values())

        def f(x, y, b):
            return F.cross_entropy(tb.nn.call(m, x, y, b[0]), b[1])

        self.g, self.f = g, f
        self.prob = tb.Bilevel(outer=f, inner=g)

    def iters(self):
        """PZOBO-S style minibatch iterators (inner, outer)."""
        return itertools.cycle(self.batches[:3]), itertools.cycle(self.batches[1:])

    def buffers(self):
        return {n: b.clone() for n, b in self.m.named_buffers()}

    def nbt(self):
        return [int(b) for n, b in self.m.named_buffers() if n.endswith("num_batches_tracked")]


def assert_buffers_equal(m, saved):
    now = dict(m.named_buffers())
    assert set(now) == set(saved)
    for n, b in saved.items():
        assert torch.equal(now[n], b), n


nrm = lambda d: torch.sqrt(sum((a.double() ** 2).sum() for a in d.values()))
diff = lambda a, b: {k: a[k] - b[k] for k in a}


# --------------------------------------------------------------------------- methods

INNER_STEPS = 3     # distinct from every other count in a step, so a miscount shows

ESTIMATORS = {
    "aid_cg": lambda: tb.aid(tb.cg(steps=3)),
    "aid_fp": lambda: tb.aid(tb.fixed_point(steps=3, lr=0.1)),
    "itd": lambda: tb.itd(2, 0.1),
    "itd_ckpt": lambda: tb.itd(2, 0.1, checkpoint=True),
    "stocbio": lambda: tb.stocbio(3, 0.1),
    "pzobo": lambda: tb.pzobo(2, 0.1, 3, 1e-3, generator=torch.Generator().manual_seed(5)),
    "pzobo_vec": lambda: tb.pzobo(2, 0.1, 3, 1e-3, vectorize=True, generator=torch.Generator().manual_seed(5)),
    "first_order": lambda: tb.first_order(),
}
# η = 0.5: momentum, so every step also evaluates the previous iterate on the current
# sample (with every η = 1 the engine skips it) — the common-random-numbers path under test
_MOM = dict(lr_x=0.01, lr_y=0.1, lr_v=0.1, radius=10.0, eta_x=0.5, eta_y=0.5, eta_v=0.5)
SINGLE = {
    "fdehbo": lambda p: tb.fdehbo(p, **_MOM),
    "fdehbo_vmap": lambda p: tb.fdehbo(p, batched=True, **_MOM),
    "fdehbo_pair": lambda p: tb.fdehbo(p, batched=False, **_MOM),
    "fmbo": lambda p: tb.fmbo(p, **_MOM),
    "fdehbo_indep": lambda p: tb.fdehbo(p, independent_outer_sample=True, **_MOM),
}
# the other single-loop algorithms: run and finite in train mode (issue 9 states no
# running-statistics count for them, so none is asserted)
OTHERS = {
    "soba": lambda p: tb.soba(p, lr_x=0.01, lr_y=0.1, lr_v=0.1),
    "ma_soba": lambda p: tb.ma_soba(p, lr_x=0.01, lr_y=0.1, lr_v=0.1),
    "mrbo": lambda p: tb.mrbo(p, lr_x=0.01, lr_y=0.1, neumann_steps=3),
    "f2sa": lambda p: tb.f2sa(p, lr_x=0.01, lr_y=0.1, lr_z=0.1),
    "bome": lambda p: tb.bome(p, lr_x=0.01, lr_y=0.1, inner_steps=3),
}
OTHERS = {k: v for k, v in OTHERS.items() if hasattr(tb, k)}
METHODS = [f"double_loop/{e}" for e in ESTIMATORS] + ["double_loop/pzobo_s"] + list(SINGLE) + list(OTHERS)


def make_algo(method, prob):
    if method in SINGLE:
        return SINGLE[method](prob), 1
    if method in OTHERS:
        return OTHERS[method](prob), None
    est = method.split("/")[1]
    e = tb.pzobo(2, 0.1, 3, 1e-3) if est == "pzobo_s" else ESTIMATORS[est]()
    return tb.double_loop(prob, e, lr_x=0.01, inner_steps=INNER_STEPS, lr_y=0.1), INNER_STEPS


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_runs_in_train_mode_and_counts_running_statistics(name, method):
    z = Zoo(name)
    algo, per_step = make_algo(method, z.prob)
    ib, ob = z.iters() if method.endswith("pzobo_s") else (z.ib, z.ob)
    s = algo.init(z.x, z.y)
    x0 = {k: t.clone() for k, t in z.x.items()}
    counts = [z.nbt()]
    for _ in range(2):
        s = algo.step(s, ib, ob)
        counts.append(z.nbt())
    for t in list(s.x.values()) + list(s.y.values()):
        assert torch.isfinite(t).all()
    assert nrm(diff(s.x, x0)) > 0                       # x moved
    assert z.m.training
    # num_batches_tracked: inner_steps per double_loop step, exactly 1 per FdeHBO/FMBO step
    if name in BATCHNORM and per_step is not None:
        assert len(counts[0]) > 0
        for before, after in zip(counts, counts[1:]):
            assert [a - b for a, b in zip(after, before)] == [per_step] * len(before), counts
    elif name not in BATCHNORM:
        assert counts[0] == []
    for b in z.m.buffers():
        assert torch.isfinite(b.double()).all()


@pytest.mark.parametrize("method", ["double_loop/aid_cg", "double_loop/itd", "double_loop/pzobo",
                                    "fdehbo", "fdehbo_pair", "fmbo", "fdehbo_indep"])
@pytest.mark.parametrize("name", BATCHNORM)
def test_running_statistics_are_those_of_ordinary_training(name, method):
    # BatchNorm sits in x (the body): during a step's inner updates x is fixed, so ordinary
    # training would update the running statistics with the same batch statistics once per
    # inner step.  A copy of the model run forward that many times on the inner batch must
    # hold the same running statistics as the model after one step of the method.
    z = Zoo(name)
    ref = copy.deepcopy(z.m)
    algo, per_step = make_algo(method, z.prob)
    s = algo.init(z.x, z.y)
    algo.step(s, z.ib, z.ob)
    with torch.no_grad():
        for _ in range(per_step):
            ref(z.ib[0])
    now, want = dict(z.m.named_buffers()), dict(ref.named_buffers())
    for n in want:
        if n.endswith("num_batches_tracked"):
            assert int(now[n]) == int(want[n]) == per_step
        else:
            torch.testing.assert_close(now[n], want[n], rtol=1e-12, atol=1e-14)


HG_ESTIMATORS = list(ESTIMATORS) + ["pzobo_s"]


@pytest.mark.parametrize("est", HG_ESTIMATORS)
@pytest.mark.parametrize("name", list(MODELS))
def test_hypergrad_leaves_every_buffer_bit_identical(name, est):
    z = Zoo(name)
    saved = z.buffers()
    x0, y0 = {k: t.clone() for k, t in z.x.items()}, {k: t.clone() for k, t in z.y.items()}
    if est == "pzobo_s":
        e, (ib, ob) = tb.pzobo(2, 0.1, 3, 1e-3), z.iters()
    else:
        e, ib, ob = ESTIMATORS[est](), z.ib, z.ob
    for _ in range(2):      # the first call also runs the once-per-problem check of g
        dx = tb.hypergrad(z.prob, e)(z.x, z.y, ib, ob)
        assert all(torch.isfinite(t).all() for t in dx.values())
        assert_buffers_equal(z.m, saved)
    for k in x0:
        assert torch.equal(z.x[k], x0[k])
    for k in y0:
        assert torch.equal(z.y[k], y0[k])
    if name in BATCHNORM:
        # and the model still trains: an ordinary forward in train mode updates them
        z.m(z.ib[0])
        assert all(c == 1 for c in z.nbt())


def _products_at_one_stream(z, batched, state=None):
    """exact (∇xy g·v, ∇yy g·v) and FD products, each started from the same RNG state."""
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in z.y.items()}
    state = torch.get_rng_state() if state is None else state
    torch.set_rng_state(state)
    jv, hv = D.exact_products(z.g, z.x, z.y, v, z.ib)
    torch.set_rng_state(state)
    fd = D.fd_products(z.g, z.x, z.y, v, z.ib, batched=batched)
    return jv, hv, fd


@pytest.mark.parametrize("batched", [None, False])
@pytest.mark.parametrize("name", DROPOUT)
def test_fd_products_with_dropout_have_the_size_of_the_exact_products(name, batched):
    # Without common random numbers the two points y ± δv draw different masks and
    # |FD ∇yy g·v| was measured at 100x the exact product (issue 9).
    z = Zoo(name)
    jv, hv, fd = _products_at_one_stream(z, batched)
    assert fd.batched is (batched is not False)
    for got, exact in ((fd.hvp, hv), (fd.mixed, jv)):
        ratio = float(nrm(got) / nrm(exact))
        assert 0.5 <= ratio <= 2.0, ratio


_TRANSFORMER_VMAP_MASK = (
    "torch limitation, documented in torchbilevel.randomness: under vmap(randomness='same') dropout on a non-contiguous tensor (the batch_first "
    "MultiheadAttention output feeding TransformerEncoderLayer.dropout1) draws its mask in a different "
    "element order than the same call outside vmap, so the default (vmapped) FD pair sees one mask but "
    "not the mask of a plain evaluation at the same random stream: relative error 3.5e-2 (hvp), 1.6e-1 "
    "(mixed) against exact products, vs 3e-11 with batched=False")


@pytest.mark.parametrize("batched", [
    None, False])
@pytest.mark.parametrize("name", [
    "mlp_dropout",
    "transformer",
    "lstm_dropout"])
def test_fd_products_with_dropout_match_exact_products_at_the_same_stream(name, batched, request):
    if name == "transformer" and batched is None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_TRANSFORMER_VMAP_MASK))
    z = Zoo(name)
    jv, hv, fd = _products_at_one_stream(z, batched)
    # float64 central differences: δ ≈ ε^(1/3) ≈ 6e-6 relative, truncation O(δ²), rounding
    # O(ε/δ) ≈ 4e-11. Measured (relative, hvp / mixed): mlp_dropout 4.9e-11 / 1.3e-11,
    # lstm_dropout 8.6e-11 / 1.8e-11, transformer (batched=False) 3.4e-11 / 1.8e-11.
    # 1e-9 is 10x the worst of them and 260x below a one-sided difference at the same δ
    # (measured 2.6e-7 to 1.9e-6), which must not pass; a mask mismatch gives errors of order 1.
    for got, exact in ((fd.hvp, hv), (fd.mixed, jv)):
        err = float(nrm(diff(got, exact)) / nrm(exact))
        assert err < 1e-9, err


def test_default_fd_pair_and_two_evaluations_agree_with_dropout_on_an_mlp():
    # same stream, same mask: the vmapped pair and the replayed pair give one product
    z = Zoo("mlp_dropout")
    state = torch.get_rng_state()
    _, _, a = _products_at_one_stream(z, None, state)
    _, _, b = _products_at_one_stream(z, False, state)
    for k in a.hvp:
        torch.testing.assert_close(a.hvp[k], b.hvp[k], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_dropout", "transformer", "lstm_dropout"])
def test_itd_checkpoint_with_dropout_equals_plain_itd(name):
    z = Zoo(name)
    state = torch.get_rng_state()
    a = tb.hypergrad(z.prob, tb.itd(3, 0.1))(z.x, z.y, z.ib, z.ob)
    after_a = torch.get_rng_state()
    torch.set_rng_state(state)
    b = tb.hypergrad(z.prob, tb.itd(3, 0.1, checkpoint=True))(z.x, z.y, z.ib, z.ob)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-10)
    # the checkpointed backward's replays consume nothing more than the forward did
    assert torch.equal(torch.get_rng_state(), after_a)
    # and dropout is really on: another stream gives another hypergradient
    c = tb.hypergrad(z.prob, tb.itd(3, 0.1))(z.x, z.y, z.ib, z.ob)
    assert float(nrm(diff(c, a))) > 1e-6


# ---- PZOBO with dropout

Q = 300


def _pzobo_vs_itd(z, seed=11, q=Q, mu=1e-5):
    """(PZOBO estimate, ITD hypergradient of the same path, directions u), both estimators
    started from the same random stream (same dropout masks along the path and in f)."""
    state = torch.get_rng_state()
    itd = tb.hypergrad(z.prob, tb.itd(3, 0.1))(z.x, z.y, z.ib, z.ob)
    torch.set_rng_state(state)
    est = tb.pzobo(3, 0.1, q, mu, generator=torch.Generator().manual_seed(seed))
    pz = tb.hypergrad(z.prob, est)(z.x, z.y, z.ib, z.ob)
    after = torch.get_rng_state()
    u = est._replace(generator=torch.Generator().manual_seed(seed)).sample_directions(z.x)
    # ∇x f at the path's end, at the stream f saw: the path draws one dropout mask per
    # inner step (mask shapes do not depend on values), then f draws its own
    torch.set_rng_state(state)
    y = dict(z.y)
    for _ in range(3):
        gy = torch.func.grad(z.g, argnums=1)(z.x, y, z.ib)
        y = {k: y[k] - 0.1 * gy[k] for k in y}
    fx = torch.func.grad(z.f, argnums=0)(z.x, y, z.ob)
    torch.set_rng_state(after)
    return pz, itd, fx, u


@pytest.mark.parametrize("name", ["mlp_dropout", "lstm_dropout"])
def test_pzobo_with_dropout_is_as_close_to_its_expectation_as_without(name):
    # Same model, same data, same direction set (the generator's seed): relative error of
    # PZOBO against ITD of the same path in train mode (dropout on) and in eval mode.  The
    # error is the sampling error of (1/Q) Σ u uᵀ, of the same size in both modes when the
    # Q+1 paths share their masks; without common random numbers it was 500-1850 vs 0.8-1.8.
    errs = {}
    for mode in ("eval", "train"):
        z = Zoo(name)
        z.m.train(mode == "train")
        pz, itd, _, _ = _pzobo_vs_itd(z)
        errs[mode] = float(nrm(diff(pz, itd)) / nrm(itd))
    assert errs["train"] <= 3 * errs["eval"], errs
    assert errs["train"] < 2.0, errs


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["mlp_dropout", "lstm_dropout"])
def test_pzobo_given_its_directions_is_the_itd_jacobian_term(name, train):
    # Sharper: conditional on the directions u_j, PZOBO is ∇x f + (1/Q) Σ u_j u_jᵀ h with
    # h = ITD − ∇x f (the implicit term of the same path), up to the O(μ) curvature of the
    # difference quotient (μ = 1e-5, float64: ~1e-6 relative).  A mask mismatch between the
    # perturbed and unperturbed paths would add (mask noise)/μ, of order 1e4.
    z = Zoo(name)
    z.m.train(train)
    pz, itd, fx, u = _pzobo_vs_itd(z, q=40)
    h = diff(itd, fx)
    coef = sum((u[k].reshape(40, -1) * h[k].reshape(1, -1)).sum(1) for k in h)
    want = {k: fx[k] + torch.tensordot(coef, u[k], dims=1) / 40 for k in fx}
    err = float(nrm(diff(pz, want)) / nrm(want))
    assert err < 2e-5, err      # measured 2.6e-6 to 4.0e-6 (the four cases): O(μ), as expected


# ---- eval mode: the plain-autograd reference

def test_eval_mode_dropout_is_the_identity_for_every_method():
    # model.eval(): the hypergradients and steps equal those of the same model with its
    # Dropout replaced by nn.Identity (in train mode, which then has no randomness at all)
    ref_model = MLP()
    results = {}
    for which in ("eval", "identity"):
        torch.manual_seed(0)
        m = MLP()
        m.load_state_dict(ref_model.state_dict())
        if which == "identity":
            m.body[2] = nn.Identity()
        z = Zoo("mlp_dropout", model=m)
        if which == "eval":
            z.m.eval()
        out = {}
        for e in ("aid_cg", "itd", "stocbio", "pzobo"):
            out[e] = tb.hypergrad(z.prob, ESTIMATORS[e]())(z.x, z.y, z.ib, z.ob)
        for meth in ("fdehbo", "fmbo"):
            algo = SINGLE[meth](z.prob)
            s = algo.init(z.x, z.y)
            for _ in range(2):
                s = algo.step(s, z.ib, z.ob)
            out[meth] = s.x
        results[which] = out
    for e in results["eval"]:
        for k in results["eval"][e]:
            assert torch.equal(results["eval"][e][k], results["identity"][e][k]), (e, k)


def _bn_eval_reference():
    """The eval-mode CNN written by hand: BatchNorm as (z − running_mean)/√(running_var + eps)·γ + β."""
    torch.manual_seed(0)
    m = CNN().double()
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.randn(2, dtype=DT))
        m.bn.running_var.copy_(torch.rand(2, dtype=DT) + 0.5)
        m.bn.weight.copy_(torch.rand(2, dtype=DT) + 0.5)
        m.bn.bias.copy_(torch.randn(2, dtype=DT))
    m.eval()
    rm, rv, eps = m.bn.running_mean.clone(), m.bn.running_var.clone(), m.bn.eps

    def fwd(x, y, X):
        h = F.conv2d(X, x["conv.weight"], x["conv.bias"])
        h = (h - rm[None, :, None, None]) / torch.sqrt(rv + eps)[None, :, None, None]
        h = h * x["bn.weight"][None, :, None, None] + x["bn.bias"][None, :, None, None]
        return F.linear(F.relu(h).flatten(1), y["head.weight"], y["head.bias"])

    return m, fwd


def test_eval_mode_batchnorm_matches_hand_written_reference_itd_and_dense_aid():
    m, fwd = _bn_eval_reference()
    z = Zoo("cnn_bn", model=m)
    z.m.eval()
    saved = z.buffers()

    def g_ref(x, y, b):
        return F.cross_entropy(fwd(x, y, b[0]), b[1]) + 1e-2 * sum((p ** 2).sum() for p in y.values())

    def f_ref(x, y, b):
        return F.cross_entropy(fwd(x, y, b[0]), b[1])

    # the objectives themselves
    assert torch.allclose(z.g(z.x, z.y, z.ib), g_ref(z.x, z.y, z.ib), rtol=1e-13, atol=0)

    # ITD by plain autograd: unroll with create_graph, backpropagate f
    xr = {k: t.detach().clone().requires_grad_(True) for k, t in z.x.items()}
    y = {k: t.detach().clone().requires_grad_(True) for k, t in z.y.items()}
    for _ in range(3):
        gy = torch.autograd.grad(g_ref(xr, y, z.ib), list(y.values()), create_graph=True)
        y = {k: y[k] - 0.1 * gk for k, gk in zip(y, gy)}
    itd_ref = dict(zip(xr, torch.autograd.grad(f_ref(xr, y, z.ob), list(xr.values()))))
    itd = tb.hypergrad(z.prob, tb.itd(3, 0.1))(z.x, z.y, z.ib, z.ob)
    for k in itd_ref:
        torch.testing.assert_close(itd[k], itd_ref[k], rtol=1e-12, atol=1e-14)

    # AID with a dense solve: ∇x f − (∇xy g)ᵀ [∇yy g]⁻¹ ∇y f at the given y
    xk, yk = list(z.x), list(z.y)
    xs = [z.x[k] for k in xk]
    ys = [z.y[k] for k in yk]
    fx_flat = torch.cat([t.flatten() for t in xs])
    ny = sum(t.numel() for t in ys)

    def unflat(flat, like):
        out, i = [], 0
        for t in like:
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def gflat(xf, yf):
        return g_ref(dict(zip(xk, unflat(xf, xs))), dict(zip(yk, unflat(yf, ys))), z.ib)

    def fflat(xf, yf):
        return f_ref(dict(zip(xk, unflat(xf, xs))), dict(zip(yk, unflat(yf, ys))), z.ob)

    yf = torch.cat([t.flatten() for t in ys])
    Hs = torch.autograd.functional.hessian(gflat, (fx_flat, yf))
    Hyy, Hxy = Hs[1][1], Hs[0][1]                       # ∇yy g (ny×ny), ∇x∇y g (nx×ny)
    fx, fy = torch.autograd.functional.jacobian(fflat, (fx_flat, yf))
    dense = fx - Hxy @ torch.linalg.solve(Hyy, fy)
    aid = tb.hypergrad(z.prob, tb.aid(tb.cg(steps=4 * ny)))(z.x, z.y, z.ib, z.ob)
    got = torch.cat([aid[k].flatten() for k in xk])
    torch.testing.assert_close(got, dense, rtol=1e-8, atol=1e-11)
    assert_buffers_equal(z.m, saved)


# ---- a failing step leaves the random stream where it was

class NanAt:
    """Wraps an objective: NaN on the k-th call after ``arm(k)``."""

    def __init__(self, fn):
        self.fn, self.calls, self.k = fn, 0, None

    def arm(self, k):
        self.calls, self.k = 0, k

    def __call__(self, x, y, b):
        self.calls += 1
        val = self.fn(x, y, b)
        return val * float("nan") if self.calls == self.k else val


@pytest.mark.parametrize("method", ["double_loop/pzobo", "fdehbo", "fdehbo_pair", "fmbo"])
def test_failing_step_leaves_the_random_stream_where_it_was(method):
    def run(fail):
        z = Zoo("mlp_dropout")
        bad = NanAt(z.g)
        prob = tb.Bilevel(outer=z.f, inner=bad)
        gen = torch.Generator().manual_seed(7)
        if method in SINGLE:
            algo = SINGLE[method](prob)
        else:
            algo = tb.double_loop(prob, tb.pzobo(2, 0.1, 3, 1e-3, generator=gen), lr_x=0.01,
                                  inner_steps=INNER_STEPS, lr_y=0.1)
        s = algo.init(z.x, z.y)
        s = algo.step(s, z.ib, z.ob)
        if fail:
            # NaN from a later evaluation of g in this step, after others have drawn dropout
            # masks: the 4th for the double loop (inner steps, part of PZOBO's paths), the 2nd
            # for the single loop (the previous iterate; with one batch for ζ and ψ FdeHBO
            # evaluates g once per point, its ∇y g coming from the ± pair)
            bad.arm(2 if method in SINGLE else 4)
            rng, gst = torch.get_rng_state(), gen.get_state()
            with pytest.raises(FloatingPointError):
                algo.step(s, z.ib, z.ob)
            assert torch.equal(torch.get_rng_state(), rng)
            assert torch.equal(gen.get_state(), gst)
            bad.arm(None)
        for _ in range(3):
            s = algo.step(s, z.ib, z.ob)
        return s.x
    torch.manual_seed(123)
    a = run(True)
    torch.manual_seed(123)
    b = run(False)
    # continuing after the failure is the run that never saw it, bit for bit
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["double_loop/aid_cg", "fdehbo"])
def test_failing_step_leaves_batchnorm_buffers_as_they_were(method):
    z = Zoo("cnn_bn")
    algo, _ = make_algo(method, z.prob)
    s = algo.init(z.x, z.y)
    X = z.ib[0].clone()
    X[0, 0, 0, 0] = float("nan")
    saved = z.buffers()
    with pytest.raises(FloatingPointError):
        algo.step(s, (X, z.ib[1]), z.ob)
    assert_buffers_equal(z.m, saved)


# ---- an LSTM inside y: vmap cannot batch its weights, FdeHBO falls back

class LSTMInY(nn.Module):
    def __init__(s):
        super().__init__()
        s.body = nn.Linear(4, 4)
        s.lstm = nn.LSTM(4, 4, batch_first=True)
        s.drop = nn.Dropout(0.2)
        s.head = nn.Linear(4, 3)

    def forward(s, X):
        return s.head(s.drop(s.lstm(torch.tanh(s.body(X)))[0][:, -1]))


def test_lstm_in_y_falls_back_from_vmap_to_two_evaluations():
    torch.manual_seed(0)
    m = LSTMInY().double().train()
    x, y = tb.nn.split(m, inner=["lstm", "head"])
    gen = torch.Generator().manual_seed(1)
    b = (torch.randn(N, 3, 4, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen))

    def g(x, y, bb):
        return F.cross_entropy(tb.nn.call(m, x, y, bb[0]), bb[1]) + 1e-2 * sum((p ** 2).sum() for p in y.values())

    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in y.items()}
    # vmap really cannot: forced batched=True fails
    with pytest.raises(RuntimeError):
        D.fd_products(g, x, y, v, b, batched=True)
    state = torch.get_rng_state()
    r = D.fd_products(g, x, y, v, b)
    assert r.batched is False
    after = torch.get_rng_state()
    # the fallback replayed the stream: it equals batched=False from the same stream, and
    # is within FD error of the exact products at that stream (dropout after the LSTM)
    torch.set_rng_state(state)
    r2 = D.fd_products(g, x, y, v, b, batched=False)
    assert torch.equal(torch.get_rng_state(), after)
    torch.set_rng_state(state)
    jv, hv = D.exact_products(g, x, y, v, b)
    for k in hv:
        assert torch.equal(r.hvp[k], r2.hvp[k])
    # float64 central differences, measured 7.4e-11 (hvp) and 6.2e-11 (mixed) relative
    assert float(nrm(diff(r.hvp, hv)) / nrm(hv)) < 1e-9
    assert float(nrm(diff(r.mixed, jv)) / nrm(jv)) < 1e-9

    prob = tb.Bilevel(outer=lambda x, y, bb: F.cross_entropy(tb.nn.call(m, x, y, bb[0]), bb[1]), inner=g)
    algo = tb.fdehbo(prob, lr_x=0.01, lr_y=0.1, lr_v=0.1, radius=10.0)
    s = algo.init(x, y)
    for _ in range(3):
        s = algo.step(s, b, b)
    assert s.step == 3
    for t in list(s.x.values()) + list(s.y.values()) + list(s.v.values()):
        assert torch.isfinite(t).all()


# ---- vmap over tasks with BatchNorm: no crash, buffers untouched, same as one task

@pytest.mark.parametrize("est", ["aid_cg", "itd", "stocbio"])
@pytest.mark.parametrize("name", BATCHNORM)
def test_vmap_over_tasks_with_batchnorm(name, est):
    z = Zoo(name)
    saved = z.buffers()
    ys = {k: torch.stack([t, t + 0.01]) for k, t in z.y.items()}
    hg = tb.hypergrad(z.prob, ESTIMATORS[est]())
    out = torch.func.vmap(lambda yy: hg(z.x, yy, z.ib, z.ob))(ys)
    assert_buffers_equal(z.m, saved)
    for i in range(2):
        one = hg(z.x, {k: t[i] for k, t in ys.items()}, z.ib, z.ob)
        for k in one:
            torch.testing.assert_close(out[k][i], one[k], rtol=1e-10, atol=1e-13)
    assert_buffers_equal(z.m, saved)
