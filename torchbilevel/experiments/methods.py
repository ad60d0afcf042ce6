"""The library's methods by short name, configured the same way in every experiment.

``build(name, problem, hp)`` returns an ``init``/``step`` algorithm; ``STOCHASTIC``
names the methods that are fed minibatch streams (the others get full batches).
"""
from __future__ import annotations

import dataclasses

import torch

import torchbilevel as tb

__all__ = ["LABELS", "STOCHASTIC", "Hyper", "build", "estimator", "check_names"]

LABELS = {
    "aid_cg": "AID-CG", "aid_fp": "AID-FP", "itd": "ITD", "stocbio": "stocBiO",
    "pzobo": "PZOBO", "pzobo_s": "PZOBO-S", "fmbo": "FMBO", "fdehbo": "FdeHBO",
    "pzobo_sphere": "PZOBO (sphere)", "pzobo_s_sphere": "PZOBO-S (sphere)",
    "first_order": "first-order",
}
STOCHASTIC = frozenset({"stocbio", "pzobo_s", "pzobo_s_sphere", "fmbo", "fdehbo"})


@dataclasses.dataclass
class Hyper:
    """Step sizes and loop lengths shared by the methods of one experiment.

    Double-loop methods: ``inner_steps`` warm-started GD steps of size ``lr_y``,
    then the estimator (``solver_steps`` CG / fixed-point / ITD / Neumann
    steps; PZOBO uses ``inner_steps`` and ``directions`` Gaussian directions of
    radius ``mu``; the ``*_sphere`` variants draw the authors' released per-tensor unit
    directions instead, ``first_order`` uses ∇x f alone), then one ``outer`` ("sgd" or
    "adam") step of size ``lr_x``.
    Single-loop FMBO / FdeHBO use the ``single_*`` values.
    """

    lr_x: float
    lr_y: float
    inner_steps: int = 10
    solver_steps: int = 10
    outer: str = "adam"
    fp_lr: float | None = None
    neumann_eta: float | None = None
    mu: float = 0.01
    directions: int = 1
    seed: int = 0
    device: str = "cpu"
    single_lr_x: float = 0.1
    single_lr_y: float = 0.1
    single_lr_v: float = 0.1
    single_eta: float = 0.5
    radius: float = 10.0


def check_names(names, allowed) -> None:
    """Raise ValueError naming the unknown method names."""
    unknown = [m for m in names if m not in allowed]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(allowed)}")


def estimator(name: str, hp: Hyper):
    """The hypergradient estimator config of a double-loop method."""
    if name == "aid_cg":
        return tb.aid(tb.cg(steps=hp.solver_steps))
    if name == "aid_fp":
        return tb.aid(tb.fixed_point(steps=hp.solver_steps, lr=hp.fp_lr or hp.lr_y))
    if name == "itd":
        return tb.itd(steps=hp.solver_steps, lr=hp.lr_y)
    if name == "stocbio":
        return tb.stocbio(neumann_steps=hp.solver_steps, eta=hp.neumann_eta or hp.lr_y)
    if name in ("pzobo", "pzobo_s", "pzobo_sphere", "pzobo_s_sphere"):
        # "gaussian": eq. (4)-(5) of the paper; "sphere": the authors' released code
        # (per-tensor unit directions, no dimension factor: mean ∇x f + (1/p_k)·implicit term
        # on each tensor of p_k entries)
        generator = torch.Generator(device=hp.device).manual_seed(hp.seed + 7)
        return tb.pzobo(steps=hp.inner_steps, lr=hp.lr_y, directions=hp.directions, mu=hp.mu,
                        generator=generator,
                        distribution="sphere" if name.endswith("_sphere") else "gaussian")
    if name == "first_order":
        return tb.first_order()
    raise ValueError(f"{name!r} is not a double-loop method")


def build(name: str, problem, hp: Hyper):
    """The algorithm (``init`` / ``step``) of method ``name`` on ``problem``."""
    if name in ("fmbo", "fdehbo"):
        make = tb.fmbo if name == "fmbo" else tb.fdehbo
        return make(problem, lr_x=hp.single_lr_x, lr_y=hp.single_lr_y, lr_v=hp.single_lr_v,
                    eta_x=hp.single_eta, eta_y=hp.single_eta, eta_v=hp.single_eta,
                    radius=hp.radius)
    return tb.double_loop(problem, estimator(name, hp), lr_x=hp.lr_x,
                          inner_steps=hp.inner_steps, lr_y=hp.lr_y, outer=hp.outer)
