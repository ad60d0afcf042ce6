"""``algo.step(state, inner_batch, outer_batch, has_aux=True)`` (issue 26, item 2): every
algorithm returns the state it returns without has_aux, bit for bit, and a StepInfo whose
figures equal an independent recomputation — the losses by hand (closed-form objectives of
test_single_loop.quadratic) at the point and on the sample the docstring names, the
hypergradient norm as ‖x_t − x_{t+1}‖/α_t (the direction x moved along), FdeHBO's δ as
fd_delta of the state it perturbed; tb.progress gives floats from one host read."""
import io
import math
import textwrap

import pytest
import torch

import torchbilevel as tb
from test_single_loop import quadratic

DT = torch.float64
RHO = 0.5

# name -> (constructor, keyword arguments), each run on one fixed batch per level
ALGOS = {
    "fdehbo": (tb.fdehbo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)),
    "fmbo": (tb.fmbo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)),
    "soba": (tb.soba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3)),
    "ma_soba": (tb.ma_soba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, momentum=0.5)),
    "mrbo": (tb.mrbo, dict(lr_x=0.1, lr_y=0.3, eta_x=0.5, eta_y=0.5, neumann_steps=4)),
    "f2sa": (tb.f2sa, dict(lr_x=0.1, lr_y=0.3, lr_z=0.3, inner_steps=3)),
    "bome": (tb.bome, dict(lr_x=0.1, lr_y=0.3, inner_steps=3)),
    "saba": (tb.saba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, n_inner=1, n_outer=1)),
    "srba": (tb.srba, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, n_inner=1, n_outer=1, period=2)),
    "amigo": (tb.amigo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, inner_steps=1, v_steps=2)),
    "ttsa": (tb.ttsa, dict(lr_x=0.1, lr_y=0.3, neumann_steps=4)),
    "fsla": (tb.fsla, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, eta_x=0.5)),
    "vrbo": (tb.vrbo, dict(lr_x=0.1, lr_y=0.3, lr_v=0.3, inner_steps=1, neumann_steps=3, period=2)),
}
PAIRED = {"saba", "srba"}                 # batches are (i, batch) pairs
STEPS = 4


def setup(name, **over):
    prob, inner, outer, _ = quadratic(rho=RHO)
    ctor, kw = ALGOS[name]
    algo = ctor(prob, **{**kw, **over})
    gen = torch.Generator().manual_seed(1)
    x, y = {"h": torch.randn(4, generator=gen, dtype=DT)}, {"w": torch.randn(5, generator=gen, dtype=DT)}
    b_in, b_out = inner[0], outer[0]
    batches = ((0, b_in), (0, b_out)) if name in PAIRED else (b_in, b_out)
    return algo, algo.init(x, y), batches, b_in, b_out


def g_hand(x, y, b):
    A, B = b
    return 0.5 * y @ A @ y - y @ B @ x


def f_hand(x, y, c):
    return 0.5 * (y - c) @ (y - c) + 0.5 * RHO * x @ x


def g_dict(x, y, b):
    return g_hand(x["h"], y["w"], b)


def f_dict(x, y, c):
    return f_hand(x["h"], y["w"], c)


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def same_state(a, b):
    """Bitwise equal NamedTuple states (tensors, numbers, layouts)."""
    assert type(a) is type(b)
    for name, u, w in zip(a._fields, a, b):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, w), name
        elif isinstance(u, dict):
            assert u.keys() == w.keys() and all(torch.equal(u[k], w[k]) for k in u), name
        elif isinstance(u, tuple) and hasattr(u, "_fields"):
            same_state(u, w)
        else:
            assert u == w, name


