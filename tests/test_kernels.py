"""Tests of torchbilevel.kernels: the fused FdeHBO / FMBO updates (products layout:
the gradient rows hold finished ∇yy g·v and ∇xy g·v; fd=True was removed).

The Triton kernels run on CPU tensors through the Triton interpreter, so the
environment variable must be set before anything imports triton.
"""
import os

# TB_TEST_DEVICE=cuda (bench/gpu.py on a GPU machine): CUDA tensors and the compiled kernels,
# no interpreter. Default "cpu": CPU tensors through the Triton interpreter.
DEVICE = os.environ.get("TB_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton (and torchbilevel.kernels' use of it) is imported

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchbilevel.kernels as K
from torchbilevel.kernels import reference

HAS_TRITON = K.triton_available()


def _block():
    from torchbilevel.kernels import triton_update

    return triton_update.BLOCK


@pytest.fixture
def tri():
    """The Triton kernel module, built by the interpreter; skip when that is impossible."""
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    from torchbilevel.kernels import triton_update

    if DEVICE == "cpu" and not triton_update.INTERPRETED:
        pytest.skip("triton_update was imported before TRITON_INTERPRET=1 was set")
    return triton_update


# ---------------------------------------------------------------- data + naive formulas

def make_inner(d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y, v, h_g, h_R = (torch.randn(d, generator=gen).to(DEVICE, dtype) for _ in range(4))
    grads = torch.randn(6, d, generator=gen).to(DEVICE, dtype)
    kw = dict(beta=0.1, lam=0.25, eta_g=0.37, eta_R=0.61)
    return (y, v, h_g, h_R, grads), kw


def make_outer(p, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, h_f = (torch.randn(p, generator=gen).to(DEVICE, dtype) for _ in range(2))
    grads = torch.randn(4, p, generator=gen).to(DEVICE, dtype)
    kw = dict(alpha=0.05, eta_f=0.37)
    return (x, h_f, grads), kw


def naive_inner(y, v, h_g, h_R, grads, *, beta, lam, eta_g, eta_R):
    """FdeHBO Alg. 1 lines 4-5 written out in float64, straight from the paper."""
    y, v, h_g, h_R, G = (t.double() for t in (y, v, h_g, h_R, grads))
    gy_cur, gy_prev, H_cur, H_prev, fy_cur, fy_prev = G
    R_cur, R_prev = H_cur - fy_cur, H_prev - fy_prev  # eq. (8) / (5)
    hg = eta_g * gy_cur + (1 - eta_g) * (h_g + gy_cur - gy_prev)  # eq. (6)
    hR = eta_R * R_cur + (1 - eta_R) * (h_R + R_cur - R_prev)  # eq. (7) / (12)
    y_new = y - beta * hg  # line 4
    w = v - lam * hR  # line 5
    return y_new, w, hg, hR, (w * w).sum()


def naive_outer(x, h_f, grads, *, alpha, eta_f):
    """FdeHBO Alg. 1 line 7 written out in float64."""
    x, h_f, G = (t.double() for t in (x, h_f, grads))
    fx_cur, fx_prev, jv_cur, jv_prev = G
    F_cur, F_prev = fx_cur - jv_cur, fx_prev - jv_prev  # eq. (3)
    hf = eta_f * F_cur + (1 - eta_f) * (h_f + F_cur - F_prev)  # eq. (10) / (13)
    return x - alpha * hf, hf  # line 7


def naive_project(w, radius):
    """Alg. 1 line 6 in float64."""
    w = w.double()
    n = torch.linalg.vector_norm(w)
    return w if n <= radius else radius * w / n


def close(actual, expected, dtype):
    """Tolerances for one rounding to the storage dtype on top of float32 arithmetic."""
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-4)
    else:  # bfloat16 / float16: 8 / 11 significant bits, interpreter may truncate instead of rounding
        tol = dict(rtol=2**-6, atol=2e-2)
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


# ---------------------------------------------------------------- reference vs naive

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.37])
def test_reference_inner_matches_naive(dtype, eta):
    args, kw = make_inner(257, dtype)
    kw.update(eta_g=eta, eta_R=1.0 - eta)
    out = K.inner_update(*args, **kw, backend="torch")
    want = naive_inner(*args, **kw)
    for got, exp in zip(out[:4], want[:4]):
        assert got.dtype == dtype and got.shape == args[0].shape
        close(got, exp, dtype)
    sq_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out[4].dtype == sq_dtype and out[4].dim() == 0
    # w_sqnorm is Σ w² of w as stored
    torch.testing.assert_close(out[4].double(), (out[1].double() ** 2).sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.37])
