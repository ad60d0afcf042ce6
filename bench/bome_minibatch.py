"""BOME with minibatches against full batches (issue 19): the final and best true
‖∇Φ‖²/‖∇Φ(x_0)‖² after 1500 steps on the finite-sum quadratic of
torchbilevel.experiments.compare (n = 512, p = d = 10), its coupling B scaled by ``kappa``
and the per-sample part of B by ``noise``; minibatches of 64 (seeded) or the full sum.

    OMP_NUM_THREADS=1 python bench/bome_minibatch.py --kappa 1 --noise 1 --lr 0.03,0.1,0.3,1 --ratio 5
"""
import argparse
import math

import torch

import torchbilevel as tb

DT = torch.float64


def quadratic(kappa=1.0, noise=1.0, n=512, p=10, d=10, rho=0.1, seed=0):
    """compare.finite_sum_quadratic with B = kappa·(B̄ + noise·B_i): (problem, ∇Φ)."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)
    Q = r(n, d, d)
    A = torch.eye(d, dtype=DT) + Q @ Q.transpose(1, 2) / d
    B = kappa * (r(d, p) / math.sqrt(p) + 0.5 * noise * r(n, d, p) / math.sqrt(p))
    a, C = r(d) + 0.5 * r(n, d), 2 * r(d) + r(n, d)
    g = lambda x, y, i: 0.5 * y["w"] @ A[i].mean(0) @ y["w"] - y["w"] @ B[i].mean(0) @ x["h"] - a[i].mean(0) @ y["w"]
    f = lambda x, y, i: 0.5 * ((y["w"] - C[i]) ** 2).sum(1).mean() + 0.5 * rho * x["h"] @ x["h"]
    Am, Bm, am, cm = A.mean(0), B.mean(0), a.mean(0), C.mean(0)
    M = torch.linalg.solve(Am, Bm)
    return tb.Bilevel(f, g), lambda x: rho * x + M.T @ (torch.linalg.solve(Am, Bm @ x + am) - cm)


def stream(n, size, seed):
    """Seeded minibatches of ``size`` indices out of ``n``, drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(n, (size,), generator=gen)


def run(make, kappa, noise, full, steps=1500, n=512):
    """(best, final) ratio of ‖∇Φ‖² over the run (checked every 25 steps), or 'diverged'."""
    prob, grad_phi = quadratic(kappa, noise, n=n)
    algo = make(prob)
    s = algo.init({"h": torch.zeros(10, dtype=DT)}, {"w": torch.zeros(10, dtype=DT)})
    g0 = grad_phi(s.x["h"]).pow(2).sum()
    ib, ob = (torch.arange(n), torch.arange(n)) if full else (stream(n, 64, 0), stream(n, 64, 1))
    ratio = lambda st: float(grad_phi(st.x["h"]).pow(2).sum() / g0)
    best = 1.0
    for t in range(steps):
        try:
            s = algo.step(s, ib, ob)
        except FloatingPointError:
            return f"diverged (step {t})"
        if t % 25 == 24:
            best = min(best, ratio(s))
    return f"best {best:.2g}, final {ratio(s):.2g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kappa", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--lr", default="0.03,0.1,0.3,1")
    ap.add_argument("--ratio", type=float, default=5.0, help="lr_y / lr_x")
    ap.add_argument("--phi", type=float, default=0.5)
    args = ap.parse_args()
    for lr in (float(v) for v in args.lr.split(",")):
        make = lambda p: tb.bome(p, lr_x=lr / args.ratio, lr_y=lr, phi=args.phi)
        print(f"kappa {args.kappa} noise {args.noise} phi {args.phi} lr {lr} lr_x {lr / args.ratio:g}: "
              f"minibatch 64: {run(make, args.kappa, args.noise, False)} | full batch: "
              f"{run(make, args.kappa, args.noise, True)}", flush=True)


if __name__ == "__main__":
    main()
