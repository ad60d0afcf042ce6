"""The demo: run an experiment, print its results table, save a plot of loss vs time.

``python -m torchbilevel demo`` calls :func:`demo` with the hyper-cleaning
defaults (MNIST-5k, 40 % corrupted labels, every method ~10 s on a 2-core CPU).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from . import EXPERIMENTS
from .plotting import plot_curves
from .records import final_rows, format_table, write_csv

__all__ = ["DemoResult", "TABLE_COLUMNS", "COLUMN_FORMATS", "COLUMN_NOTES", "PLOTS", "X_LABEL",
           "demo", "progress_bar", "setting", "notes", "table"]

# columns of the printed table and the plotted metrics, per experiment
TABLE_COLUMNS = {
    "hyperclean": ["method", "step", "seconds", "test_acc", "test_loss", "val_loss", "auc"],
    "shallow_hr": ["method", "step", "seconds", "phi", "test_loss", "grad_norm", "hypergrad_error"],
    "deep_hr": ["method", "step", "seconds", "outer_acc", "test_acc", "test_loss"],
    "weight_decay": ["method", "step", "seconds", "test_acc", "test_loss", "val_loss", "mean_lam"],
    "compare": ["method", "lr", "step", "oracles", "seconds", "score", "test_acc"],
    "lm_reweight": ["method", "step", "seconds", "val_loss", "w_docs", "w_code", "w_shuffled", "w_random"],
    "fewshot": ["method", "step", "seconds", "test_acc", "final_acc", "ci95", "t_target"],
}

#: fixed number format of each table column (format spec of a float); others: ".4f"
COLUMN_FORMATS = {
    "seconds": ".2f", "test_acc": ".3f", "outer_acc": ".3f", "auc": ".3f",
    "test_loss": ".4f", "val_loss": ".4f", "phi": ".3e", "grad_norm": ".3e",
    "hypergrad_error": ".3e", "mean_lam": ".4f",
    "lr": "g", "oracles": "d", "score": ".3e",
    "w_docs": ".3f", "w_code": ".3f", "w_shuffled": ".3f", "w_random": ".3f",
    "final_acc": ".3f", "ci95": ".3f", "t_target": ".1f",
}

#: what each column means, with its unit (printed under the table)
COLUMN_NOTES = {
    "step": "steps taken",
    "seconds": "optimisation time in s (metric evaluation excluded)",
    "test_acc": "test accuracy (fraction correct)",
    "outer_acc": "accuracy on the outer (validation) split (fraction correct)",
    "test_loss": "test loss ({loss})",
    "val_loss": "validation loss ({loss}) at the current iterates",
    "auc": "AUC of the learned weights σ(λ_i) separating clean from corrupted training samples (0.5 = chance, 1 = perfect)",
    "phi": "Φ(λ) = outer loss at the exact inner solution (mean squared error)",
    "grad_norm": "‖∇Φ(λ)‖, exact",
    "hypergrad_error": "relative error ‖ĝ − ∇Φ‖/‖∇Φ‖ of the method's own hypergradient estimate ĝ (dimensionless)",
    "mean_lam": "mean learned log weight decay λ",
    "lr": "step size tuned on the grid (lr_x = x_ratio·lr)",
    "oracles": "oracle calls (gradients, Hessian-vector and mixed products)",
    "w_docs": "learned weight softmax(x) of the documentation domain (clean; the held-out text is documentation too)",
    "w_code": "learned weight of the standard-library source domain (clean)",
    "w_shuffled": "learned weight of the documentation with its words shuffled (corrupted)",
    "w_random": "learned weight of the random-characters domain (corrupted)",
    "final_acc": "meta-test accuracy at the end, mean over the final test tasks (fraction correct)",
    "ci95": "half-width of the 95 % interval of final_acc (1.96 standard errors over the test tasks)",
    "t_target": "optimisation seconds until the curve's test accuracy first reached the target (- = never)",
    "score": "the metric the step size was tuned on, median over seeds: ‖∇Φ(x)‖² / ‖∇Φ(x_0)‖², exact (compare on the quadratic) or test loss (compare on hyperclean)",
}

#: per experiment: (metric, axis label with unit) per panel, and whether the y-axis is logarithmic
PLOTS = {
    "hyperclean": ([("test_loss", "test loss (cross-entropy, nats)"),
                    ("auc", "AUC of σ(λ): clean vs corrupted samples")], False),
    "shallow_hr": ([("phi", "Φ(λ): outer MSE at the exact inner solution"),
                    ("hypergrad_error", "hypergradient relative error ‖ĝ − ∇Φ‖/‖∇Φ‖")], True),
    "deep_hr": ([("test_loss", "test loss (cross-entropy, nats)"),
                 ("outer_acc", "outer (validation) accuracy (fraction)")], False),
    "weight_decay": ([("test_loss", "test loss (cross-entropy, nats)"),
                      ("test_acc", "test accuracy (fraction)")], False),
    "fewshot": ([("test_acc", "meta-test accuracy on the curve's tasks (fraction)"),
                 ("test_loss", "meta-test query loss (cross-entropy, nats)")], False),
    "compare": ([("score", "‖∇Φ(x)‖² / ‖∇Φ(x_0)‖² or test loss (median over seeds)")], True),
    "lm_reweight": ([("val_loss", "held-out documentation loss (nats per byte)"),
                     ("w_docs", "weight of docs (clean)"), ("w_code", "weight of code (clean)"),
                     ("w_shuffled", "weight of shuffled words (corrupted)"),
                     ("w_random", "weight of random characters (corrupted)")], False),
}

#: x-axis label of every plot
X_LABEL = "optimisation time (s, metric evaluation excluded)"


def _budget(config: Any) -> str:
    if config.seconds is not None:
        return f"{config.seconds:g} s per method"
    return f"{config.steps} steps per method"


def setting(experiment: str, config: Any) -> str:
    """One line stating the experiment's setting (data, sizes, corruption, budget): the plot title."""
    c = config
    if experiment == "hyperclean":
        text = (f"Data hyper-cleaning, MNIST-5k: {c.n_train} train / {c.n_val} val / {c.n_test} test, "
                f"{c.corruption:.0%} of training labels corrupted")
    elif experiment == "shallow_hr":
        text = (f"Shallow hyper-representation ({c.embedding} embedding), synthetic: p = {c.p}, d = {c.d}, "
                f"n = {c.n} per split")
    elif experiment == "deep_hr":
        text = (f"Deep hyper-representation, LeNet body + linear head, MNIST-5k: {c.n_inner} inner / "
                f"{c.n_outer} outer / {c.n_test} test")
    elif experiment == "weight_decay":
        text = (f"Per-feature weight decay, logistic regression on scikit-learn {c.dataset}: "
                f"{c.train_fraction:.0%} train / {c.val_fraction:.0%} val / rest test")
    elif experiment == "lm_reweight":
        text = (f"LM data reweighting: {c.layers}-layer transformer (d = {c.d_model}), byte tokens, "
                f"domains docs / code / shuffled / random, f = held-out docs"
                f"{', FSDP2-sharded' if c.shard else ''}")
    elif experiment == "fewshot":
        text = (f"Few-shot, rotated MNIST-5k ({c.train_classes} meta-train / {40 - c.train_classes} meta-test "
                f"classes): {c.ways}-way {c.shots}-shot, CNN4 width {c.width}, {c.meta_batch} tasks per step")
    else:
        text = experiment
    return f"{text}; {_budget(c)}"


