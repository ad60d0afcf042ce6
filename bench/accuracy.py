"""Hypergradient error of every estimator against an independent reference, float64.

    python bench/accuracy.py

1. Quadratic bilevel problem (ridge inner problem): ∇Φ in closed form.
2. Logistic regression with per-feature weight decay (inner) and validation loss
   (outer) on scikit-learn's breast_cancer: dense IFT reference
   ∇x f − ∇xy g [∇yy g]⁻¹ ∇y f from full Hessians at a Newton-solved y*.
Each estimator is evaluated at the exact y* (AID, stocBiO) or from it (ITD, PZOBO
run their own steps), so the error is the estimator's, not the inner solver's.
"""
from __future__ import annotations

import torch
from torch.func import grad, hessian, jacrev

import torchbilevel as tb

DT = torch.float64


def quadratic(seed=0, p=20, d=30):
    g_ = torch.Generator().manual_seed(seed)
    A, B = torch.randn(50, d, generator=g_, dtype=DT), torch.randn(50, p, generator=g_, dtype=DT)
    b, C, c = torch.randn(50, generator=g_, dtype=DT), torch.randn(40, d, generator=g_, dtype=DT), \
        torch.randn(40, generator=g_, dtype=DT)
    lam = 0.5

    def g(x, y, _):
        r = A @ y["w"] - B @ x["h"] - b
        return 0.5 * r @ r / 50 + 0.5 * lam * y["w"] @ y["w"]

    def f(x, y, _):
        r = C @ y["w"] - c
        return 0.5 * r @ r / 40 + 0.05 * x["h"] @ x["h"]

    ystar = lambda h: torch.linalg.solve(A.T @ A / 50 + lam * torch.eye(d, dtype=DT), A.T @ (B @ h + b) / 50)
    x = {"h": torch.randn(p, generator=g_, dtype=DT)}
    exact = grad(lambda h: f({"h": h}, {"w": ystar(h)}, None))(x["h"])
    L = torch.linalg.eigvalsh(A.T @ A / 50).max().item() + lam
    return tb.Bilevel(f, g), x, {"w": ystar(x["h"])}, {"h": exact}, L


def logistic_weight_decay():
    from sklearn.datasets import load_breast_cancer
    X, t = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=DT)
    X = (X - X.mean(0)) / X.std(0)
    t = torch.tensor(t, dtype=DT)
    tr, va = slice(0, 300), slice(300, None)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def g(x, y, _):
        return bce(X[tr] @ y["w"], t[tr]) + 0.5 * (torch.exp(x["lam"]) * y["w"] ** 2).sum()

    def f(x, y, _):
        return bce(X[va] @ y["w"], t[va])

    x = {"lam": torch.full((30,), -2.0, dtype=DT)}
    w = torch.zeros(30, dtype=DT)
    for _ in range(50):    # Newton on the strongly convex inner problem
        gw = grad(lambda w: g(x, {"w": w}, None))(w)
        w = w - torch.linalg.solve(hessian(lambda w: g(x, {"w": w}, None))(w), gw)
    gy = lambda lam, w: grad(lambda w: g({"lam": lam}, {"w": w}, None))(w)
    Hyy = hessian(lambda w: g(x, {"w": w}, None))(w)
    Hxy = jacrev(gy, argnums=0)(x["lam"], w)                      # ∂(∇y g)/∂x, (d, p)
    fx, fy = grad(f, argnums=(0, 1))(x, {"w": w}, None)
    exact = fx["lam"] - Hxy.T @ torch.linalg.solve(Hyy, fy["w"])  # IFT, DESIGN.md
    L = torch.linalg.eigvalsh(Hyy).max().item()
    return tb.Bilevel(f, g), x, {"w": w}, {"lam": exact}, L


def estimators(L):
    return {
        "AID-CG(20)": tb.aid(tb.cg(20)),
        "AID-CG(5)": tb.aid(tb.cg(5)),
        "AID-FP(200, 1/L)": tb.aid(tb.fixed_point(200, 1.0 / L)),
        "stocBiO(Q=200, η=1/L)": tb.stocbio(200, 1.0 / L),
        "ITD(200, 1/L)": tb.itd(200, 1.0 / L),
        "PZOBO(N=200, Q=2000, μ=1e-5)": tb.pzobo(200, 1.0 / L, 2000, 1e-5,
                                                  generator=torch.Generator().manual_seed(0), vectorize=True),
    }


def main():
    print(f"{'problem':28s} {'estimator':30s} {'rel. error':>11s}")
    for pname, make in (("quadratic (closed form)", quadratic),
                        ("logistic WD (dense IFT)", logistic_weight_decay)):
        prob, x, y, exact, L = make()
        for ename, est in estimators(L).items():
            dx = tb.hypergrad(prob, est)(x, y, None, None)
            err = tb.tree.norm(tb.tree.sub(dx, exact)) / tb.tree.norm(exact)
            print(f"{pname:28s} {ename:30s} {err.item():11.2e}")


if __name__ == "__main__":
    main()
