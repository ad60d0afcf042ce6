"""tb.double_loop: one step against dense linear algebra, convergence to the closed-form
minimiser of a quadratic bilevel problem, the Adam rule against torch.optim.Adam,
bit-identical resume from a checkpoint, and purity of step."""
import io

import pytest
import torch

import torchbilevel as tb
from torchbilevel.optim.outer import outer_init, outer_update

DT = torch.float64
RHO = 0.5


# g(x, y) = ½ yᵀ H y − yᵀ (B x + c0)          ⇒  y*(x) = H⁻¹ (B x + c0)
# f(x, y) = ½ ‖y − y_t‖² + ½ ρ ‖x‖²           ⇒  Φ(x) = ½ ‖M x + H⁻¹c0 − y_t‖² + ½ ρ ‖x‖²,  M = H⁻¹ B
# x = [a (2,), c ()] flattened, y = w (4,)
def xvec(x):
    return torch.cat([x["a"], x["c"].reshape(1)])


def inner(x, y, batch):
    H, B, c0 = batch
    w = y["w"]
    return 0.5 * w @ H @ w - w @ (B @ xvec(x) + c0)


def outer(x, y, y_t):
    xv = xvec(x)
    return 0.5 * ((y["w"] - y_t) ** 2).sum() + 0.5 * RHO * xv @ xv


PROBLEM = tb.Bilevel(outer=outer, inner=inner)


def setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    q, _ = torch.linalg.qr(r(4, 4))
    H = q @ torch.diag(torch.tensor([1.0, 1.3, 1.7, 2.0], dtype=DT)) @ q.T    # eigenvalues in [1, 2]
    B, c0, y_t = r(4, 3), r(4), r(4)
    x0 = {"a": torch.zeros(2, dtype=DT), "c": torch.tensor(0.0, dtype=DT)}
    y0 = {"w": torch.zeros(4, dtype=DT)}
    return (H, B, c0), y_t, x0, y0


def closed_form(ib, y_t):
    H, B, c0 = ib
    M = torch.linalg.solve(H, B)
    Hc = torch.linalg.solve(H, c0)
    P = M.T @ M + RHO * torch.eye(3, dtype=DT)
    x_star = torch.linalg.solve(P, M.T @ (y_t - Hc))
    return x_star, M @ x_star + Hc, torch.linalg.eigvalsh(P).max().item()


def state_tensors(state):
    """Every tensor in a DoubleLoopState, by a path name (for equality checks)."""
    out = {}
    for name in ("x", "y", "v"):
        d = getattr(state, name)
        for k, t in (d or {}).items():
            out[f"{name}.{k}"] = t
    for name in ("m", "v"):
        d = getattr(state.outer, name)
        for k, t in (d or {}).items():
            out[f"outer.{name}.{k}"] = t
    return out


def assert_states_identical(a, b):
    ta, tb_ = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb_.keys()
    for k in ta:
        assert torch.equal(ta[k], tb_[k]), k
    assert a.step == b.step and a.outer.count == b.outer.count


def test_one_step_matches_dense_computation():
    ib, y_t, x0, y0 = setup(1)
    H, B, c0 = ib
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=4)), lr_x=0.3, inner_steps=3, lr_y=0.4)
    s1 = algo.step(algo.init(x0, y0), ib, y_t)
    # by hand: 3 GD steps on g, then AID with an exact solve: ∇̂Φ = ρx − ∇xy g·v = ρx + Bᵀ H⁻¹ (y − y_t)
    y = torch.zeros(4, dtype=DT)
    for _ in range(3):
        y = y - 0.4 * (H @ y - B @ xvec(x0) - c0)
    d = RHO * xvec(x0) + B.T @ torch.linalg.solve(H, y - y_t)
    torch.testing.assert_close(xvec(s1.x), xvec(x0) - 0.3 * d, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s1.y["w"], y, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s1.v["w"], torch.linalg.solve(H, y - y_t), rtol=1e-10, atol=1e-12)
    assert s1.step == 1


CONVERGENCE = {
    "aid-cg": (tb.aid(tb.cg(steps=4)), 5),
    "aid-fp": (tb.aid(tb.fixed_point(steps=30, lr=0.5)), 5),
    "stocbio": (tb.stocbio(neumann_steps=30, eta=0.5), 5),
    "itd": (tb.itd(steps=25, lr=0.5), 0),          # its own inner steps, warm-started from aux.y
}


@pytest.mark.parametrize("name", list(CONVERGENCE))
def test_converges_to_closed_form_minimiser(name):
    ib, y_t, x0, y0 = setup(0)
    x_star, y_star, L_phi = closed_form(ib, y_t)
    est, inner_steps = CONVERGENCE[name]
    algo = tb.double_loop(PROBLEM, est, lr_x=1.0 / L_phi, inner_steps=inner_steps, lr_y=0.5)
    state = algo.init(x0, y0)
    for _ in range(80):
        state = algo.step(state, ib, y_t)
    torch.testing.assert_close(xvec(state.x), x_star, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(state.y["w"], y_star, rtol=1e-6, atol=1e-7)
    assert state.step == 80
    assert (xvec(x0) - x_star).norm() > 0.1       # it did move


def test_adam_outer_converges():
    ib, y_t, x0, y0 = setup(0)
    x_star, y_star, _ = closed_form(ib, y_t)
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=4)), lr_x=lambda k: 0.1 * 0.99 ** k,
                          inner_steps=5, lr_y=0.5, outer="adam")
    state = algo.init(x0, y0)
    for _ in range(200):
        state = algo.step(state, ib, y_t)
    torch.testing.assert_close(xvec(state.x), x_star, rtol=0, atol=1e-4)
    assert state.outer.count == 200


