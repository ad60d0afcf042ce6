"""Plots of experiment records (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Sequence

from ..datasets import INSTALL_HINT
from .records import methods_in

__all__ = ["plot_curves"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib: {INSTALL_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(record: Sequence[dict], path: str, y: str | Sequence[str], x: str = "seconds",
                title: str = "", logy: bool = False) -> str:
    """One line per method of metric(s) ``y`` against ``x``; saves a PNG at ``path``.

    With several metrics, one panel per metric side by side. Creates the
    parent folder. Returns ``path``.
    """
    plt = _pyplot()
    metrics = [y] if isinstance(y, str) else list(y)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name in methods_in(record):
            pts = [(r[x], r[metric]) for r in record
                   if r["method"] == name and r.get(metric) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
