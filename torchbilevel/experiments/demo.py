"""The demo: run an experiment, print its results table, save a plot of loss vs time.

``python -m torchbilevel demo`` calls :func:`demo` with the hyper-cleaning
defaults (MNIST-5k, 40 % corrupted labels, every method ~10 s on a 2-core CPU).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from . import EXPERIMENTS
from .plotting import plot_curves
from .records import final_rows, format_table, write_csv

__all__ = ["DemoResult", "TABLE_COLUMNS", "PLOTS", "demo", "progress_bar"]

# columns of the printed table and the plotted metrics, per experiment
TABLE_COLUMNS = {
    "hyperclean": ["method", "step", "seconds", "test_acc", "test_loss", "val_loss", "auc"],
    "shallow_hr": ["method", "step", "seconds", "phi", "test_loss", "grad_norm", "hypergrad_error"],
    "deep_hr": ["method", "step", "seconds", "outer_acc", "test_acc", "test_loss"],
    "weight_decay": ["method", "step", "seconds", "test_acc", "test_loss", "val_loss", "mean_lam"],
}
PLOTS = {
    "hyperclean": (["test_loss", "auc"], False),
    "shallow_hr": (["phi", "hypergrad_error"], True),
    "deep_hr": (["test_loss", "outer_acc"], False),
    "weight_decay": (["test_loss", "test_acc"], False),
}


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced: the record, the final-row table and the files written."""

    record: list
    table: str
    png: str
    csv: str


def progress_bar(total: float, desc: str, unit: str = "step", enabled: bool = True):
    """A tqdm bar (or None when disabled or tqdm is not installed)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}{postfix}]"
    return tqdm(total=total, desc=desc, unit=unit, bar_format=fmt)


def _total(config: Any) -> float:
    """Progress total: seconds of budget when time-limited, else steps."""
    if config.seconds is not None:
        return float(config.seconds) * len(config.methods)
    steps = config.steps * len(config.methods)
    if hasattr(config, "baseline_steps"):
        baselines = sum(m in ("noisy", "clean") for m in config.methods)
        steps -= baselines * (config.steps - min(config.steps, config.baseline_steps))
    return steps


def demo(experiment: str = "hyperclean", config: Any = None, out: str | None = None,
         progress: bool = True, title: str | None = None) -> DemoResult:
    """Run ``experiment`` with ``config`` (default config if None) and save its outputs.

    Writes ``out`` (a PNG of the plotted metrics against optimisation seconds,
    default ``out/demo_<experiment>.png``) and a CSV of the full record beside
    it; returns the record, the text table of final rows and both paths.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {sorted(EXPERIMENTS)}")
    module, config_cls = EXPERIMENTS[experiment]
    config = config_cls() if config is None else config
    out = out or os.path.join("out", f"demo_{experiment}.png")
    unit = "s" if config.seconds is not None else "step"
    bar = progress_bar(_total(config), experiment, unit, progress)
    try:
        record = module.run(config, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    table = format_table(final_rows(record), TABLE_COLUMNS[experiment])
    metrics, logy = PLOTS[experiment]
    png = plot_curves(record, out, metrics, x="seconds", logy=logy,
                      title=title or f"{experiment} (time = optimisation only)")
    csv_path = os.path.splitext(out)[0] + ".csv"
    write_csv(record, csv_path)
    return DemoResult(record, table, png, csv_path)
