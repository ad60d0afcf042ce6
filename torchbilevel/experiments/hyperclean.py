"""Data hyper-cleaning on MNIST-5k (stocBiO paper 003 app. A.2; FdeHBO paper 001 §4.2).

A linear classifier y = (weight, bias) is trained on labels corrupted with
probability p; the outer variable x = λ holds one logit per training sample,
whose sigmoid weights that sample in the inner loss:

    inner  g(λ, y) = mean_i σ(λ_i) CE(y; a_i, b_i) + C_r ‖y‖²      (003 app. A.2, 001 eq. (14))
    outer  f(λ, y) = mean_{validation} CE(y; a, b)

A good λ gives the corrupted samples small weights: the AUC of σ(λ) separating
clean from corrupted training samples measures that. Baselines train the same
classifier on the noisy labels and on the clean subset only (an oracle).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import torchbilevel as tb

from .. import datasets
from . import metrics
from .baselines import frozen_outer
from .methods import LABELS as METHOD_LABELS
from .methods import STOCHASTIC, Hyper, build, check_names
from .runner import Method, run_methods
from .streams import full_batch, minibatches

__all__ = ["HypercleanConfig", "HypercleanData", "METHODS", "LABELS", "corrupt_labels",
           "hyper", "make_data", "initial_point", "inner_loss", "outer_loss", "plain_loss", "evaluate", "make_methods",
           "run"]

LABELS = {**{k: METHOD_LABELS[k] for k in
              ("aid_cg", "aid_fp", "itd", "stocbio", "pzobo_s", "fmbo", "fdehbo")},
          "noisy": "train on noisy", "clean": "train on clean only"}
METHODS = tuple(LABELS)


@dataclasses.dataclass
class HypercleanConfig:
    """Settings of one hyper-cleaning run (defaults: the demo's, about 1.5 min on 2 cores).

    Every method runs at most ``steps`` steps (the single-level baselines
    ``baseline_steps`` full-batch momentum steps, enough to converge) and
    ``seconds`` of optimisation time (None: no limit). Double-loop methods do ``inner_steps`` warm-started
    inner GD steps (step ``lr_y``) per outer Adam step (``lr_x``); stochastic
    ones (stocBiO, PZOBO-S, FMBO, FdeHBO) draw minibatches of ``batch_size``.
    AID-FP's fixed-point step is ``fp_lr``, stocBiO's Neumann step
    ``neumann_eta``. The single-loop FMBO / FdeHBO use recursive-momentum SGD
    with the ``single_*`` step sizes and momentum weight ``single_eta``, v projected on
    the ball of ``radius``. Theorem 1 needs radius ≥ ‖v*‖ (∇yy g·v* = ∇y f): at λ = 0,
    p = 0.1, AID-CG(100) gives ‖v‖ = 33-34 at y = 0 and 19-20 at y ≈ y*(λ) (seeds 0-2;
    CG(1000) agrees), hence 40. The earlier 10 was below ‖v*‖ but v, which converges
    slowly here (‖v_t‖ = 4.6 / 9.8 at t = 100 / 500), reached it only after ~520 steps,
    so 500-step runs are the same with either (bench/RESULTS-experiments.md §1).
    """

    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 2000
    corruption: float = 0.4
    reg: float = 1e-3
    methods: Sequence[str] = METHODS
    steps: int = 5000
    baseline_steps: int = 300
    seconds: float | None = 10.0
    eval_every: int = 10
    eval_seconds: float | None = 0.5
    inner_steps: int = 10
    lr_y: float = 0.5
    lr_x: float = 0.1
    solver_steps: int = 10
    fp_lr: float = 0.5
    neumann_eta: float = 0.5
    batch_size: int = 500
    pzobo_mu: float = 0.01
    single_lr_x: float = 100.0
    single_lr_y: float = 0.5
    single_lr_v: float = 0.5
    single_eta: float = 0.5
    radius: float = 40.0
    seed: int = 0
    device: str = "cpu"


@dataclasses.dataclass
class HypercleanData:
    """Splits on the device; ``corrupted`` marks training samples whose label was changed."""

    train_x: torch.Tensor
    train_noisy: torch.Tensor
    train_true: torch.Tensor
    corrupted: torch.Tensor
    val: tuple
    test: tuple


def corrupt_labels(labels: torch.Tensor, p: float, classes: int, generator: torch.Generator):
    """Replace each label with probability ``p`` by a uniformly random *other* class.

    Returns ``(noisy_labels, corrupted_mask)``.
    """
    flip = torch.rand(labels.shape, generator=generator) < p
    # adding 1..classes-1 modulo classes is uniform over the other classes
    shift = torch.randint(1, classes, labels.shape, generator=generator)
    noisy = torch.where(flip, (labels + shift) % classes, labels)
    return noisy, flip


def make_data(cfg: HypercleanConfig) -> HypercleanData:
    """Load MNIST-5k, split train/val/test, corrupt the training labels (seeded)."""
    feats, labels = datasets.load_mnist5k(seed=cfg.seed)
    (trx, trl), val, test = datasets.split(feats, labels, [cfg.n_train, cfg.n_val, cfg.n_test])
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    noisy, corrupted = corrupt_labels(trl, cfg.corruption, 10, generator)
    dev = torch.device(cfg.device)
    return HypercleanData(trx.to(dev), noisy.to(dev), trl.to(dev), corrupted.to(dev),
                          tuple(t.to(dev) for t in val), tuple(t.to(dev) for t in test))


def _logits(y: dict, feats: torch.Tensor) -> torch.Tensor:
    return feats @ y["weight"].T + y["bias"]


def _sq_norm(y: dict) -> torch.Tensor:
    return sum((v * v).sum() for v in y.values())


def inner_loss(reg: float) -> Callable:
    """g(x, y, (idx, a, b)) = mean σ(λ_idx) CE + reg ‖y‖²   (003 app. A.2 / 001 eq. (14))."""

    def g(x, y, batch):
        idx, feats, labels = batch
        ce = F.cross_entropy(_logits(y, feats), labels, reduction="none")
        return (torch.sigmoid(x["lam"][idx]) * ce).mean() + reg * _sq_norm(y)

    return g


def outer_loss(x, y, batch) -> torch.Tensor:
    """f(x, y, (a, b)) = validation cross-entropy (λ enters only through y*)."""
    feats, labels = batch
    return F.cross_entropy(_logits(y, feats), labels)


def plain_loss(reg: float) -> Callable:
    """Unweighted training loss mean CE + reg ‖y‖² for the single-level baselines."""

    def loss(x, y, batch):
        _, feats, labels = batch
        return F.cross_entropy(_logits(y, feats), labels) + reg * _sq_norm(y)

    return loss


def evaluate(data: HypercleanData) -> Callable[[dict, dict], dict]:
    """Metrics: validation / test loss and accuracy, AUC of σ(λ) for clean vs corrupted.

    The AUC is None when λ is constant (the baselines learn no weights).
    """

    def metrics_of(x: dict, y: dict) -> dict:
        out = {}
        for name, (feats, labels) in (("val", data.val), ("test", data.test)):
            logits = _logits(y, feats)
            out[f"{name}_loss"] = metrics.cross_entropy(logits, labels)
            out[f"{name}_acc"] = metrics.accuracy(logits, labels)
        lam = x["lam"]
        out["auc"] = (metrics.auc(lam, ~data.corrupted)
                      if float(lam.max() - lam.min()) > 0 else None)
        return out

    return metrics_of


def hyper(cfg: HypercleanConfig) -> Hyper:
    """The methods' step sizes from the config."""
    return Hyper(lr_x=cfg.lr_x, lr_y=cfg.lr_y, inner_steps=cfg.inner_steps,
                 solver_steps=cfg.solver_steps, outer="adam", fp_lr=cfg.fp_lr,
                 neumann_eta=cfg.neumann_eta, mu=cfg.pzobo_mu, seed=cfg.seed,
                 device=cfg.device, single_lr_x=cfg.single_lr_x, single_lr_y=cfg.single_lr_y,
                 single_lr_v=cfg.single_lr_v, single_eta=cfg.single_eta, radius=cfg.radius)


def make_methods(cfg: HypercleanConfig, data: HypercleanData) -> list[Method]:
    """The configured methods with their batches (full batch or seeded minibatches)."""
    check_names(cfg.methods, METHODS)
    problem = tb.Bilevel(outer=outer_loss, inner=inner_loss(cfg.reg))
    train = (data.train_x, data.train_noisy)
    hp = hyper(cfg)
    out = []
    for k, key in enumerate(cfg.methods):
        if key in ("noisy", "clean"):
            algo = frozen_outer(plain_loss(cfg.reg), lr=cfg.lr_y, momentum=0.9)
            inner = full_batch(*train, with_index=True) if key == "noisy" else _clean_subset(data)
            outer = None
        else:
            algo = build(key, problem, hp)
            if key in STOCHASTIC:
                inner = minibatches(*train, batch_size=min(cfg.batch_size, cfg.n_train),
                                    seed=cfg.seed + 100 + k, with_index=True)
                outer = minibatches(*data.val, batch_size=min(cfg.batch_size, cfg.n_val),
                                    seed=cfg.seed + 200 + k)
            else:
                inner, outer = full_batch(*train, with_index=True), data.val
        steps = min(cfg.steps, cfg.baseline_steps) if key in ("noisy", "clean") else cfg.steps
        out.append(Method(LABELS[key], algo, inner, outer, steps, cfg.eval_every,
                          cfg.eval_seconds))
    return out


def _clean_subset(data: HypercleanData) -> tuple:
    keep = (~data.corrupted).nonzero().flatten()
    return (keep, data.train_x[keep], data.train_noisy[keep])


def initial_point(cfg: HypercleanConfig, data: HypercleanData) -> tuple[dict, dict]:
    """λ = 0 (every weight 1/2) and a zero classifier."""
    dev = torch.device(cfg.device)
    x0 = {"lam": torch.zeros(cfg.n_train, device=dev)}
    y0 = {"weight": torch.zeros(10, data.train_x.shape[1], device=dev),
          "bias": torch.zeros(10, device=dev)}
    return x0, y0


def run(cfg: HypercleanConfig, progress=None) -> list[dict]:
    """Run every configured method; rows of (method, step, seconds, metrics)."""
    data = make_data(cfg)
    x0, y0 = initial_point(cfg, data)
    methods = make_methods(cfg, data)
    record = run_methods(methods, x0, y0, evaluate(data), cfg.seconds, progress, cfg.device)
    for row in record:
        row["corruption"] = cfg.corruption
    return record
