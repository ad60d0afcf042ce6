"""torchbilevel.tree: dict arithmetic against flattened numpy references, ravel/unravel."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchbilevel import tree as T

SETTINGS = settings(max_examples=30, deadline=None)

# A tree layout: 1-4 tensors, each of rank 0-3 with sizes 0-4 (0-d and empty tensors included).
shapes = st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=4)
seeds = st.integers(0, 2**31 - 1)
scalars = st.floats(-3, 3, allow_nan=False, allow_infinity=False)


def make(shape_list, seed, dtype=torch.float64, lead=()):
    gen = torch.Generator().manual_seed(seed)
    return {f"k{i}": torch.randn((*lead, *s), generator=gen, dtype=dtype) for i, s in enumerate(shape_list)}


def flat_np(tree):
    """Reference flattening, independent of tree.ravel: numpy, key order."""
    return np.concatenate([t.detach().numpy().reshape(-1) for t in tree.values()])


def clones(tree):
    return {k: t.clone() for k, t in tree.items()}


def assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k])


@SETTINGS
@given(shapes, seeds, seeds, scalars, scalars)
def test_arithmetic_matches_flat_reference(shape_list, s1, s2, a, b):
    x, y = make(shape_list, s1), make(shape_list, s2)
    x0, y0 = clones(x), clones(y)
    fx, fy = flat_np(x), flat_np(y)
    close = lambda tr, ref: np.testing.assert_allclose(flat_np(tr), ref, rtol=1e-12, atol=1e-12)
    close(T.add(x, y), fx + fy)
    close(T.sub(x, y), fx - fy)
    close(T.scale(x, a), a * fx)
    close(T.scale(x, torch.tensor(a, dtype=torch.float64)), a * fx)
    close(T.axpy(a, x, y), a * fx + fy)
    close(T.axpy(torch.tensor(a, dtype=torch.float64), x, y), a * fx + fy)
    close(T.lincomb(a, x, b, y), a * fx + b * fy)
    close(T.zeros_like(x), np.zeros_like(fx))
    np.testing.assert_allclose(T.dot(x, y).item(), fx @ fy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.sqnorm(x).item(), fx @ fx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.norm(x).item(), np.linalg.norm(fx), rtol=1e-12, atol=1e-12)
    assert T.dot(x, y).shape == () and T.norm(x).shape == ()
    # shapes and keys preserved, inputs untouched (pure functions)
    out = T.axpy(a, x, y)
    assert list(out) == list(x) and all(out[k].shape == x[k].shape for k in x)
    assert_unchanged(x0, x)
    assert_unchanged(y0, y)


@SETTINGS
@given(shapes, seeds)
def test_ravel_unravel_round_trip(shape_list, seed):
    tree = make(shape_list, seed)
    before = clones(tree)
    flat, layout = T.ravel(tree)
    assert flat.shape == (sum(int(np.prod(s)) for s in shape_list),)
    assert flat.is_contiguous()
    np.testing.assert_array_equal(flat.numpy(), flat_np(tree))
    back = T.unravel(layout, flat)
    assert list(back) == list(tree)
    for k in tree:
        assert back[k].shape == tree[k].shape
        assert torch.equal(back[k], tree[k])
    # ravel copies: writing into the flat buffer leaves the original dict alone
    flat.add_(1.0)
    assert_unchanged(before, tree)
    # ravel_like reproduces the same buffer
    assert torch.equal(T.ravel_like(layout, back), flat)


@SETTINGS
@given(shapes, seeds)
def test_unravel_returns_views(shape_list, seed):
    tree = make(shape_list, seed)
    flat, layout = T.ravel(tree)
    views = layout.unravel(flat)
    n = flat.numel()
    flat.copy_(torch.arange(n, dtype=flat.dtype))
    np.testing.assert_array_equal(flat_np(views), np.arange(n, dtype=np.float64))
    for k, t in views.items():          # and the other way round: write into a view
        if t.numel():
            t.fill_(-7.0)
    np.testing.assert_array_equal(flat.numpy(), np.full(n, -7.0))


def test_unravel_zero_dim_tensor():
    tree = {"s": torch.tensor(2.5, dtype=torch.float64), "w": torch.arange(3.0, dtype=torch.float64)}
    flat, layout = T.ravel(tree)
    back = layout.unravel(flat)
    assert back["s"].shape == () and back["s"].item() == 2.5
    flat[0] = 4.0
    assert back["s"].item() == 4.0
    single, lay1 = T.ravel({"s": torch.tensor(1.5)})
    assert lay1.unravel(single)["s"].shape == ()


@SETTINGS
@given(shapes, seeds, st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple))
def test_ravel_like_and_unravel_with_batch_dims(shape_list, seed, lead):
    base = make(shape_list, seed)
    _, layout = T.ravel(base)
    batched = make(shape_list, seed + 1, lead=lead)
    flat = T.ravel_like(layout, batched)
    assert flat.shape == (*lead, layout.numel)
    # reference: ravel each batch element separately
    idx = list(np.ndindex(*lead))
    for i in idx:
        ref = flat_np({k: t[i] for k, t in batched.items()})
        np.testing.assert_array_equal(flat[i].numpy(), ref)
    back = layout.unravel(flat)
    for k in batched:
        assert back[k].shape == batched[k].shape
        assert torch.equal(back[k], batched[k])
    # unravel of a batched buffer gives views too
    flat.zero_()
    assert all(float(t.abs().sum()) == 0.0 for t in back.values())


def test_ravel_like_uses_layout_key_order():
    a = {"p": torch.ones(2), "q": torch.zeros(3)}
    _, layout = T.ravel(a)
    swapped = {"q": torch.full((3,), 5.0), "p": torch.full((2,), 1.0)}
    assert T.ravel_like(layout, swapped).tolist() == [1.0, 1.0, 5.0, 5.0, 5.0]


def test_key_mismatch_errors():
    a = {"p": torch.ones(2), "q": torch.ones(3)}
    b = {"p": torch.ones(2), "r": torch.ones(3)}
    for fn in (T.add, T.sub, T.dot, lambda u, w: T.axpy(2.0, u, w), lambda u, w: T.lincomb(1.0, u, 2.0, w)):
        with pytest.raises(ValueError, match="different keys"):
            fn(a, b)
    _, layout = T.ravel(a)
    with pytest.raises(ValueError, match="keys"):
        T.ravel_like(layout, b)
    with pytest.raises(ValueError, match="entries"):
        layout.unravel(torch.zeros(4))
    with pytest.raises(ValueError):
        T.ravel({})
    with pytest.raises(ValueError, match="dtype"):
        T.ravel({"p": torch.ones(2), "q": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(ValueError):
        T.dot({}, {})


def test_all_finite_clone_detach():
    a = {"p": torch.ones(2), "q": torch.tensor([1.0, float("nan")])}
    assert not bool(T.all_finite(a))
    assert bool(T.all_finite({"p": torch.ones(2)}, {"q": torch.zeros(1)}))
    assert not bool(T.all_finite({"p": torch.ones(2)}, {"q": torch.tensor([float("inf")])}))
    w = {"p": torch.ones(3, requires_grad=True)}
    c, d = T.clone(w), T.detach(w)
    assert not c["p"].requires_grad and not d["p"].requires_grad
    assert c["p"].data_ptr() != w["p"].data_ptr() and d["p"].data_ptr() == w["p"].data_ptr()