def test_adam_rule_matches_torch_optim_adam():
    gen = torch.Generator().manual_seed(3)
    x = {"a": torch.randn(3, 2, generator=gen, dtype=DT), "b": torch.randn((), generator=gen, dtype=DT)}
    params = {k: torch.nn.Parameter(t.clone()) for k, t in x.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    state = outer_init("adam", x)
    for _ in range(6):
        d = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in x.items()}
        x, state = outer_update("adam", state, x, d, 0.01, (0.8, 0.95), 1e-6)
        for k, p in params.items():
            p.grad = d[k].clone()
        opt.step()
        for k in x:
            torch.testing.assert_close(x[k], params[k].detach(), rtol=1e-12, atol=1e-14)


def checkpoint_roundtrip(algo, state):
    buf = io.BytesIO()
    torch.save(algo.state_dict(state), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUME = {
    "aid-cg-sgd": lambda gen: (tb.aid(tb.cg(steps=3)), "sgd", 3),
    "stocbio-adam": lambda gen: (tb.stocbio(5, 0.5), "adam", 3),
    "itd-sgd": lambda gen: (tb.itd(4, 0.5), "sgd", 0),
    "pzobo-adam": lambda gen: (tb.pzobo(4, 0.5, directions=3, mu=1e-2, generator=gen), "adam", 0),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_from_checkpoint_is_bit_identical(name):
    ib, y_t, x0, y0 = setup(2)

    def make(seed):
        est, rule, inner_steps = RESUME[name](torch.Generator().manual_seed(seed))
        return tb.double_loop(PROBLEM, est, lr_x=0.05, inner_steps=inner_steps, lr_y=0.5, outer=rule)

    ref_algo = make(0)                       # uninterrupted: 6 steps
    ref = ref_algo.init(x0, y0)
    for _ in range(6):
        ref = ref_algo.step(ref, ib, y_t)

    first = make(0)                          # 3 steps, checkpoint, new process-like restart
    s = first.init(x0, y0)
    for _ in range(3):
        s = first.step(s, ib, y_t)
    saved = checkpoint_roundtrip(first, s)
    resumed_algo = make(12345)               # a differently seeded generator: the checkpoint restores it
    s = resumed_algo.load_state_dict(saved)
    assert_states_identical(s, first.load_state_dict(checkpoint_roundtrip(first, s)))
    for _ in range(3):
        s = resumed_algo.step(s, ib, y_t)
    assert_states_identical(s, ref)


def test_step_never_modifies_the_state_passed_in():
    ib, y_t, x0, y0 = setup(4)
    for est, rule in ((tb.aid(tb.cg(steps=3)), "adam"), (tb.stocbio(4, 0.5), "sgd"), (tb.itd(3, 0.5), "adam")):
        algo = tb.double_loop(PROBLEM, est, lr_x=0.1, inner_steps=2, lr_y=0.5, outer=rule)
        s = algo.step(algo.init(x0, y0), ib, y_t)        # a state with v and Adam moments filled
        before = {k: t.clone() for k, t in state_tensors(s).items()}
        ptrs = {k: t.data_ptr() for k, t in state_tensors(s).items()}
        s2 = algo.step(s, ib, y_t)
        after = state_tensors(s)
        for k in before:
            assert torch.equal(before[k], after[k]), k
        assert s.step == 1 and s2.step == 2
        assert not torch.equal(xvec(s2.x), xvec(s.x))
        assert all(t.data_ptr() != ptrs.get(f"x.{k}") for k, t in s2.x.items())
    # init copies: the caller's x and y are not aliased by the state
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=3)), lr_x=0.1, inner_steps=2, lr_y=0.5)
    s = algo.init(x0, y0)
    assert s.x["a"].data_ptr() != x0["a"].data_ptr() and s.y["w"].data_ptr() != y0["w"].data_ptr()


def test_warm_start_v_carries_the_linear_system_solution():
    ib, y_t, x0, y0 = setup(5)
    H = ib[0]
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=1)), lr_x=0.1, inner_steps=2, lr_y=0.5)
    cold = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=1)), lr_x=0.1, inner_steps=2, lr_y=0.5, warm_start_v=False)
    s, c = algo.init(x0, y0), cold.init(x0, y0)
    for _ in range(30):
        s, c = algo.step(s, ib, y_t), cold.step(c, ib, y_t)
    exact = lambda st: torch.linalg.solve(H, st.y["w"] - y_t)    # v = H⁻¹ ∇y f at the current y
    # with one CG step per outer step, only the warm-started solution becomes accurate
    assert (s.v["w"] - exact(s)).norm() < 0.1 * (c.v["w"] - exact(c)).norm()


def test_step_rejects_foreign_state():
    ib, y_t, x0, y0 = setup(6)
    algo = tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=3)))
    with pytest.raises(TypeError, match="state"):
        algo.step((x0, y0), ib, y_t)
    with pytest.raises(ValueError, match="checkpoint"):
        algo.load_state_dict({"x": x0})