def notes(experiment: str, config: Any, methods: Sequence[str]) -> list[str]:
    """Footnotes for the table: methods known to be untuned or high-variance in this setting."""
    out = []
    if experiment == "hyperclean" and "PZOBO-S" in methods:
        q = getattr(config, "directions", 1)
        out.append(
            f"PZOBO-S uses Q = {q} Gaussian direction(s) per hypergradient for a {config.n_train}-dimensional λ, "
            "as configured here: its estimate has variance of order dim(λ)/Q, high relative to the other "
            "methods at this step budget (each extra direction costs one more inner path).")
    zeroth = [m for m in methods if m.startswith("PZOBO") or m.startswith("HOZOG")]
    if experiment == "shallow_hr" and zeroth:
        out.append(
            f"{', '.join(zeroth)}: {config.directions} random direction(s) per hypergradient in a "
            "high-dimensional λ, as configured here: high-variance estimates at this step budget "
            "(see hypergrad_error).")
    sphere = [m for m in methods if "sphere" in m]
    if sphere:
        out.append(f"{', '.join(sphere)}: the PZOBO authors' released direction rule (per-tensor unit "
                   "directions, no dimension factor): its mean is ∇x f + (1/p)·(implicit term), in effect "
                   "the first-order partial gradient for a large λ; biased by design.")
    if experiment == "lm_reweight" and "first-order" in methods:
        out.append("first-order: here f (held-out loss) does not depend on the weights x directly, so "
                   "∇x f = 0 and the weights never move: the first-order row is the uniform mixture, "
                   "run by the bilevel code path. Data reweighting needs the implicit term.")
    elif "first-order" in methods:
        out.append("first-order: ∇x f at the current inner iterate only, without the implicit term "
                   "−∇xy g·v: a biased baseline by design.")
    return out