def expected(name, old, new, b_in, b_out, info):
    """(inner loss, outer loss) by hand at the point the docstring of ``name`` names."""
    x0, y0, x1, y1 = flat(old.x), flat(old.y), flat(new.x), flat(new.y)
    if name == "fdehbo":        # ∇y g from the ± pair (one full batch): the pair's mean value
        v, d = flat(old.v), info.delta
        g = 0.5 * (g_hand(x0, y0 + d * v, b_in) + g_hand(x0, y0 - d * v, b_in))
        return g, f_hand(x0, y0, b_out)
    if name == "f2sa":
        return g_hand(x0, flat(new.z), b_in), f_hand(x0, y1, b_out)
    if name in ("ttsa", "fsla", "amigo"):   # amigo with T = 1: g at y_t, f at y_{t+1}
        return g_hand(x0, y0, b_in), f_hand(x0, y1, b_out)
    if name == "vrbo":          # m = 1: the inner step's point (x_{t+1}, y_t)
        return g_hand(x1, y0, b_in), f_hand(x1, y0, b_out)
    return g_hand(x0, y0, b_in), f_hand(x0, y0, b_out)


def step_size(name, t):
    kw = ALGOS[name][1]
    if name == "ttsa":
        return kw["lr_x"] / (t + 1) ** 0.6
    return kw["lr_x"]


