"""Variance of PZOBO hypergradient estimates, plain vs antithetic directions, at equal
numbers of directions Q and of inner paths, against the ITD hypergradient of the same
inner path (the estimator's expectation, PZOBO paper eq. (4)-(5)).

    python bench/pzobo_variance.py [--trials 200]

Problem: two-layer hyper-representation (x = embedding weights, y = ridge head) on
synthetic data (PZOBO paper 4.1 generator), float64.
"""
from __future__ import annotations

import argparse

import torch

import torchbilevel as tb


def problem(seed=0, n=200, p=20, d=10):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    H = torch.randn(p, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    t = X @ H @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    tr, va = slice(0, n // 2), slice(n // 2, n)
    emb = lambda x, Xs: torch.tanh(Xs @ x["H"])

    def inner(x, y, b):
        r = emb(x, X[tr]) @ y["w"] - t[tr]
        return 0.5 * (r @ r) / (n // 2) + 0.05 * y["w"] @ y["w"]

    def outer(x, y, b):
        r = emb(x, X[va]) @ y["w"] - t[va]
        return 0.5 * (r @ r) / (n // 2)

    x = {"H": 0.3 * torch.randn(p, d, generator=g, dtype=torch.float64)}
    y = {"w": torch.zeros(d, dtype=torch.float64)}
    return tb.Bilevel(outer, inner), x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    prob, x, y = problem()
    ref = tb.hypergrad(prob, tb.itd(a.steps, 0.5))(x, y, None, None)["H"]
    print(f"{'mu':>6s} {'estimator':30s} {'paths':>5s} {'MSE vs ITD':>12s} {'rel. RMSE':>10s}")
    for mu in (1e-4, 0.3):
        for label, anti, dirs in (("plain Q=8", False, 8), ("antithetic Q=8 (same directions)", True, 8),
                                  ("antithetic Q=4 (same paths)", True, 4)):
            gen = torch.Generator().manual_seed(1)
            hg = tb.hypergrad(prob, tb.pzobo(a.steps, 0.5, dirs, mu, antithetic=anti, generator=gen))
            errs = torch.stack([(hg(x, y, None, None)["H"] - ref).pow(2).sum() for _ in range(a.trials)])
            mse = errs.mean().item()
            paths = 2 * dirs if anti else dirs + 1
            print(f"{mu:6.0e} {label:30s} {paths:5d} {mse:12.4e} {mse ** 0.5 / ref.norm().item():10.3f}")


if __name__ == "__main__":
    main()
