"""Plots of experiment records (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Sequence

from ..datasets import INSTALL_HINT
from .records import methods_in

__all__ = ["plot_curves", "MARKERS", "DPI"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib: {INSTALL_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


#: one marker per method, in order of first appearance, the same on every panel
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
#: dots per inch of the saved PNGs
DPI = 150


def plot_curves(record: Sequence[dict], path: str, y: str | Sequence[str], x: str = "seconds",
                title: str = "", logy: bool = False, xlabel: str | None = None,
                ylabels: Sequence[str] | None = None, dpi: int = DPI) -> str:
    """One line per method of metric(s) ``y`` against ``x``; saves a PNG at ``path``.

    With several metrics, one panel per metric side by side. Each method keeps its
    colour and marker on every panel (markers at about 8 points per line, so dense
    curves stay readable), and one legend shared by all panels sits under them.
    ``xlabel`` / ``ylabels`` are the axis labels (default: the field names);
    ``title`` goes above the panels. Saved at ``dpi`` (default 150). Creates the
    parent folder. Returns ``path``.
    """
    plt = _pyplot()
    metrics = [y] if isinstance(y, str) else list(y)
    ylabels = list(ylabels) if ylabels is not None else metrics
    if len(ylabels) != len(metrics):
        raise ValueError(f"{len(metrics)} metrics but {len(ylabels)} y-axis labels")
    names = methods_in(record)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    style = {name: dict(color=colors[i % len(colors)], marker=MARKERS[i % len(MARKERS)])
             for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.4), squeeze=False)
    handles = {}
    for ax, metric, ylabel in zip(axes[0], metrics, ylabels):
        for name in names:
            pts = [(r[x], r[metric]) for r in record
                   if r["method"] == name and r.get(metric) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            (line,) = ax.plot(xs, ys, label=name, markersize=5, linewidth=1.4,
                              markevery=max(1, len(xs) // 8), **style[name])
            handles.setdefault(name, line)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if handles:
        ordered = [handles[n] for n in names if n in handles]
        fig.legend(ordered, [h.get_label() for h in ordered], loc="lower center",
                   ncol=min(len(ordered), 5), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    rows = -(-len(handles) // 5) if handles else 0
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
