"""Per-feature weight decay for logistic regression (stocBiO paper 003, app. A.2, 20 Newsgroup).

The outer variable λ (one entry per input feature) sets an L2 penalty
exp(λ_j) on feature j's weights of a multinomial logistic regression
(W, b) trained on the training split; the outer loss is the validation
cross-entropy:

    inner  g(λ, W) = mean_train CE(W a + b, c) + 1/(c·p) Σ_i Σ_j exp(λ_j) W_ij²   (003 app. A.2)
    outer  f(λ, W) = mean_val CE(W a + b, c)                                      (003 app. A.2)

20 Newsgroup is not available offline; scikit-learn's digits (64 features,
10 classes) or breast_cancer (30 features, 2 classes) stand in for it.
The baseline keeps λ = 0 (every penalty 1) and only trains W.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

import torchbilevel as tb

from .. import datasets
from . import metrics
from .baselines import frozen_outer
from .methods import LABELS as METHOD_LABELS
from .methods import STOCHASTIC, Hyper, build, check_names
from .runner import Method, run_methods
from .streams import minibatches

__all__ = ["WeightDecayConfig", "LABELS", "METHODS", "make_data", "inner_loss", "outer_loss",
           "initial_point", "evaluate", "run"]

LABELS = {**{k: METHOD_LABELS[k] for k in ("aid_cg", "aid_fp", "itd", "stocbio", "pzobo",
                                           "fmbo", "fdehbo")},
          "fixed": "fixed decay (λ=0)"}
METHODS = tuple(LABELS)


@dataclasses.dataclass
class WeightDecayConfig:
    """Settings of one weight-decay run (``dataset``: "digits" or "breast_cancer").

    Splits are fractions of the shuffled data; features are standardised with
    training statistics. Double-loop methods: ``inner_steps`` GD steps of
    ``lr_y`` then an outer ``outer`` step of ``lr_x`` (the paper uses SGD);
    stochastic methods draw minibatches of ``batch_size``.
    """

    dataset: str = "digits"
    train_fraction: float = 0.4
    val_fraction: float = 0.3
    methods: Sequence[str] = METHODS
    steps: int = 2000
    seconds: float | None = 15.0
    eval_every: int = 10
    eval_seconds: float | None = 0.5
    inner_steps: int = 10
    solver_steps: int = 10
    lr_y: float = 0.5
    lr_x: float = 10.0
    outer: str = "sgd"
    mu: float = 0.01
    directions: int = 1
    batch_size: int = 128
    single_lr_x: float = 10.0
    single_lr_y: float = 0.5
    single_lr_v: float = 0.5
    single_eta: float = 0.5
    radius: float = 100.0
    seed: int = 0
    device: str = "cpu"


def make_data(cfg: WeightDecayConfig) -> dict:
    """Train / validation / test splits, standardised with training mean and std."""
    feats, labels = datasets.load(cfg.dataset, seed=cfg.seed)
    n = len(labels)
    n_train, n_val = int(cfg.train_fraction * n), int(cfg.val_fraction * n)
    parts = datasets.split(feats, labels, [n_train, n_val, n - n_train - n_val])
    mean, std = parts[0][0].mean(0), parts[0][0].std(0).clamp_min(1e-6)
    dev = torch.device(cfg.device)
    return {name: (((a - mean) / std).to(dev), b.to(dev))
            for name, (a, b) in zip(("train", "val", "test"), parts)}


def _logits(y, feats):
    return feats @ y["weight"].T + y["bias"]


def inner_loss(x, y, batch) -> torch.Tensor:
    """g = CE + 1/(c p) Σ_ij exp(λ_j) W_ij²   (003 app. A.2, 20 Newsgroup objective)."""
    feats, labels = batch
    weight = y["weight"]
    penalty = (torch.exp(x["lam"]) * weight * weight).sum() / weight.numel()
    return F.cross_entropy(_logits(y, feats), labels) + penalty


def outer_loss(x, y, batch) -> torch.Tensor:
    """f = validation cross-entropy."""
    feats, labels = batch
    return F.cross_entropy(_logits(y, feats), labels)


def initial_point(cfg: WeightDecayConfig, data: dict) -> tuple[dict, dict]:
    """λ = 0 and a zero classifier."""
    p = data["train"][0].shape[1]
    classes = int(max(int(t[1].max()) for t in data.values())) + 1
    dev = torch.device(cfg.device)
    return ({"lam": torch.zeros(p, device=dev)},
            {"weight": torch.zeros(classes, p, device=dev), "bias": torch.zeros(classes, device=dev)})


def evaluate(data: dict):
    """Metrics: validation and test loss / accuracy, mean λ."""

    def metrics_of(x, y):
        out = {}
        for name in ("val", "test"):
            feats, labels = data[name]
            logits = _logits(y, feats)
            out[f"{name}_loss"] = metrics.cross_entropy(logits, labels)
            out[f"{name}_acc"] = metrics.accuracy(logits, labels)
        out["mean_lam"] = x["lam"].mean().item()
        return out

    return metrics_of


def run(cfg: WeightDecayConfig, progress=None) -> list[dict]:
    """Run every configured method from λ = 0; rows of (method, step, seconds, metrics)."""
    check_names(cfg.methods, METHODS)
    data = make_data(cfg)
    x0, y0 = initial_point(cfg, data)
    problem = tb.Bilevel(outer=outer_loss, inner=inner_loss)
    hp = Hyper(lr_x=cfg.lr_x, lr_y=cfg.lr_y, inner_steps=cfg.inner_steps,
               solver_steps=cfg.solver_steps, outer=cfg.outer, mu=cfg.mu,
               directions=cfg.directions, seed=cfg.seed, device=cfg.device,
               single_lr_x=cfg.single_lr_x, single_lr_y=cfg.single_lr_y,
               single_lr_v=cfg.single_lr_v, single_eta=cfg.single_eta, radius=cfg.radius)
    methods = []
    for k, key in enumerate(cfg.methods):
        if key == "fixed":
            algo, inner, outer = frozen_outer(inner_loss, lr=cfg.lr_y, momentum=0.9), data["train"], None
        else:
            algo = build(key, problem, hp)
            if key in STOCHASTIC:
                n_train, n_val = len(data["train"][1]), len(data["val"][1])
                inner = minibatches(*data["train"], batch_size=min(cfg.batch_size, n_train),
                                    seed=cfg.seed + 100 + k)
                outer = minibatches(*data["val"], batch_size=min(cfg.batch_size, n_val),
                                    seed=cfg.seed + 200 + k)
            else:
                inner, outer = data["train"], data["val"]
        methods.append(Method(LABELS[key], algo, inner, outer, cfg.steps, cfg.eval_every,
                              cfg.eval_seconds))
    record = run_methods(methods, x0, y0, evaluate(data), cfg.seconds, progress, cfg.device)
    for row in record:
        row["dataset"] = cfg.dataset
    return record