@dataclasses.dataclass
class DemoResult:
    """What a demo run produced: the record, the final-row table and the files written."""

    record: list
    table: str
    png: str
    csv: str


def progress_bar(total: float, desc: str, unit: str = "step", enabled: bool = True):
    """A tqdm bar over the run's budget (or None when disabled or tqdm is not installed).

    ``unit="s"``: ``total`` is the optimisation-time budget in seconds and the bar advances
    by optimisation seconds; the time left it shows is the budget not yet spent (metric
    evaluation adds a little), not an extrapolation of the first, slow iterations
    (data loading, first-call initialisation). ``unit="step"``: ``total`` steps, and the
    time left is extrapolated from the average rate since the start.
    """
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    if unit != "s":
        fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} steps [{elapsed} elapsed, ~{remaining} left{postfix}]"
        return tqdm(total=total, desc=desc, unit=unit, bar_format=fmt, smoothing=0)

    class _BudgetBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            d["budget_left"] = self.format_interval(max(0.0, (d["total"] or 0) - d["n"]))
            return d

    fmt = "{l_bar}{bar}| {n:.1f}/{total:.0f} s of budget [{elapsed} elapsed, ~{budget_left} left{postfix}]"
    return _BudgetBar(total=total, desc=desc, unit=unit, bar_format=fmt)


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
    it; returns the record, the text table of final rows and both paths (None on the
    ranks other than 0 of a torchrun launch, which write nothing).
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
    text = table(experiment, config, record)
    if _rank() != 0:  # under torchrun every rank holds the same record: rank 0 writes the files
        return DemoResult(record, text, None, None)
    panels, logy = PLOTS[experiment]
    png = plot_curves(record, out, [m for m, _ in panels], x="seconds", logy=logy,
                      title=title or setting(experiment, config), xlabel=X_LABEL,
                      ylabels=[label for _, label in panels], logx=True, zoom=True)
    csv_path = os.path.splitext(out)[0] + ".csv"
    write_csv(record, csv_path)
    return DemoResult(record, text, png, csv_path)


def _rank() -> int:
    """This process's rank in the initialised torch.distributed group (0 without one)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def table(experiment: str, config: Any, record: Sequence[dict]) -> str:
    """The results table (last row of each method, fixed decimals per column) with a
    line per column saying what it measures, and footnotes from :func:`notes`."""
    columns = TABLE_COLUMNS[experiment]
    rows = final_rows(record)
    lines = [format_table(rows, columns, formats=COLUMN_FORMATS), ""]
    loss = "mean squared error" if experiment == "shallow_hr" else "cross-entropy, nats"
    lines += [f"{col}: {COLUMN_NOTES[col].format(loss=loss)}" for col in columns[1:] if col in COLUMN_NOTES]
    diverged = [r["method"] for r in rows if "diverged" in r]
    if diverged:
        lines.append(f"diverged (stopped at the step shown, no metrics): {', '.join(diverged)}")
    lines += [f"Note: {n}" for n in notes(experiment, config, [r["method"] for r in rows])]
    return "\n".join(lines)
