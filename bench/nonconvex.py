"""Non-convex inner problems (issue 24): every estimator and remedy on problems whose inner
Hessian is indefinite, with outcome, cost, the warnings given and the solve's report.

    python bench/nonconvex.py --out /tmp/nonconvex.json             # full run (~15 min loaded CPU)
    python bench/nonconvex.py --quick --out /tmp/nonconvex_quick.json  # < 1 minute

Parts:
  reweight  data reweighting of a small CNN (BatchNorm, dropout, ReLU) on scikit-learn's digits
            (8x8): 600 training examples, 30 % of labels wrong, a clean validation set; x = one
            weight logit per training example (outside the module), y = every weight of the
            network; g = mean_i sigmoid(x_i) CE_i + wd/2 ||y||^2, f = validation CE; y warm-started
            by SGD; one hypergradient there; AUC of dx with the wrong labels as positives (a good
            hypergradient pushes their weights down: larger dx).  Dropout on and off; several seeds.
  outer     a few outer steps (double loop: inner SGD warm start, hypergradient, Adam on x) for
            the best methods: final fraction of weight mass on wrong labels, test accuracy.
  hr        deep hyper-representation on digits: MLP, body (64->32) outer, the last two layers
            (32->16->10, 698 weights) inner; cosine of each estimator's dx with the exact
            implicit hypergradient from a dense float64 Hessian solve; the Hessian's extreme
            eigenvalues say whether that "exact" answer is defined by a convex inner problem.

Cost: ``g_calls`` / ``f_calls`` count evaluations of g and f through counting wrappers (a
product through a retained graph costs a backward, not an evaluation: ``products`` counts
those: CG / fixed-point iterations, Nyström's rank + 1, Gauss-Newton products ~3 backward
passes each); ``grad_evals`` is the measured wall time divided by the time of one gradient
of g at the same point (the unit of bench/RESULTS.md).  ``warnings``: RuntimeWarnings the
library gave for that call.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb


# ---------------------------------------------------------------- data and model

def digits(seed: int, n_train: int = 600, n_val: int = 300, noise: float = 0.3):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    X = (X - 0.3) / 0.4
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    ytr = y[tr].clone()
    wrong = torch.zeros(n_train, dtype=torch.bool)
    flip = torch.randperm(n_train, generator=gen)[: int(noise * n_train)]
    wrong[flip] = True
    ytr[flip] = (ytr[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10   # always a wrong label
    return (X[tr], ytr), (X[va], y[va]), (X[te], y[te]), wrong


class SmallCNN(nn.Module):
    """conv(1->8) BN ReLU pool, conv(8->16) BN ReLU pool, dropout, linear(64->10): 1.9k weights."""

    def __init__(self, dropout: float):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(64, 10)

    def forward(self, X):
        h = F.max_pool2d(F.relu(self.b1(self.c1(X))), 2)
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)
        return self.fc(self.drop(h.flatten(1)))


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fn(*a)


def auc(scores, positives):
    """P(score of a positive > score of a negative) (ties count 1/2)."""
    s = scores.double()
    pos, neg = s[positives], s[~positives]
    gt = (pos[:, None] > neg[None, :]).double().mean()
    eq = (pos[:, None] == neg[None, :]).double().mean()
    return float(gt + 0.5 * eq)


# ---------------------------------------------------------------- the reweighting problem

WD = 5e-4          # the inner weight decay


def reweight_problem(model):
    def logits(x, y, batch):
        return tb.nn.call(model, {}, y, batch[0])

    def wce(out, x, batch):           # convex in the outputs; the per-example weights are x
        return (torch.sigmoid(x["w"]) * F.cross_entropy(out, batch[1], reduction="none")).mean()

    def reg(x, y, batch):
        return 0.5 * WD * sum((t * t).sum() for t in y.values())

    def g(x, y, batch):
        ce = F.cross_entropy(logits(x, y, batch), batch[1], reduction="none")
        return (torch.sigmoid(x["w"]) * ce).mean() + reg(x, y, batch)

    def f(x, y, batch):
        return F.cross_entropy(logits(x, y, batch), batch[1])

    return g, f, tb.OutputLoss(logits, wce, reg)


def estimators(quick: bool):
    gen = lambda: torch.Generator().manual_seed(11)
    e = {
        "itd20": tb.itd(20, 0.1),
        "cg10": tb.aid(tb.cg(10)),
        "cg50": tb.aid(tb.cg(50)),
        "fp20": tb.aid(tb.fixed_point(20, 0.1)),
        "cg50_trunc": tb.aid(tb.cg(50, indefinite="truncate")),
        "cg50_damp0.1": tb.aid(tb.cg(50, damping=0.1)),
        "cg50_damp1": tb.aid(tb.cg(50, damping=1.0)),
        "cg50_damp10": tb.aid(tb.cg(50, damping=10.0)),
        "gn_cg10": "gn10",
        "gn_cg50": "gn50",
        "pzobo20": tb.pzobo(20, 0.1, 1, 0.01, generator=torch.Generator().manual_seed(5)),
        "pzobo20_q16": tb.pzobo(20, 0.1, 16, 0.01, generator=torch.Generator().manual_seed(5)),
        "first_order": tb.first_order(),
    }
    for r in ((10,) if quick else (10, 50)):
        for rho in ((0.1,) if quick else (0.01, 0.1, 1.0)):
            e[f"nys{r}_rho{rho}"] = ("nys", r, rho)
    if quick:
        for k in ("cg50_damp0.1", "cg50_damp10", "gn_cg50", "pzobo20_q16"):
            e.pop(k)
    return e, gen


def build(spec, gen):
    if spec == "gn10":
        return tb.aid(tb.cg(10), curvature="gauss_newton")
    if spec == "gn50":
        return tb.aid(tb.cg(50), curvature="gauss_newton")
    if type(spec) is tuple and spec[0] == "nys":
        return tb.aid(tb.nystrom(spec[1], spec[2], generator=gen()))
    return spec


def products(est, info):
    if info is None:
        return 0
    return int(info.iterations) + (1 if isinstance(est.solver, tb.solvers.Nystrom) else 0)


def run_estimator(name, est, g, f, gn, x, y, tr, va, t_grad):
    gc, fc = Counter(g), Counter(f)
    inner = Counter(gn) if getattr(est, "curvature", "") == "gauss_newton" else gc
    if inner is not gc:                                   # count the OutputLoss's evaluations as g
        inner = tb.OutputLoss(Counter(gn.outputs), gn.loss, gn.regularizer)
    problem = tb.Bilevel(outer=fc, inner=inner)
    hg = tb.hypergrad(problem, est, has_aux=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        dx, aux = hg(x, y, tr, va)
        dt = time.perf_counter() - t0
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    info = aux.solve
    row = {"method": name, "seconds": dt, "grad_evals": dt / t_grad,
           "g_calls": gc.calls + (inner.outputs.calls if inner is not gc else 0), "f_calls": fc.calls,
           "products": products(est, info) if hasattr(est, "solver") else 0,
           "warnings": len(msgs), "warning": ("indefinite" if any("curvature" in m or "residual" in m for m in msgs)
                                              else "zero" if any("exactly zero" in m for m in msgs) else "")}
    if info is not None:
        row.update(residual=float(info.residual), nonpos=int(info.nonpositive_curvature),
                   iterations=int(info.iterations), truncated=bool(info.truncated))
    return dx, row, aux


def warm_start(model, g, x, y, tr, steps, lr):
    """``steps`` SGD steps on y (full batch; BatchNorm running statistics updated as training does)."""
    y = {k: v.detach().clone() for k, v in y.items()}
    for _ in range(steps):
        yr = {k: v.requires_grad_(True) for k, v in y.items()}
        grads = torch.autograd.grad(g(x, yr, tr), list(yr.values()))
        y = {k: (v - lr * gr).detach() for (k, v), gr in zip(yr.items(), grads)}
    return y


def accuracy(model, y, data):
    drop = model.drop.training
    model.drop.eval()                           # dropout off, BatchNorm on the batch's statistics
    with torch.no_grad():
        acc = float((tb.nn.call(model, {}, y, data[0]).argmax(-1) == data[1]).float().mean())
    model.drop.train(drop)
    return acc


def time_grad_g(g, x, y, tr, reps=5):
    yr = {k: v.detach().requires_grad_(True) for k, v in y.items()}
    torch.autograd.grad(g(x, yr, tr), list(yr.values()))
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(g(x, yr, tr), list(yr.values()))
    return (time.perf_counter() - t0) / reps


def warm_reweighting(seed, dropout, warm_steps):
    """The reweighting problem of one seed: every CNN weight inner (y), one weight logit per
    training example outside the module (x = 0), y warm-started by ``warm_steps`` SGD steps."""
    torch.manual_seed(seed)
    data = digits(seed)
    model = SmallCNN(dropout).train()
    x0, y = tb.nn.split(model, inner=[n for n, _ in model.named_parameters()])
    assert not x0
    x = {"w": torch.zeros(len(data[3]))}
    g, f, gn = reweight_problem(model)
    y = warm_start(model, g, x, y, data[0], warm_steps, 0.1)
    return model, data, x, y, (g, f, gn)


def part_reweight(seeds, dropouts, quick, warm_steps, only=None):
    rows = []
    for dropout in dropouts:
        for seed in seeds:
            model, (tr, va, te, wrong), x, y, (g, f, gn) = warm_reweighting(seed, dropout, warm_steps)
            t_grad = time_grad_g(g, x, y, tr)
            specs, gen = estimators(quick)
            for name, spec in specs.items():
                if only is not None and name not in only:
                    continue
                est = build(spec, gen)
                dx, row, _ = run_estimator(name, est, g, f, gn, x, y, tr, va, t_grad)
                row.update(part="reweight", dropout=dropout, seed=seed, auc=auc(dx["w"], wrong),
                           dx_norm=float(dx["w"].norm()), t_grad=t_grad, test_acc_warm=accuracy(model, y, te))
                rows.append(row)
                print(f"  reweight p={dropout} seed={seed} {name:16s} AUC {row['auc']:.3f} "
                      f"res {row.get('residual', float('nan')):.3g} nonpos {row.get('nonpos', '-')} "
                      f"warn {row['warning'] or '-'} {row['grad_evals']:.1f} grad-evals", flush=True)
    return rows


def part_outer(seeds, methods, steps, dropout, warm_steps, inner_steps=20, lr_x=0.1):
    rows = []
    for seed in seeds:
        for name in methods:
            model, (tr, va, te, wrong), x, y, (g, f, gn) = warm_reweighting(seed, dropout, warm_steps)
            specs, gen = estimators(False)
            est = build(specs[name], gen)
            problem = tb.Bilevel(outer=f, inner=gn if getattr(est, "curvature", "") == "gauss_newton" else g)
            hg = tb.hypergrad(problem, est, has_aux=True)
            w = x["w"].clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr_x)
            nwarn, nonpos, t0 = 0, 0, time.perf_counter()
            for k in range(steps):
                y = warm_start(model, g, {"w": w.detach()}, y, tr, inner_steps, 0.1)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    dx, aux = hg({"w": w.detach()}, y, tr, va)
                nwarn += sum(issubclass(c.category, RuntimeWarning) for c in caught)
                if aux.solve is not None:
                    nonpos += int(aux.solve.nonpositive_curvature > 0)
                w.grad = dx["w"]
                opt.step()
            s = torch.sigmoid(w.detach())
            row = {"part": "outer", "method": name, "seed": seed, "dropout": dropout, "steps": steps,
                   "wrong_mass": float(s[wrong].sum() / s.sum()), "test_acc": accuracy(model, y, te),
                   "auc_final": auc(-w.detach(), wrong), "seconds": time.perf_counter() - t0,
                   "warned_steps": nwarn, "nonpos_steps": nonpos}
            rows.append(row)
            print(f"  outer seed={seed} {name:12s} wrong mass {row['wrong_mass']:.3f} test acc {row['test_acc']:.3f} "
                  f"({row['seconds']:.0f} s, warned {nwarn}/{steps})", flush=True)
    # the baseline: no reweighting at all, the same total inner steps
    for seed in seeds:
        torch.manual_seed(seed)
        tr, va, te, wrong = digits(seed)
        model = SmallCNN(dropout).train()
        _, y = tb.nn.split(model, inner=[n for n, _ in model.named_parameters()])
        x = {"w": torch.zeros(len(wrong))}
        g, _, _ = reweight_problem(model)
        y = warm_start(model, g, x, y, tr, warm_steps + steps * inner_steps, 0.1)
        rows.append({"part": "outer", "method": "no_reweighting", "seed": seed, "dropout": dropout, "steps": steps,
                     "wrong_mass": 0.3, "test_acc": accuracy(model, y, te)})
    return rows


# ---------------------------------------------------------------- deep hyper-representation

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(64, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, X):
        return self.l3(torch.relu(self.l2(torch.tanh(self.l1(X)))))


def part_hr(seeds, wds, quick, warm_steps=300, only=None):
    rows = []
    for wd in wds:
        for seed in seeds:
            torch.manual_seed(seed)
            (Xtr, ltr), (Xva, lva), _, _ = digits(seed, n_train=300, n_val=300, noise=0.0)
            tr, va = (Xtr.flatten(1).double(), ltr), (Xva.flatten(1).double(), lva)
            model = MLP().double()
            x, y = tb.nn.split(model, inner=["l2", "l3"])

            def g(x, y, b):
                return F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1]) + 0.5 * wd * sum((t * t).sum() for t in y.values())

            def f(x, y, b):
                return F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1])

            def outputs(x, y, b):
                return tb.nn.call(model, x, y, b[0])

            gn = tb.OutputLoss(outputs, lambda o, x, b: F.cross_entropy(o, b[1]),
                               lambda x, y, b: 0.5 * wd * sum((t * t).sum() for t in y.values()))
            y = warm_start(model, g, x, y, tr, warm_steps, 0.5)
            # dense truth in float64
            keys, shapes = list(y), [y[k].shape for k in y]
            sizes = [y[k].numel() for k in keys]
            flat_y = torch.cat([y[k].reshape(-1) for k in keys])

            def unflat(v):
                return {k: t.reshape(s) for k, t, s in zip(keys, torch.split(v, sizes), shapes)}

            H = torch.autograd.functional.hessian(lambda v: g(x, unflat(v), tr), flat_y)
            H = 0.5 * (H + H.T)
            eig = torch.linalg.eigvalsh(H)
            J = torch.autograd.functional.jacobian(lambda v: outputs(x, unflat(v), tr).reshape(-1), flat_y)
            out0 = outputs(x, y, tr).detach()
            HL = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.reshape(out0.shape), tr[1]),
                                                   out0.reshape(-1))
            gn_dense = J.T @ HL @ J + wd * torch.eye(len(flat_y), dtype=J.dtype)
            yr = {k: t.detach().requires_grad_(True) for k, t in y.items()}
            fy = torch.autograd.grad(f(x, yr, va), list(yr.values()))
            b = torch.cat([t.reshape(-1) for t in fy])
            v = torch.linalg.solve(H, b)
            xr = {k: t.detach().requires_grad_(True) for k, t in x.items()}
            gy = torch.autograd.grad(g(xr, yr, tr), list(yr.values()), create_graph=True)
            vd = unflat(v)
            mixed = torch.autograd.grad(sum((a * vd[k]).sum() for a, k in zip(gy, keys)), list(xr.values()))
            truth = -torch.cat([m.reshape(-1) for m in mixed])                       
            fx = torch.autograd.grad(f(xr, {k: t.detach() for k, t in y.items()}, va), list(xr.values()))
            truth = truth + torch.cat([t.reshape(-1) for t in fx])
            t_grad = time_grad_g(g, x, y, tr)
            specs, gen = estimators(quick)
            specs.pop("first_order")
            specs["first_order"] = tb.first_order()
            for name, spec in specs.items():
                if only is not None and name not in only:
                    continue
                est = build(spec, gen)
                dx, row, aux = run_estimator(name, est, g, f, gn, x, y, tr, va, t_grad)
                d = torch.cat([dx[k].reshape(-1) for k in x])
                row.update(part="hr", wd=wd, seed=seed, dim_y=flat_y.numel(), truth_norm=float(truth.norm()),
                           cos=float(F.cosine_similarity(d, truth, dim=0)),
                           rel_err=float((d - truth).norm() / truth.norm()),
                           eig_min=float(eig[0]), eig_max=float(eig[-1]), n_neg=int((eig < 0).sum()))
                if aux.v is not None:           # the true residual of the system solved, from the dense H
                    lam = getattr(est.solver, "damping", 0.0) or getattr(est.solver, "rho", 0.0)
                    A = gn_dense if est.curvature == "gauss_newton" else H
                    vv = torch.cat([aux.v[k].reshape(-1) for k in keys]).double()
                    row["true_residual"] = float((b - (A + lam * torch.eye(len(b), dtype=A.dtype)) @ vv).norm() / b.norm())
                rows.append(row)
                print(f"  hr wd={wd} seed={seed} {name:16s} cos {row['cos']:+.3f} rel err {row['rel_err']:.3g} "
                      f"(eig {row['eig_min']:.3g}..{row['eig_max']:.3g}, {row['n_neg']} < 0) res "
                      f"{row.get('residual', float('nan')):.3g} warn {row['warning'] or '-'}", flush=True)
    return rows


# ---------------------------------------------------------------- tables

def summarise(rows, part, keys, metrics):
    groups = {}
    for r in rows:
        if r["part"] != part:
            continue
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(keys, key))
        s["n"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                t = torch.tensor([float(v) for v in vals], dtype=torch.float64)
                s[m] = float(t.mean())
                s[m + "_sd"] = float(t.std()) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def fmt(s, m, digits=3):
    if m not in s:
        return "-"
    return f"{s[m]:.{digits}g} ± {s[m + '_sd']:.{digits}g}" if s.get(m + "_sd") else f"{s[m]:.{digits}g}"


def md_table(header, rows):
    """Markdown lines: a header row, its rule, one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def print_tables(rows):
    lines = []
    rw = summarise(rows, "reweight", ("dropout", "method"),
                   ("auc", "residual", "nonpos", "warnings", "grad_evals", "g_calls", "f_calls", "products"))
    if rw:
        lines += md_table(("dropout", "method", "AUC (mean ± sd)", "residual", "nonpos", "warnings/call", "grad-evals",
                           "g, f calls", "products"),
                          [(str(s["dropout"]), s["method"], fmt(s, "auc"), fmt(s, "residual"), fmt(s, "nonpos"),
                            f"{s['warnings']:.2g}", fmt(s, "grad_evals", 2), f"{s['g_calls']:.0f}, {s['f_calls']:.0f}",
                            f"{s['products']:.0f}") for s in rw])
    ou = summarise(rows, "outer", ("method",), ("wrong_mass", "test_acc", "auc_final", "seconds", "warned_steps",
                                                "nonpos_steps"))
    if ou:
        lines += [""] + md_table(("method", "wrong-label weight mass", "test accuracy", "AUC of -x", "s",
                                  "warned steps", "nonpos steps"),
                                 [(s["method"], fmt(s, "wrong_mass"), fmt(s, "test_acc"), fmt(s, "auc_final"),
                                   fmt(s, "seconds", 2), fmt(s, "warned_steps", 2), fmt(s, "nonpos_steps", 2))
                                  for s in ou])
    hr = summarise(rows, "hr", ("wd", "method"), ("cos", "rel_err", "residual", "nonpos", "warnings", "grad_evals",
                                                  "eig_min", "eig_max", "n_neg", "true_residual"))
    if hr:
        lines += [""] + md_table(("wd", "method", "cos with dense IFT", "rel. error", "residual (report)",
                                  "true residual", "nonpos", "warnings", "grad-evals", "λmin(∇yy g)", "#λ<0"),
                                 [(str(s["wd"]), s["method"], fmt(s, "cos"), fmt(s, "rel_err"), fmt(s, "residual"),
                                   fmt(s, "true_residual"), fmt(s, "nonpos"), f"{s['warnings']:.2g}",
                                   fmt(s, "grad_evals", 2), fmt(s, "eig_min"), fmt(s, "n_neg")) for s in hr])
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fewer estimators, < 1 minute")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parts", default="reweight,outer,hr")
    ap.add_argument("--warm-steps", type=int, default=200)
    ap.add_argument("--outer-steps", type=int, default=30)
    ap.add_argument("--outer-methods", default="itd20,fp20,cg50_damp1,nys10_rho0.1,cg10")
    ap.add_argument("--outer-seeds", default="0,1")
    ap.add_argument("--hr-wd", default="0.01,0.3")
    ap.add_argument("--out", default="nonconvex.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    parts = a.parts.split(",")
    rows, start = [], time.perf_counter()
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, 1 thread",
            "argv": argv, "quick": a.quick}
    if "reweight" in parts:
        rows += part_reweight(seeds, (0.0, 0.3) if not a.quick else (0.0,), a.quick,
                              a.warm_steps if not a.quick else 100)
    if "outer" in parts:
        methods = a.outer_methods.split(",") if not a.quick else ["itd20", "cg10"]
        rows += part_outer([int(s) for s in a.outer_seeds.split(",")] if not a.quick else [0], methods,
                           a.outer_steps if not a.quick else 3, 0.0, a.warm_steps if not a.quick else 100)
    if "hr" in parts:
        rows += part_hr(seeds, [float(w) for w in a.hr_wd.split(",")], a.quick,
                        warm_steps=300 if not a.quick else 100)
    meta["seconds"] = time.perf_counter() - start
    table = print_tables(rows)
    with open(a.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "table": table}, fh, indent=1)
    print(f"wrote {a.out} ({meta['seconds']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