def test_reference_outer_matches_naive(dtype, eta):
    args, kw = make_outer(131, dtype)
    kw.update(eta_f=eta)
    out = K.outer_update(*args, **kw, backend="torch")
    for got, exp in zip(out, naive_outer(*args, **kw)):
        assert got.dtype == dtype
        close(got, exp, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius", [0.5, 100.0])
def test_reference_projection_matches_naive(dtype, radius):
    w = torch.randn(300, dtype=dtype)
    v = K.project_ball(w, (w.double() ** 2).sum().to(dtype), radius, backend="torch")
    close(v, naive_project(w, radius), dtype)


@pytest.mark.parametrize("name", ["inner_update", "outer_update", "project_ball"])
def test_reference_and_public_signatures_agree(name):
    """The reference has the public signature minus ``backend`` and the compatibility
    keywords ``fd``, ``scale_cur``, ``scale_prev`` (and so do the Triton wrappers)."""
    import inspect

    public = inspect.signature(getattr(K, name)).parameters
    assert list(public)[-1] == "backend" and public["backend"].default == "auto"
    compat = {"fd", "scale_cur", "scale_prev", "backend"}
    want = [(p.name, p.kind) for p in public.values() if p.name not in compat]
    impls = [reference] + ([K.dispatch._triton()] if HAS_TRITON else [])
    for impl in impls:
        got = [(p.name, p.kind) for p in inspect.signature(getattr(impl, name)).parameters.values()]
        assert got == want, impl.__name__


def test_compatibility_keywords_change_nothing():
    """fd=False and the ignored scales (what torchbilevel.optim.single_loop passes) give the
    same result as leaving them out; fd=True, the removed finite-difference layout, raises."""
    args, kw = make_inner(33)
    plain = K.inner_update(*args, **kw, backend="torch")
    compat = K.inner_update(*args, **kw, scale_cur=1.0, scale_prev=1.0, fd=False, backend="torch")
    for a, b in zip(plain, compat):
        assert torch.equal(a, b)
    oargs, okw = make_outer(33)
    plain = K.outer_update(*oargs, **okw, backend="torch")
    compat = K.outer_update(*oargs, **okw, scale_cur=1.0, scale_prev=1.0, fd=False, backend="torch")
    for a, b in zip(plain, compat):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="removed"):
        K.inner_update(*args, **kw, fd=True)


def test_projection_at_zero_and_infinite_radius():
    w = torch.zeros(7)
    v = K.project_ball(w, torch.zeros(()), 1.0, backend="torch")
    assert torch.equal(v, w) and v.data_ptr() != w.data_ptr()
    w = torch.randn(7) * 1e3
    v = K.project_ball(w, (w * w).sum(), float("inf"), backend="torch")
    assert torch.equal(v, w) and v.data_ptr() != w.data_ptr()


def test_reference_composes_with_vmap_and_autograd():
    """No out= and no writes to inputs: the CPU path runs under torch.func.vmap and autograd."""
    B, d = 3, 6
    args, kw = make_inner(B * d, torch.float64)
    batched = [a.reshape(B, d) if a.dim() == 1 else a.reshape(6, B, d).transpose(0, 1).contiguous() for a in args]

    def inner(*a):
        return K.inner_update(*a, **kw, backend="torch")

    out = torch.func.vmap(inner)(*batched)
    for i in range(B):
        for got, exp in zip(out, inner(*(t[i] for t in batched))):
            torch.testing.assert_close(got[i], exp)
    y, v, h_g, h_R, grads = (t[0].clone() for t in batched)
    v.requires_grad_(True)
    grads.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v_, g_: inner(y, v_, h_g, h_R, g_)[1:], (v, grads))
    oargs, okw = make_outer(5, torch.float64)
    x, h_f, og = (t.clone().requires_grad_(True) for t in oargs)
    assert torch.autograd.gradcheck(lambda *a: K.outer_update(*a, **okw, backend="torch"), (x, h_f, og))
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: K.project_ball(w_, (w_ * w_).sum(), 0.5, backend="torch"), (w,))


