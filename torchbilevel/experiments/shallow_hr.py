"""Shallow hyper-representation on synthetic data (Hessian-free paper 000, §4.1, eq. (8)).

Outer variable: an embedding T(·; λ), linear (λ = H, p×d) or a two-layer net
(λ = W1, W2). Inner variable: a ridge regressor w on the embedded features:

    outer  f(λ, w) = 1/(2 n1) ‖T(X1; λ) w − Y1‖²                       (000 eq. (8))
    inner  g(λ, w) = 1/(2 n2) ‖T(X2; λ) w − Y2‖² + γ/2 ‖w‖²             (000 eq. (8))

Data: H_true ~ N(0,1) (p×d), w_true ~ N(0,1) (d), X ~ N(0,1) (n×p),
Y = X H_true w_true + 0.1·noise; responses are divided by √(p·d) (before the
noise) so they have unit variance and the 0.1 noise level means 10 %.

Because w*(λ) is a ridge solve, Φ(λ) = f(λ, w*(λ)) and its exact gradient
are computed by differentiating through ``torch.linalg.solve``; every
method's hypergradient at its current iterate is compared with it. The
zeroth-order baseline (HOZOG-style, :mod:`.hozog`) smooths Φ itself.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

import torchbilevel as tb

from .hozog import hozog, zeroth_order_hypergrad
from .methods import LABELS as METHOD_LABELS
from .methods import Hyper, build, check_names, estimator
from .runner import Method, run_method

__all__ = ["ShallowHRConfig", "LABELS", "METHODS", "make_data", "embed", "inner_loss",
           "outer_loss", "ridge_solution", "exact_hypergradient", "initial_point", "run"]

LABELS = {**{k: METHOD_LABELS[k] for k in
              ("aid_fp", "aid_cg", "itd", "pzobo", "pzobo_sphere", "first_order")},
          "hozog": "HOZOG (full ZO)"}
METHODS = tuple(LABELS)


@dataclasses.dataclass
class ShallowHRConfig:
    """Settings of one shallow hyper-representation run.

    ``embedding``: "linear" (λ = H) or "two_layer" (λ = W1 (p×hidden), W2
    (hidden×d), tanh between). All methods: warm-started inner GD
    (``inner_steps`` of ``lr_y``) then an outer SGD step: ``lr_x`` for AID and
    ITD, ``pzobo_lr_x`` for PZOBO and ``hozog_lr_x`` for HOZOG (the
    zeroth-order estimates are far noisier and diverge at ``lr_x``), with
    ``directions`` Gaussian directions of radius ``mu`` / ``hozog_mu``.
    ``pzobo_sphere`` (PZOBO with the authors' released direction rule: per-tensor unit
    directions, no dimension factor, so its mean is ∇x f + (1/p_k)·implicit term on a
    tensor of p_k entries) and
    ``first_order`` (∇x f alone) step with ``pzobo_sphere_lr_x`` / ``first_order_lr_x``
    (default ``lr_x``'s 1.0: their estimates have the size of ∇x f, not of the
    Gaussian estimator's √p-inflated noise).
    Full batch (n samples per split).
    """

    embedding: str = "linear"
    p: int = 64
    d: int = 128
    n: int = 500
    hidden: int = 64
    gamma: float = 0.1
    noise: float = 0.1
    methods: Sequence[str] = METHODS
    steps: int = 2000
    seconds: float | None = 20.0
    eval_every: int = 10
    eval_seconds: float | None = 0.5
    inner_steps: int = 10
    solver_steps: int = 10
    lr_y: float = 0.3
    lr_x: float = 1.0
    pzobo_lr_x: float = 0.01
    pzobo_sphere_lr_x: float = 1.0
    first_order_lr_x: float = 1.0
    directions: int = 1
    mu: float = 0.01
    hozog_lr_x: float = 0.01
    hozog_mu: float = 0.01
    hypergradient_error: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float64


def make_data(cfg: ShallowHRConfig) -> dict:
    """Synthetic train (inner), validation (outer) and test splits of n samples each."""
    gen = torch.Generator().manual_seed(cfg.seed)
    h_true = torch.randn(cfg.p, cfg.d, generator=gen, dtype=cfg.dtype)
    w_true = torch.randn(cfg.d, generator=gen, dtype=cfg.dtype)
    scale = math.sqrt(cfg.p * cfg.d)

    def sample():
        feats = torch.randn(cfg.n, cfg.p, generator=gen, dtype=cfg.dtype)
        noise = torch.randn(cfg.n, generator=gen, dtype=cfg.dtype)
        target = feats @ h_true @ w_true / scale + cfg.noise * noise
        return feats.to(cfg.device), target.to(cfg.device)

    return {"train": sample(), "val": sample(), "test": sample()}


def embed(x: dict, feats: torch.Tensor) -> torch.Tensor:
    """T(X; λ): X H for the linear embedding, tanh(X W1) W2 for the two-layer one.

    tanh rather than ReLU: ReLU features share a positive mean, which put the
    inner Hessian's top eigenvalue near 20 at initialisation and made the
    inner gradient steps (lr_y = 0.3) diverge at once.
    """
    if "H" in x:
        return feats @ x["H"]
    return torch.tanh(feats @ x["W1"]) @ x["W2"]


def inner_loss(gamma: float) -> Callable:
    """g(λ, w) = 1/(2n) ‖T(X;λ) w − Y‖² + γ/2 ‖w‖²   (000 eq. (8))."""

    def g(x, y, batch):
        feats, target = batch
        resid = embed(x, feats) @ y["w"] - target
        return 0.5 * (resid * resid).mean() + 0.5 * gamma * (y["w"] * y["w"]).sum()

    return g


def outer_loss(x, y, batch) -> torch.Tensor:
    """f(λ, w) = 1/(2n) ‖T(X;λ) w − Y‖²   (000 eq. (8))."""
    feats, target = batch
    resid = embed(x, feats) @ y["w"] - target
    return 0.5 * (resid * resid).mean()


def ridge_solution(x: dict, batch, gamma: float) -> torch.Tensor:
    """w*(λ) = (AᵀA/n + γI)⁻¹ AᵀY/n with A = T(X; λ): the inner problem's minimiser."""
    feats, target = batch
    emb = embed(x, feats)
    n, d = emb.shape
    gram = emb.T @ emb / n + gamma * torch.eye(d, dtype=emb.dtype, device=emb.device)
    return torch.linalg.solve(gram, emb.T @ target / n)


def exact_hypergradient(x: dict, data: dict, gamma: float) -> tuple[float, dict]:
    """Φ(λ) = f(λ, w*(λ)) and ∇Φ(λ), by autograd through the ridge solve."""
    with torch.enable_grad():
        xx = {k: v.detach().requires_grad_(True) for k, v in x.items()}
        phi = outer_loss(xx, {"w": ridge_solution(xx, data["train"], gamma)}, data["val"])
        grads = torch.autograd.grad(phi, list(xx.values()))
    return phi.item(), dict(zip(xx, grads))


def initial_point(cfg: ShallowHRConfig) -> tuple[dict, dict]:
    """Random embedding (N(0, 1/fan_in) entries, seeded) and a zero regressor."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=cfg.dtype) / math.sqrt(shape[0])).to(cfg.device)

    if cfg.embedding == "linear":
        x0 = {"H": rand(cfg.p, cfg.d)}
    elif cfg.embedding == "two_layer":
        x0 = {"W1": rand(cfg.p, cfg.hidden), "W2": rand(cfg.hidden, cfg.d)}
    else:
        raise ValueError(f"embedding must be 'linear' or 'two_layer', got {cfg.embedding!r}")
    return x0, {"w": torch.zeros(cfg.d, dtype=cfg.dtype, device=cfg.device)}


def _rel_error(estimate: dict, exact: dict) -> float:
    num = sum(((estimate[k] - exact[k]) ** 2).sum() for k in exact)
    den = sum((exact[k] ** 2).sum() for k in exact)
    return math.sqrt(float(num) / max(float(den), 1e-300))


def _probe(key: str, cfg: ShallowHRConfig, problem, hp: Hyper, data: dict) -> Callable:
    """The method's own hypergradient estimate at (λ, w), for the error metric."""
    if key == "hozog":
        gen = torch.Generator().manual_seed(cfg.seed + 11)
        return lambda x, y: zeroth_order_hypergrad(
            problem.outer, problem.inner, x, y, data["train"], data["val"], cfg.inner_steps,
            cfg.lr_y, cfg.directions, cfg.hozog_mu, gen)[0]
    hg = tb.hypergrad(problem, estimator(key, dataclasses.replace(hp, seed=cfg.seed + 11)))
    return lambda x, y: hg(x, y, data["train"], data["val"])


def run(cfg: ShallowHRConfig, progress=None) -> list[dict]:
    """Run every configured method; rows of (method, step, seconds, metrics).

    Metrics: ``val_loss`` f(λ, w) at the current iterates, ``phi`` = Φ(λ)
    (exact, at w*(λ)), ``test_loss`` of (λ, w*(λ)) on fresh data,
    ``grad_norm`` ‖∇Φ(λ)‖ and ``hypergrad_error`` = relative error of the
    method's own estimate at its current iterates against ∇Φ(λ).
    """
    check_names(cfg.methods, METHODS)
    data = make_data(cfg)
    problem = tb.Bilevel(outer=outer_loss, inner=inner_loss(cfg.gamma))
    hp = Hyper(lr_x=cfg.lr_x, lr_y=cfg.lr_y, inner_steps=cfg.inner_steps,
               solver_steps=cfg.solver_steps, outer="sgd", mu=cfg.mu,
               directions=cfg.directions, seed=cfg.seed, device=cfg.device)
    x0, y0 = initial_point(cfg)
    record: list[dict] = []
    for key in cfg.methods:
        if key == "hozog":
            algo = hozog(outer_loss, inner_loss(cfg.gamma), lr_x=cfg.hozog_lr_x,
                         inner_steps=cfg.inner_steps, lr_y=cfg.lr_y,
                         directions=cfg.directions, mu=cfg.hozog_mu, seed=cfg.seed + 5)
        elif key in ("pzobo", "pzobo_sphere", "first_order"):
            algo = build(key, problem, dataclasses.replace(hp, lr_x=getattr(cfg, f"{key}_lr_x")))
        else:
            algo = build(key, problem, hp)
        probe = _probe(key, cfg, problem, hp, data) if cfg.hypergradient_error else None

        def evaluate(x, y, probe=probe):
            phi, grad = exact_hypergradient(x, data, cfg.gamma)
            w_star = ridge_solution(x, data["train"], cfg.gamma)
            out = {"val_loss": outer_loss(x, y, data["val"]).item(), "phi": phi,
                   "test_loss": outer_loss(x, {"w": w_star}, data["test"]).item(),
                   "grad_norm": math.sqrt(sum(float((g * g).sum()) for g in grad.values()))}
            if probe is not None:
                with torch.enable_grad():
                    out["hypergrad_error"] = _rel_error(probe(x, y), grad)
            return out

        method = Method(LABELS[key], algo, data["train"], data["val"], cfg.steps,
                        cfg.eval_every, cfg.eval_seconds)
        record += run_method(method, x0, y0, evaluate, cfg.seconds, progress, cfg.device)
    for row in record:
        row["embedding"] = cfg.embedding
    return record
