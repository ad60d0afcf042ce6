"""The few-shot runs behind bench/RESULTS.md's few-shot verdicts: every method over seeds
(5-way 5-shot, default config), the inner-step sweep T = 5, 10, 20 for AID-BiO vs ITD-BiO,
and 5-way 1-shot; one JSON record per part (the experiment's rows).

    python bench/fewshot_runs.py --part main --seeds 0,1,2 --out /tmp/fs_main.json
    python bench/fewshot_runs.py --part sweep --out /tmp/fs_sweep.json
    python bench/fewshot_runs.py --part oneshot --out /tmp/fs_1shot.json
    python bench/fewshot_runs.py --part long --seconds 120 --out /tmp/fs_long.json
    python bench/fewshot_runs.py --part imaml --seconds 20 --out /tmp/fs_imaml.json    # issue 24
    python bench/fewshot_runs.py --part imaml_curvature --out /tmp/fs_imaml_curv.json  # issue 24

``imaml``: ITD-BiO (ANIL), AID-BiO (CG) and iMAML at the old settings (λ = 2, lr 0.1, 5 steps,
CG(10) on an indefinite system), with the Hessian and λ = 50, lr 0.01, 10 or 20 steps (the
proximal problem convex where the run is), and with Gauss-Newton curvature (λ = 2, lr 0.02,
10 steps: the new default), each with the same optimisation time.  ``imaml_curvature``: at the meta-initialisation and after
some iMAML meta-steps, per task: the extreme eigenvalues of the support CE Hessian at the
inner iterate (Lanczos, 40 Hessian-vector products, full reorthogonalisation), hence those
of the proximal problem (+ λ) and 2/L; the inner gradient norm left; CG(N)'s report and its
cosine with CG(100).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from torchbilevel.experiments import fewshot
from torchbilevel.experiments.records import final_rows, format_table

COLUMNS = ["method", "step", "seconds", "test_acc", "final_acc", "ci95", "t_target"]


def runs(part: str, seeds, seconds: float):
    """(tag, config) pairs of one part."""
    base = fewshot.FewShotConfig(seconds=seconds)
    if part == "main":
        return [(f"seed{s}", dataclasses.replace(base, seed=s)) for s in seeds]
    if part == "oneshot":
        return [(f"1shot-seed{s}", dataclasses.replace(base, shots=1, seed=s)) for s in seeds]
    if part == "sweep":
        return [(f"T{t}-seed{s}", dataclasses.replace(base, inner_steps=t, solver_steps=t, seed=s,
                                                     methods=("itd", "aid_cg", "aid_fp")))
                for s in seeds for t in (5, 10, 20)]
    if part == "imaml":
        old = dict(imaml_lam=2.0, imaml_lr=0.1, imaml_steps=5, imaml_solver_steps=10, imaml_curvature="hessian")
        gn = dict(imaml_lam=2.0, imaml_lr=0.02, imaml_steps=10, imaml_solver_steps=10, imaml_curvature="gauss_newton")
        convex = dict(imaml_lam=50.0, imaml_lr=0.01, imaml_steps=10, imaml_solver_steps=10, imaml_curvature="hessian")
        out = []
        for s in seeds:
            b = dataclasses.replace(base, seed=s, test_tasks=200)
            out += [(f"anil-seed{s}", dataclasses.replace(b, methods=("itd", "aid_cg"))),
                    (f"imaml-old-seed{s}", dataclasses.replace(b, methods=("imaml",), **old)),
                    (f"imaml-convex-seed{s}", dataclasses.replace(b, methods=("imaml",), **convex)),
                    (f"imaml-convex-T20-seed{s}", dataclasses.replace(b, methods=("imaml",), **{**convex, "imaml_steps": 20})),
                    (f"imaml-gn-seed{s}", dataclasses.replace(b, methods=("imaml",), **gn))]
        return out
    if part == "long":                 # ITD-BiO vs AID-BiO with many inner steps, longer budget
        return [(f"T20-long-seed{s}", dataclasses.replace(base, inner_steps=20, solver_steps=20, seed=s,
                                                          methods=("itd", "aid_cg"))) for s in seeds]
    raise ValueError(part)


def lanczos(hvp, dim, k=40, seed=0):
    """Extreme eigenvalues (smallest, largest) of a symmetric operator from ``k`` Lanczos
    steps with full reorthogonalisation (Ritz values bound the spectrum from inside)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64)
    Q, al, be = [q / q.norm()], [], []
    for _ in range(k):
        w = hvp(Q[-1].float()).double()
        al.append(float(w @ Q[-1]))
        Qm = torch.stack(Q)
        w = w - Qm.T @ (Qm @ w)
        w = w - Qm.T @ (Qm @ w)
        b = float(w.norm())
        if b < 1e-10:
            break
        be.append(b)
        Q.append(w / b)
    n = len(al)
    off = torch.tensor(be[: n - 1], dtype=torch.float64)
    T = torch.diag(torch.tensor(al, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
    e = torch.linalg.eigvalsh(T)
    return float(e[0]), float(e[-1])


def imaml_curvature(cfg, meta_steps=(0, 20), tasks=3):
    """Rows of the iMAML curvature probe (see the module docstring)."""
    import warnings

    import torch.nn.functional as F

    import torchbilevel as tb
    from torchbilevel.estimators.base import unroll
    data = fewshot.make_data(cfg)
    torch.manual_seed(cfg.seed)
    model = fewshot.CNN4(cfg.width, cfg.ways).train()
    x0, y0 = tb.nn.split(model, inner=["head"])
    learner = fewshot.MetaLearner("imaml", model, cfg)
    state = learner.init(dict(x0), dict(y0))
    stream = fewshot.TaskSampler(data["train"], cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch, cfg.seed + 100)
    probe = fewshot.TaskSampler(data["train"], cfg.ways, cfg.shots, cfg.queries, 1, cfg.seed + 555)
    problem = fewshot.imaml_problem(model, cfg.imaml_lam)
    rows, done = [], 0
    for target in meta_steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while done < target:
                state, done = learner.step(state, stream), done + 1
        x = state.x
        keys = list(x)
        for t in range(tasks):
            (sx, sl), (qx, ql) = next(probe)
            s, q = (sx[0], sl[0]), (qx[0], ql[0])
            with tb.buffers.frozen():
                y = unroll(problem, x, dict(x), [s] * cfg.imaml_steps, cfg.imaml_lr, differentiable=False)
                y = {k: v.detach() for k, v in y.items()}
                yr = {k: v.clone().requires_grad_(True) for k, v in y.items()}
                ce = F.cross_entropy(tb.nn.call(model, {}, yr, s[0]), s[1])
                gr = torch.autograd.grad(ce, list(yr.values()), create_graph=True)
                gflat = torch.cat([a.reshape(-1) for a in gr])

                def H(v):
                    out = torch.autograd.grad(gflat @ v, list(yr.values()), retain_graph=True)
                    return torch.cat([o.reshape(-1) for o in out])

                lo, hi = lanczos(H, gflat.numel())
                g_at = lambda yy: torch.cat([a.reshape(-1) for a in torch.autograd.grad(
                    problem.inner(x, yy, s), list(yy.values()))]).norm()
                g0 = float(g_at({k: v.detach().clone().requires_grad_(True) for k, v in x.items()}))
                gT = float(g_at({k: v.detach().clone().requires_grad_(True) for k, v in y.items()}))
            sol = {}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for n in (cfg.imaml_solver_steps, 100):
                    for curv in ("hessian", "gauss_newton"):
                        p = fewshot.imaml_problem(model, cfg.imaml_lam, output_loss=curv == "gauss_newton")
                        dx, aux = tb.hypergrad(p, tb.aid(tb.cg(n), curvature=curv), has_aux=True)(x, y, s, q)
                        sol[n, curv] = (torch.cat([dx[k].reshape(-1) for k in keys]), aux.solve)
            n = cfg.imaml_solver_steps
            cos = lambda a, b: float(F.cosine_similarity(sol[a][0], sol[b][0], dim=0))
            row = {"meta_step": target, "task": t, "lam": cfg.imaml_lam, "lr": cfg.imaml_lr, "steps": cfg.imaml_steps,
                   "ce_eig_min": lo, "ce_eig_max": hi, "prox_eig_min": lo + cfg.imaml_lam,
                   "two_over_L": 2 / (hi + cfg.imaml_lam), "grad_start": g0, "grad_end": gT,
                   "cg_res": float(sol[n, "hessian"][1].residual), "cg_nonpos": int(sol[n, "hessian"][1].nonpositive_curvature),
                   "cg100_res": float(sol[100, "hessian"][1].residual),
                   "cg100_nonpos": int(sol[100, "hessian"][1].nonpositive_curvature),
                   "cos_cg_cg100": cos((n, "hessian"), (100, "hessian")),
                   "gn_res": float(sol[n, "gauss_newton"][1].residual),
                   "cos_gn_cg100": cos((n, "gauss_newton"), (100, "hessian")),
                   "warnings": sum(issubclass(c.category, RuntimeWarning) for c in caught)}
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("main", "sweep", "oneshot", "long", "imaml", "imaml_curvature"), required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="imaml_curvature: override a FewShotConfig field (e.g. imaml_lam=2)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.part == "imaml_curvature":
        cfg = fewshot.FewShotConfig()
        for kv in a.set:
            k, v = kv.split("=", 1)
            cfg = dataclasses.replace(cfg, **{k: type(getattr(cfg, k))(v)})
        rows = imaml_curvature(cfg)      # (the probe's solves use both curvatures at N and 100 steps)
        with open(a.out, "w") as fh:
            json.dump(rows, fh)
        return
    out = []
    for tag, cfg in runs(a.part, [int(s) for s in a.seeds.split(",")], a.seconds):
        start = time.perf_counter()
        record = fewshot.run(cfg)
        for row in record:
            row["run"] = tag
        out += record
        print(f"== {tag} ({time.perf_counter() - start:.0f} s wall) {dataclasses.asdict(cfg)}", flush=True)
        print(format_table(final_rows(record), COLUMNS), flush=True)
        with open(a.out, "w") as fh:
            json.dump(out, fh)


if __name__ == "__main__":
    main()