@pytest.mark.parametrize("name", list(ALGOS))
def test_has_aux_leaves_the_state_bitwise_and_reports_what_was_evaluated(name):
    algo, s, (bi, bo), b_in, b_out = setup(name)
    plain = s
    for t in range(STEPS):
        plain = algo.step(plain, bi, bo)
        new, info = algo.step(s, bi, bo, has_aux=True)
        same_state(plain, new)
        assert isinstance(info, tb.StepInfo)
        g, f = expected(name, s, new, b_in, b_out, info)
        torch.testing.assert_close(info.inner_loss.to(DT), g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(info.outer_loss.to(DT), f, rtol=1e-12, atol=1e-12)
        moved = torch.linalg.vector_norm(flat(s.x) - flat(new.x)) / step_size(name, t)
        torch.testing.assert_close(info.hypergrad_norm.to(DT), moved, rtol=1e-9, atol=1e-12)
        for field in info:
            if isinstance(field, torch.Tensor):
                assert field.dim() == 0
        if name in ("mrbo", "vrbo"):    # the stocBiO estimate's report at the point it evaluated
            Q, eta = (4, 0.3) if name == "mrbo" else (3, 0.3)
            xs, ys = (s.x, s.y) if name == "mrbo" else (new.x, s.y)
            _, aux = tb.hypergrad(tb.Bilevel(f_dict, g_dict), tb.stocbio(Q, eta), has_aux=True)(xs, ys, b_in, b_out)
            torch.testing.assert_close(info.solve.residual, aux.solve.residual, rtol=1e-12, atol=1e-15)
            assert int(info.solve.iterations) == Q
        s = new


def test_fdehbo_delta_is_fd_delta_of_the_state_it_perturbed():
    algo, s, (bi, bo), _, _ = setup("fdehbo")
    for _ in range(3):
        new, info = algo.step(s, bi, bo, has_aux=True)
        torch.testing.assert_close(info.delta, tb.derivatives.fd_delta(s.y, s.v), rtol=0, atol=0)
        s = new
    algo, s, (bi, bo), _, _ = setup("fdehbo", delta=1e-4)
    assert float(algo.step(s, bi, bo, has_aux=True)[1].delta) == pytest.approx(1e-4)
    _, info = setup("fmbo")[0].step(setup("fmbo")[1], bi, bo, has_aux=True)
    assert info.delta is None


@pytest.mark.parametrize("name", ["fdehbo", "fmbo", "ma_soba"])
def test_projected_when_a_small_radius_binds_and_not_with_radius_inf(name):
    for radius, binds in ((1e-3, True), (float("inf"), False)):
        algo, s, (bi, bo), _, _ = setup(name, radius=radius)
        for t in range(3):
            s, info = algo.step(s, bi, bo, has_aux=True)
            if t == 0:      # v_0 = 0: the first w is λ∇y f, of norm ‖w‖ = v_norm
                continue
            assert info.projected.dtype == torch.bool and bool(info.projected) is binds
            assert (float(info.v_norm) > radius) is binds
            if binds:       # the projected v has norm r, the unprojected w is v_norm
                assert float(torch.linalg.vector_norm(flat(s.v))) == pytest.approx(radius, rel=1e-12)


def test_v_norm_is_the_norm_of_the_new_v_without_projection():
    algo, s, (bi, bo), _, _ = setup("soba")
    for _ in range(3):
        s, info = algo.step(s, bi, bo, has_aux=True)
        torch.testing.assert_close(info.v_norm, torch.linalg.vector_norm(flat(s.v)), rtol=1e-12, atol=0)
        assert not bool(info.projected)


@pytest.mark.parametrize("name", ["f2sa", "bome"])
def test_multiplier_is_the_step_s_lambda(name):
    algo, s, (bi, bo), _, _ = setup(name)
    for _ in range(3):
        new, info = algo.step(s, bi, bo, has_aux=True)
        lam = s.lam if name == "f2sa" else new.lam      # f2sa: λ_k the step used; bome: the state's last λ
        assert float(info.multiplier) == pytest.approx(float(lam), rel=1e-15)
        s = new


def test_fdehbo_inner_loss_without_the_pair_is_g_at_the_iterate():
    """With separate samples for the y update and the products (iterators), ∇y g is
    evaluated at y_t itself: the reported inner loss is g(x_t, y_t; ζ_t), ζ_t the first draw."""
    prob, inner, outer, _ = quadratic(rho=RHO)
    algo = tb.fdehbo(prob, **ALGOS["fdehbo"][1])
    s = algo.init({"h": torch.ones(4, dtype=DT)}, {"w": torch.ones(5, dtype=DT)})
    it_in, it_out = iter(inner * 10), iter(outer * 10)
    for t in range(3):
        zeta, psi_f = inner[(2 * t) % 6], outer[t % 6]
        new, info = algo.step(s, it_in, it_out, has_aux=True)
        torch.testing.assert_close(info.inner_loss, g_hand(flat(s.x), flat(s.y), zeta), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(info.outer_loss, f_hand(flat(s.x), flat(s.y), psi_f), rtol=1e-12, atol=1e-12)
        s = new


def test_progress_is_floats_from_the_tensors():
    algo, s, (bi, bo), _, _ = setup("fdehbo", radius=1e-3)
    for _ in range(2):
        s, info = algo.step(s, bi, bo, has_aux=True)
    d = tb.progress(info)
    solve = {f"solve_{k}" for k in tb.SolveInfo._fields}
    assert set(d) == {"inner_loss", "outer_loss", "hypergrad_norm", "delta", "projected", "v_norm"} | solve
    assert all(type(v) is float for v in d.values())
    for k, v in d.items():
        assert v == float(getattr(info.solve, k[6:]) if k in solve else getattr(info, k))
    assert d["projected"] == 1.0
    assert tb.progress(tb.StepInfo()) == {}
    assert tb.progress(tb.StepInfo(outer_loss=torch.tensor(2.5, dtype=torch.float32))) == {"outer_loss": 2.5}


def test_progress_reads_the_host_once(monkeypatch):
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("progress read a tensor with .item()"))
    info = tb.StepInfo(inner_loss=torch.tensor(1.0), outer_loss=torch.tensor(2.0, dtype=DT),
                       hypergrad_norm=torch.tensor(3.0), projected=torch.tensor(True))
    assert tb.progress(info) == {"inner_loss": 1.0, "outer_loss": 2.0, "hypergrad_norm": 3.0, "projected": 1.0}
    assert calls == [torch.Size([4])]


def test_a_tqdm_loop_shows_the_figures():
    """The example of tb.progress's docstring runs as written (30 steps, its bar into a buffer)."""
    pytest.importorskip("tqdm")
    doc = tb.progress.__doc__
    start = doc.rindex("\n", 0, doc.index("import torch")) + 1
    code = textwrap.dedent(doc[start:doc.index("(``bar.set_postfix")])
    out = io.StringIO()
    namespace = {"out": out}
    exec(compile(code.replace("tqdm(range(200))", "tqdm(range(30), file=out, mininterval=0)"), "progress", "exec"),
         namespace)
    assert "outer_loss=" in out.getvalue() and "hypergrad_norm=" in out.getvalue()
    assert namespace["state"].step == 30
    assert math.isfinite(tb.progress(namespace["info"])["outer_loss"])


# ---------------------------------------------------------------- double loop and tb.hypergrad

@pytest.mark.parametrize("est", ["aid", "stocbio", "itd", "pzobo", "first_order"])
@pytest.mark.parametrize("outer", ["sgd", "adam"])
def test_double_loop_reports_the_estimate_s_losses_norm_and_solve(est, outer):
    prob, inner, outer_b, _ = quadratic(rho=RHO)
    make = {"aid": lambda: tb.aid(tb.cg(steps=3)), "stocbio": lambda: tb.stocbio(3, 0.2),
            "itd": lambda: tb.itd(2, 0.2), "first_order": tb.first_order,
            "pzobo": lambda: tb.pzobo(2, 0.2, directions=2, mu=1e-3, generator=torch.Generator().manual_seed(3))}
    algos = [tb.double_loop(prob, make[est](), lr_x=0.1, inner_steps=2, lr_y=0.2, outer=outer) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    x, y = {"h": torch.randn(4, generator=gen, dtype=DT)}, {"w": torch.randn(5, generator=gen, dtype=DT)}
    s_plain, s = algos[0].init(x, y), algos[1].init(x, y)
    b_in, b_out = inner[0], outer_b[0]
    hg = tb.hypergrad(prob, make[est](), has_aux=True)
    for k in range(3):
        s_plain = algos[0].step(s_plain, b_in, b_out)
        new, info = algos[1].step(s, b_in, b_out, has_aux=True)
        same_state(s_plain, new)
        # the estimate at the inner iterate the step reached (2 GD steps from s.y), by hand
        w = s.y["w"]
        for _ in range(2):
            A, B = b_in
            w = w - 0.2 * (A @ w - B @ s.x["h"])
        if est == "pzobo":      # its own inner path (random): f at the iterate it returned
            torch.testing.assert_close(info.outer_loss, f_hand(s.x["h"], new.y["w"], b_out), rtol=1e-12, atol=1e-12)
        elif est == "itd":
            torch.testing.assert_close(info.outer_loss, f_hand(s.x["h"], new.y["w"], b_out), rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(info.outer_loss, f_hand(s.x["h"], w, b_out), rtol=1e-12, atol=1e-12)
        if est == "stocbio":
            torch.testing.assert_close(info.inner_loss, g_hand(s.x["h"], w, b_in), rtol=1e-12, atol=1e-12)
        if est != "pzobo":
            dx, aux = hg(s.x, {"w": w}, b_in, b_out, v0=s.v if est == "aid" else None)
            torch.testing.assert_close(info.hypergrad_norm, torch.linalg.vector_norm(dx["h"]), rtol=1e-12, atol=0)
        if outer == "sgd":
            moved = torch.linalg.vector_norm(s.x["h"] - new.x["h"]) / 0.1
            torch.testing.assert_close(info.hypergrad_norm, moved, rtol=1e-9, atol=0)
        if est in ("aid", "stocbio"):
            assert isinstance(info.solve, tb.solvers.SolveInfo)
            assert int(info.solve.iterations) == 3
            torch.testing.assert_close(info.solve.residual, aux.solve.residual, rtol=1e-12, atol=1e-15)
            d = tb.progress(info)
            assert d["solve_iterations"] == 3.0 and d["solve_residual"] == float(info.solve.residual)
        else:
            assert info.solve is None
        s = new


# ---------------------------------------------------------------- sharded models (FSDP2, 2 gloo ranks)
def sharded_figures(net, rank, world):
    """The figures of the gradient-only methods, 3 steps each (FdeHBO on both splits)."""
    from test_sharded import data, problems
    (X, t), (Xv, tv) = data()
    tr, va = (X[rank::world], t[rank::world]), (Xv[rank::world], tv[rank::world])
    scaled, body = problems(net)
    if world > 1:
        scaled, body = tb.distributed.data_parallel(scaled), tb.distributed.data_parallel(body)
    x_b, y_h = tb.nn.split(net, inner=["2"])
    out = {}
    # FdeHBO on x = an input scale (replicated), y = every weight
    algo = tb.fdehbo(scaled, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0)
    s = algo.init({"s": torch.zeros(6, dtype=DT)}, {k: p.detach() for k, p in net.named_parameters()})
    for k in range(3):
        s, info = algo.step(s, tr, va, has_aux=True)
        out[f"fdehbo {k}"] = {f: getattr(info, f).detach().clone() for f in ("inner_loss", "outer_loss",
                                                                             "hypergrad_norm", "delta", "v_norm")}
        out[f"fdehbo {k}"]["solve_residual"] = info.solve.residual.detach().clone()
    # x = the body, y = the head (a rank's shard of the 1-row head is empty)
    for name, algo in (("fdehbo body/head", tb.fdehbo(body, lr_x=0.1, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5,
                                                      eta_v=0.5, radius=5.0)),
                       ("f2sa", tb.f2sa(body, lr_x=0.1, lr_y=0.2, lr_z=0.2)),
                       ("bome", tb.bome(body, lr_x=0.1, lr_y=0.2, inner_steps=3)),
                       ("first_order", tb.double_loop(body, tb.first_order(), lr_x=0.1, inner_steps=2, lr_y=0.2))):
        s = algo.init(x_b, y_h)
        for k in range(3):
            s, info = algo.step(s, tr, va, has_aux=True)
            out[f"{name} {k}"] = {f: getattr(info, f).detach().clone() for f in ("inner_loss", "outer_loss",
                                                                                 "hypergrad_norm", "multiplier")
                                  if getattr(info, f) is not None}
    return out


def _figures_worker(rank, world, init_file, out_dir, which):
    """One gloo rank: ``which`` = "sharded" (FSDP2 model, sharded_figures) or "dp"
    (dp_figures); saves this rank's figures."""
    import datetime
    import os
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        if which == "sharded":
            from torch.distributed.fsdp import fully_shard
            from test_sharded import model
            net = model()
            fully_shard(net[0])
            fully_shard(net)
            figures = sharded_figures(net, rank, world)
        else:
            figures = dp_figures(rank, world)
        torch.save(figures, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_figures(tmp_path, mode, world=2):
    """The figures of ``_figures_worker`` in ``mode`` from each of ``world`` gloo ranks."""
    from spawning import spawn
    rdv = str(tmp_path / "rendezvous")
    results = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    spawn(_figures_worker, (world, rdv, str(tmp_path), mode), world, results, rdv)
    return [torch.load(path, weights_only=False) for path in results]


def test_sharded_runs_report_the_figures_of_one_process(tmp_path):
    import torch.distributed as dist
    from test_sharded import model
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    reference = sharded_figures(model(), 0, 1)
    for r, res in enumerate(_spawn_figures(tmp_path, "sharded")):
        assert res.keys() == reference.keys()
        for key, ref in reference.items():
            assert res[key].keys() == ref.keys() and {"inner_loss", "outer_loss", "hypergrad_norm"} <= set(ref) | (
                {"inner_loss"} if key.startswith("first_order") else set()), key
            for f, v in ref.items():
                torch.testing.assert_close(res[key][f], v, rtol=1e-6, atol=1e-9, msg=f"{key} {f} rank {r}")


# ---------------------------------------------------------------- the linear system's report
def residual(v, y, b_in, b_out):
    """‖A v − ∇y f‖/‖∇y f‖ of test_single_loop.quadratic at y (∇y f = y − c)."""
    A, _ = b_in
    return torch.linalg.vector_norm(A @ v - (y - b_out)) / torch.linalg.vector_norm(y - b_out)


@pytest.mark.parametrize("name", ["fdehbo", "fmbo", "soba", "ma_soba", "saba", "srba", "fsla", "amigo"])
def test_solve_reports_the_residual_of_the_linear_system_by_hand(name):
    algo, s, (bi, bo), b_in, b_out = setup(name, **({"inner_steps": 1, "v_steps": 2} if name == "amigo" else {}))
    for t in range(STEPS):
        new, info = algo.step(s, bi, bo, has_aux=True)
        rep = info.solve
        assert isinstance(rep, tb.SolveInfo)
        v0, y0, y1 = flat(s.v), flat(s.y), flat(new.y)
        y_lin = y1 if name in ("fsla", "amigo") else y0          # the point of the v step's products
        start = residual(v0, y_lin, b_in, b_out)
        if name == "amigo":     # M = 2: the second product at v_{t,1} = v_t − λ(A v_t − ∇y f)
            A, _ = b_in
            end = residual(v0 - 0.3 * (A @ v0 - (y_lin - b_out)), y_lin, b_in, b_out)
            assert int(rep.iterations) == 2
        else:
            end = start
            assert int(rep.iterations) == 1
        tol = 1e-7 if name == "fdehbo" else 1e-9        # FdeHBO: the finite-difference product
        torch.testing.assert_close(rep.start_residual, start, rtol=tol, atol=1e-12)
        torch.testing.assert_close(rep.residual, end, rtol=tol, atol=1e-12)
        assert int(rep.nonpositive_curvature) == 0 and not bool(rep.truncated)      # A is positive definite
        s = new
    assert {"solve_iterations", "solve_residual", "solve_start_residual", "solve_nonpositive_curvature",
            "solve_truncated"} <= set(tb.progress(info))


def test_nonpositive_curvature_counts_directions_of_negative_curvature_at_nonzero_v():
    from torchbilevel.optim.step_info import nonpositive, one_step_solve, sgd_solve
    A = torch.diag(torch.tensor([-1.0, 1.0, 2.0], dtype=DT))
    e1, e2, zero = torch.eye(3, dtype=DT)[0], torch.eye(3, dtype=DT)[1], torch.zeros(3, dtype=DT)
    assert bool(nonpositive(e1, A @ e1)) and not bool(nonpositive(e2, A @ e2))
    assert not bool(nonpositive(zero, A @ zero))             # v = 0 says nothing about curvature
    b = torch.tensor([0.0, 3.0, 4.0], dtype=DT)
    rep = one_step_solve(e1, A @ e1, b)
    assert int(rep.nonpositive_curvature) == 1
    torch.testing.assert_close(rep.residual, torch.linalg.vector_norm(A @ e1 - b) / 5.0, rtol=1e-15, atol=0)
    rep0 = sgd_solve(3, torch.tensor(4.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(False))
    assert float(rep0.residual) == 0.0 and float(rep0.start_residual) == 0.0 and int(rep0.iterations) == 3


# ---------------------------------------------------------------- every variant, float32, a non-linear model
def test_has_aux_interleaved_with_a_plain_run_on_one_object_equals_the_runs_alone():
    """tests/test_run_state.py's 23 algorithms and estimators on its float32 tanh model: a
    run stepped with has_aux=True in turn with a plain run on one algorithm object ends
    where each ends alone, bit for bit, and every figure it reported is finite."""
    from test_run_state import NAMES, algorithms, batch_for, flat_x, problem
    for name in NAMES:
        alone = []
        for seed in (0, 1):
            prob, x, y, b = problem(seed)
            algo = algorithms(prob)[name]
            s, b = algo.init(x, y), batch_for(name, b)
            for _ in range(3):
                s = algo.step(s, b, b)
            alone.append(flat_x(algo, s))
        prob0, x0, y0, b0 = problem(0)
        _, x1, y1, b1 = problem(1)
        b0, b1 = batch_for(name, b0), batch_for(name, b1)
        algo = algorithms(prob0)[name]
        s0, s1 = algo.init(x0, y0), algo.init(x1, y1)
        for _ in range(3):
            s0, info = algo.step(s0, b0, b0, has_aux=True)
            s1 = algo.step(s1, b1, b1)
            figures = tb.progress(info)
            assert {"outer_loss", "hypergrad_norm"} <= set(figures), name
            assert all(math.isfinite(v) for v in figures.values()), (name, figures)
        assert torch.equal(flat_x(algo, s0), alone[0]), name
        assert torch.equal(flat_x(algo, s1), alone[1]), name


def test_fdehbo_step_with_has_aux_compiles_in_one_graph_without_a_host_read():
    """fullgraph=True fails on any host read: the figures are tensors the graph returns
    (tests/test_compile.py's setting: check_finite=False, a given δ, decisions at init)."""
    algo, s, (bi, bo), _, _ = setup("fdehbo", delta=1e-4, check_finite=False)
    c = algo.init(s.x, s.y, inner_batch=bi)
    step = torch.compile(algo.step, fullgraph=True)
    for _ in range(2):
        s, info = algo.step(s, bi, bo, has_aux=True)
        c_prev = c
        c, cinfo = step(c, bi, bo, has_aux=True)
        torch.testing.assert_close(c.xf, s.xf, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cinfo.inner_loss, g_hand(flat(c_prev.x), flat(c_prev.y), bi), rtol=1e-12,
                                   atol=1e-12)
        for k, v in tb.progress(info).items():
            # compiled, ∇y g is evaluated at y_t itself (no second backward through the ±
            # pair's mean): the inner loss is g(y_t), not the pair's mean g(y_t) + O(δ²)
            rel = 1e-6 if k == "inner_loss" else 1e-9
            assert tb.progress(cinfo)[k] == pytest.approx(v, rel=rel, abs=1e-12), k


# ---------------------------------------------------------------- data parallel (2 gloo ranks, no sharding)
def dp_figures(rank, world):
    """Every family's figures on test_sharded's input-scale problem, each rank holding 1/N
    of the batch (tb.distributed.data_parallel): the losses are means over ranks."""
    from test_sharded import data, model, problems
    net = model()
    (X, t), (Xv, tv) = data()
    tr, va = (X[rank::world], t[rank::world]), (Xv[rank::world], tv[rank::world])
    prob = problems(net)[0]
    if world > 1:
        prob = tb.distributed.data_parallel(prob)
    x, y = {"s": torch.zeros(6, dtype=DT)}, {k: p.detach() for k, p in net.named_parameters()}
    kw = dict(lr_x=0.1, lr_y=0.2)
    algos = {"fdehbo": tb.fdehbo(prob, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=5.0, **kw),
             "soba": tb.soba(prob, lr_v=0.2, **kw), "mrbo": tb.mrbo(prob, neumann_steps=2, **kw),
             "f2sa": tb.f2sa(prob, lr_z=0.2, inner_steps=2, **kw), "bome": tb.bome(prob, inner_steps=2, **kw),
             "amigo": tb.amigo(prob, lr_v=0.2, inner_steps=2, **kw), "ttsa": tb.ttsa(prob, neumann_steps=2, **kw),
             "fsla": tb.fsla(prob, lr_v=0.2, **kw), "saba": tb.saba(prob, lr_v=0.2, n_inner=1, n_outer=1, **kw),
             "double_loop stocbio": tb.double_loop(prob, tb.stocbio(2, 0.2), inner_steps=1, **kw)}
    out = {}
    for name, algo in algos.items():
        s = algo.init(x, y)
        b_in, b_out = ((0, tr), (0, va)) if name == "saba" else (tr, va)
        for k in range(2):
            s, info = algo.step(s, b_in, b_out, has_aux=True)
            # (stocBiO's inner loss is its linearisation's forward: rank-local, documented)
            keep = ("outer_loss", "hypergrad_norm") + (() if name.startswith("double_loop") else ("inner_loss",))
            out[f"{name} {k}"] = {f: v for f, v in tb.progress(info).items() if f in keep}
    return out


def test_data_parallel_runs_report_the_full_batch_figures(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    reference = dp_figures(0, 1)
    for r, res in enumerate(_spawn_figures(tmp_path, "dp")):
        assert res.keys() == reference.keys()
        for key, ref in reference.items():
            assert res[key].keys() == ref.keys() and {"outer_loss", "hypergrad_norm"} <= set(ref), key
            for f, v in ref.items():
                assert res[key][f] == pytest.approx(v, rel=1e-9, abs=1e-12), (key, f, r)