# ---------------------------------------------------------------- Triton (interpreter) vs reference

def _sizes():
    block = 1024
    if HAS_TRITON:
        block = _block()
    return [1, 2, block - 1, block + 1, 3 * block + 17]


def _run_both(fn, args, kw):
    before = [a.clone() for a in args]
    got = fn(*args, **kw, backend="triton")
    for a, b in zip(args, before):
        assert torch.equal(a, b), "an input was modified"
    want = fn(*args, **kw, backend="torch")
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", _sizes())
def test_triton_inner_matches_reference(tri, d, dtype):
    args, kw = make_inner(d, dtype, seed=d)
    n0 = K.triton_launches()["inner_update"]
    got, want = _run_both(K.inner_update, args, kw)
    assert K.triton_launches()["inner_update"] == n0 + 1
    for g, w in zip(got[:4], want[:4]):
        assert g.dtype == dtype and g.shape == (d,) and g.device == args[0].device
        close(g, w, dtype)
    assert got[4].dtype == torch.float32 and got[4].dim() == 0
    torch.testing.assert_close(got[4], (got[1].float() ** 2).sum(), rtol=1e-5, atol=1e-6)
    close(got[4], want[4], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", _sizes())
def test_triton_outer_matches_reference(tri, p, dtype):
    args, kw = make_outer(p, dtype, seed=p)
    n0 = K.triton_launches()["outer_update"]
    got, want = _run_both(K.outer_update, args, kw)
    assert K.triton_launches()["outer_update"] == n0 + 1
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (p,)
        close(g, w, dtype)


@pytest.mark.parametrize("eta_R", [0.0, 1.0, 0.37])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.37])
def test_triton_momentum_weights(tri, eta, eta_R):
    d = 3 * _block() + 17
    args, kw = make_inner(d, seed=3)
    kw.update(eta_g=eta, eta_R=eta_R)
    got, want = _run_both(K.inner_update, args, kw)
    for g, w, n in zip(got, want, naive_inner(*args, **kw)):
        close(g, w, torch.float32)
        close(g, n, torch.float32)
    oargs, okw = make_outer(d, seed=4)
    okw.update(eta_f=eta)
    got, want = _run_both(K.outer_update, oargs, okw)
    for g, w, n in zip(got, want, naive_outer(*oargs, **okw)):
        close(g, w, torch.float32)
        close(g, n, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", _sizes())
@pytest.mark.parametrize("active", [True, False])
def test_triton_projection_matches_reference(tri, d, active, dtype):
    w = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(DEVICE, dtype)
    sq = (w.float() ** 2).sum()
    radius = 0.5 * sq.sqrt().item() if active else 2.0 * sq.sqrt().item() + 1.0
    n0 = K.triton_launches()["project_ball"]
    got, want = _run_both(K.project_ball, (w, sq), dict(radius=radius))
    assert K.triton_launches()["project_ball"] == n0 + 1
    assert got.dtype == dtype and got.shape == w.shape
    close(got, want, dtype)
    if not active:
        assert torch.equal(got, w)
    elif dtype == torch.float32:
        assert torch.linalg.vector_norm(got).item() <= radius * (1 + 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_padded_grads(backend):
    """grads may be buf[:, :n] of a row-padded buffer: same result as the contiguous rows."""
    if backend == "triton" and not (HAS_TRITON and (DEVICE == "cuda" or K.dispatch._triton().INTERPRETED)):
        pytest.skip("the interpreted Triton backend is not available")
    d = 37
    args, kw = make_inner(d, seed=11)
    buf = torch.full((6, 48), float("nan"), device=DEVICE)  # padding must never be read
    buf[:, :d] = args[4]
    padded = buf[:, :d]
    got = K.inner_update(*args[:4], padded, **kw, backend=backend)
    want = K.inner_update(*args, **kw, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    oargs, okw = make_outer(d, seed=12)
    obuf = torch.full((4, 40), float("nan"), device=DEVICE)
    obuf[:, :d] = oargs[2]
    got = K.outer_update(oargs[0], oargs[1], obuf[:, :d], **okw, backend=backend)
    for g, w in zip(got, K.outer_update(*oargs, **okw, backend=backend)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_triton_projection_of_zero_is_finite(tri):
    w = torch.zeros(_block() + 1, device=DEVICE)
    v = K.project_ball(w, torch.zeros((), device=DEVICE), 0.1, backend="triton")
    assert torch.equal(v, w)


def test_triton_full_step_matches_reference(tri):
    """inner -> projection (norm read from the device tensor) -> outer, both backends."""
    d, p = 2 * _block() + 5, _block() + 3
    args, kw = make_inner(d, seed=7)
    oargs, okw = make_outer(p, seed=8)
    results = {}
    for backend in ("triton", "torch"):
        y, w, h_g, h_R, sq = K.inner_update(*args, **kw, backend=backend)
        v = K.project_ball(w, sq, 0.3 * sq.sqrt().item(), backend=backend)
        x, h_f = K.outer_update(*oargs, **okw, backend=backend)
        results[backend] = (y, v, h_g, h_R, x, h_f)
    for g, w in zip(results["triton"], results["torch"]):
        close(g, w, torch.float32)


def test_auto_runs_reference_on_cpu(tri):
    args, kw = make_inner(10)
    args = tuple(a.cpu() for a in args)  # CPU tensors whatever TB_TEST_DEVICE says
    n0 = K.triton_launches()
    out = K.inner_update(*args, **kw)  # backend="auto"
    K.project_ball(out[1], out[4], 1.0)
    assert K.triton_launches() == n0


def test_triton_refuses_float64(tri):
    args, kw = make_inner(10, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        K.inner_update(*args, **kw, backend="triton")


# ---------------------------------------------------------------- backends without the interpreter / without triton

def _python(code, env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
def test_triton_on_cpu_without_interpreter_raises():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = """
        import torch, torchbilevel.kernels as K
        w = torch.ones(4)
        try:
            K.project_ball(w, (w * w).sum(), 1.0, backend="triton")
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("raised")
        print(K.project_ball(w, (w * w).sum(), 1.0, backend="auto").tolist())
    """
    res = _python(code, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["raised", "[0.5, 0.5, 0.5, 0.5]"]


def test_library_works_without_triton():
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail
        import torch, torchbilevel.kernels as K
        assert not K.triton_available()
        y = torch.ones(3)
        out = K.inner_update(y, y, y, y, torch.zeros(6, 3), beta=1.0, lam=1.0, eta_g=1.0, eta_R=1.0,
                             scale_cur=0.0, scale_prev=0.0, fd=False)
        assert torch.equal(out[0], y) and out[4].item() == 3.0
        try:
            K.inner_update(y, y, y, y, torch.zeros(6, 3), beta=1.0, lam=1.0, eta_g=1.0, eta_R=1.0,
                           scale_cur=0.0, scale_prev=0.0, fd=False, backend="triton")
        except RuntimeError as e:
            assert "triton" in str(e)
            print("ok")
        assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
    """
    res = _python(code, dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# ---------------------------------------------------------------- validation

def test_validation_names_the_argument():
    args, kw = make_inner(6)
    y, v, h_g, h_R, grads = args

    def call(**over):
        a = dict(zip(("y", "v", "h_g", "h_R", "grads"), args))
        k = dict(kw)
        for key, val in over.items():
            (a if key in a else k)[key] = val
        return K.inner_update(a.pop("y"), a.pop("v"), a.pop("h_g"), a.pop("h_R"), a.pop("grads"), **k)

    with pytest.raises(ValueError, match="grads"):
        call(grads=grads[:5])  # the inner side needs 6 rows
    with pytest.raises(ValueError, match="grads"):
        call(grads=torch.randn(6, 6).t())  # rows not contiguous
    with pytest.raises(ValueError, match="grads"):
        call(grads=grads[:1].expand(6, 6))  # overlapping rows
    with pytest.raises(ValueError, match="h_g"):
        call(h_g=h_g.double())
    with pytest.raises(ValueError, match="h_R"):
        call(h_R=torch.randn(7))
    with pytest.raises(ValueError, match="v"):
        call(v=torch.randn(12)[::2])
    with pytest.raises(ValueError, match="v"):
        call(v=torch.empty(6, device="meta"))
    with pytest.raises(ValueError, match="y"):
        call(y=torch.randn(2, 3))
    with pytest.raises(ValueError, match="eta_g"):
        call(eta_g=1.5)
    with pytest.raises(ValueError, match="scale_cur"):
        call(scale_cur=float("nan"))
    with pytest.raises(TypeError, match="beta"):
        call(beta=torch.tensor(0.1))
    with pytest.raises(TypeError, match="fd"):
        call(fd=1)
    with pytest.raises(ValueError, match="fd=True"):
        call(fd=True)
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    oargs, okw = make_outer(5)
    with pytest.raises(ValueError, match="grads"):
        K.outer_update(oargs[0], oargs[1], torch.randn(6, 5), **okw)  # the outer side needs 4 rows
    with pytest.raises(ValueError, match="fd=True"):
        K.outer_update(*oargs, **okw, fd=True, scale_cur=2.0, scale_prev=2.0)
    with pytest.raises(ValueError, match="eta_f"):
        K.outer_update(*oargs, **{**okw, "eta_f": -0.1})
    w = torch.randn(5)
    with pytest.raises(ValueError, match="radius"):
        K.project_ball(w, (w * w).sum(), 0.0)
    with pytest.raises(ValueError, match="w_sqnorm"):
        K.project_ball(w, torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="backend"):
        K.project_ball(w, (w * w).sum(), 1.0, backend="Torch")


# ---------------------------------------------------------------- properties of the reference

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def inner_case(draw):
    d = draw(st.integers(1, 40))
    vec = st.lists(finite, min_size=d, max_size=d)
    t = lambda: torch.tensor(draw(vec), dtype=torch.float32)  # noqa: E731
    args = [t() for _ in range(4)] + [torch.stack([t() for _ in range(6)])]
    kw = dict(beta=draw(st.floats(0, 1)), lam=draw(st.floats(0, 1)), eta_g=1.0, eta_R=1.0)
    return args, kw


@settings(max_examples=60, deadline=None)
@given(inner_case(), st.data())
def test_eta_one_ignores_momentum_and_previous_rows(case, data):
    args, kw = case
    y, v, h_g, h_R, grads = args
    out = K.inner_update(*args, **kw, backend="torch")
    # scramble the momenta and every "prev" row: with eta = 1 nothing may change
    other = torch.tensor(data.draw(st.lists(finite, min_size=y.numel(), max_size=y.numel())))
    g2 = grads.clone()
    prev_rows = [1, 3, 5]
    g2[prev_rows] = other - 7.0
    out2 = K.inner_update(y, v, other, other * 3, g2, **kw, backend="torch")
    for a, b in zip(out, out2):
        assert torch.equal(a, b)
    assert torch.equal(out[2], grads[0])  # eq. (6) with η_g = 1: h_g = ∇y g(x_t, y_t)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.floats(1e-3, 1e3))
def test_projection_properties(values, radius):
    w = torch.tensor(values, dtype=torch.float32)
    v = K.project_ball(w, torch.dot(w, w), radius, backend="torch")
    norm = torch.linalg.vector_norm(w.double()).item()
    assert torch.isfinite(v).all()
    assert torch.linalg.vector_norm(v.double()).item() <= radius * (1 + 1e-5)
    if norm <= radius * (1 - 1e-6):
        assert torch.equal(v, w)
    else:  # same direction: v is a non-negative multiple of w
        assert torch.all(v * w >= 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.floats(0, 1))
def test_outer_with_equal_cur_and_prev_rows(p, eta):
    """If the current and previous hypergradient estimates agree, h_f moves towards F by η_f."""
    gen = torch.Generator().manual_seed(p)
    x, h_f, fx, a, b = (torch.randn(p, generator=gen, dtype=torch.float64) for _ in range(5))
    grads = torch.stack([fx, fx, a, a])
    x_new, h_new = K.outer_update(x, h_f, grads, alpha=0.1, eta_f=eta, backend="torch")
    F = fx - a
    torch.testing.assert_close(h_new, eta * F + (1 - eta) * h_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new, x - 0.1 * h_new, rtol=1e-12, atol=1e-12)
