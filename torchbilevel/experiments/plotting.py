"""Plots of experiment records (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Sequence

from ..datasets import INSTALL_HINT
from .records import methods_in

__all__ = ["plot_curves", "zoom_window", "MARKERS", "DPI"]


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
                ylabels: Sequence[str] | None = None, dpi: int = DPI, logx: bool = False,
                zoom: bool = False) -> str:
    """One line per method of metric(s) ``y`` against ``x``; saves a PNG at ``path``.

    With several metrics, one panel per metric side by side. Each method keeps its
    colour and marker on every panel (markers at about 8 points per line, so dense
    curves stay readable), and one legend shared by all panels sits under them.
    ``xlabel`` / ``ylabels`` are the axis labels (default: the field names);
    ``title`` goes above the panels. Saved at ``dpi`` (default 150). Creates the
    parent folder. Returns ``path``.

    ``logx``: a logarithmic x axis, so that runs that finish early (baselines done in
    half a second) are not squeezed against x = 0; x values below 1/1000 of the largest
    (a first record at 0 s) are drawn at that value, and the axis label says "log scale".
    ``zoom``: a second row of panels, one under each metric, showing the same curves
    over the last three quarters of the x range with the y axis fitted to the tightest
    cluster of final values (at least half of the methods), so that methods ending
    close together can be told apart; see :func:`zoom_window`.
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
    largest = max((r[x] for r in record if r.get(x) is not None), default=0.0)
    floor = largest / 1000 if (logx and largest > 0) else None
    rows = 2 if zoom else 1
    fig, axes = plt.subplots(rows, len(metrics), figsize=(6.0 * len(metrics), 4.4 * rows), squeeze=False)
    handles = {}
    for col, (metric, ylabel) in enumerate(zip(metrics, ylabels)):
        curves = {}
        for name in names:
            pts = [(r[x] if floor is None else max(r[x], floor), r[metric]) for r in record
                   if r["method"] == name and r.get(metric) is not None]
            if pts:
                curves[name] = tuple(zip(*pts))
        for row in range(rows):
            ax = axes[row][col]
            for name, (xs, ys) in curves.items():
                (line,) = ax.plot(xs, ys, label=name, markersize=5, linewidth=1.4,
                                  markevery=max(1, len(xs) // 8), **style[name])
                handles.setdefault(name, line)
            label = xlabel or x
            if logx:
                ax.set_xscale("log")
                label += " (log scale)"
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel if row == 0 else f"{ylabel} (zoom)")
            if logy:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 1:
                window = zoom_window(curves)
                if window is not None:
                    (x0, x1), (y0, y1) = window
                    ax.set_xlim(x0, x1)
                    ax.set_ylim(y0, y1)
                if logx:  # a zoomed log axis spans less than a decade: plain numbers read better
                    from matplotlib.ticker import NullFormatter, ScalarFormatter
                    ax.xaxis.set_major_formatter(ScalarFormatter())
                    ax.xaxis.set_minor_formatter(NullFormatter())
    if handles:
        ordered = [handles[n] for n in names if n in handles]
        fig.legend(ordered, [h.get_label() for h in ordered], loc="lower center",
                   ncol=min(len(ordered), 5), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    legend_rows = -(-len(handles) // 5) if handles else 0
    fig.tight_layout(rect=(0, 0.07 * legend_rows / rows, 1, 1))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def zoom_window(curves: dict, share: float = 0.5):
    """((x0, x1), (y0, y1)) of the zoom panel of :func:`plot_curves`, or None.

    ``curves`` maps a method to its (xs, ys). x: the last three quarters of the x range
    (from a quarter of the largest x to the largest). y: the narrowest interval holding the
    final values of at least ``share`` of the methods (two at least), widened by 30 % of
    its width on each side (and never narrower than 1e-3 of its centre's size), so those
    methods' ends are spread over the panel.
    """
    if not curves:
        return None
    x1 = max(max(xs) for xs, _ in curves.values())
    # methods still running in the window (baselines that finished early are left out)
    finals = sorted(ys[-1] for xs, ys in curves.values() if xs[-1] >= x1 / 4)
    if len(finals) < 2:
        return None
    k = max(2, -(-int(share * 100) * len(finals) // 100))
    lo, hi = min(((finals[i], finals[i + k - 1]) for i in range(len(finals) - k + 1)),
                 key=lambda pair: pair[1] - pair[0])
    pad = max(0.3 * (hi - lo), 1e-3 * max(abs(lo), abs(hi), 1e-12))
    return (x1 / 4, x1 * 1.05), (lo - pad, hi + pad)
