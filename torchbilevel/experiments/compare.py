"""Every stochastic method of the library side by side, at equal gradient evaluations and
at equal wall time, each tuned on the same step-size grid (issue 13, item 7).

``problem="quadratic"`` (default): a stochastic finite-sum quadratic, n samples per level,
minibatches of ``batch_size`` drawn with replacement,

    g_i(x, y) = ½ yᵀA_i y − yᵀB_i x − a_iᵀy,   A_i = I + Q_iQ_iᵀ/d      (strongly convex in y)
    f_j(x, y) = ½‖y − c_j‖² + ½ρ‖x‖²,

whose full-sum solution is closed form: the score is the true ‖∇Φ(x)‖² divided by its
value at the start, x = 0, y = 0.  ``problem="hyperclean"``: data hyper-cleaning on
MNIST-5k with 40 % corrupted labels (:mod:`.hyperclean`, its default sizes), minibatches
drawn without replacement; the score is the test loss (test accuracy is reported too).

Methods (one step size ``lr`` from ``grid``; ``lr_x = x_ratio·lr``, every inner,
linear-system and Neumann step ``lr``; the rest at the library's defaults): the
single-loop FdeHBO and FMBO (momentum weights ``eta``, radius ``radius``), SOBA, MA-SOBA,
MRBO, F2SA, BOME, and the double-loop AID-CG and stocBiO (``inner_steps`` warm-started SGD
steps, ``solver_steps`` CG / Neumann steps, SGD outer step); and the rest of
benchmark_bilevel's family (issue 19) at their defaults: SABA and SRBA (the finite sum as
n // batch_size fixed minibatches of a seeded partition, one drawn uniformly per draw as
an ``(i, batch)`` pair), AmIGO, TTSA (its decaying steps), FSLA and VRBO.  Every run draws
its batches from its own seeded streams; seeds change the streams, not the problem.

Cost: oracle calls per step, counting a gradient of f or g (both arguments), a
Hessian-vector product and a mixed product ∇xy g·v as one call each (:func:`oracles_per_step`).
"Equal gradient evaluations" compares the runs after ``oracles`` calls; "equal time" after
``seconds`` of optimisation time (metric evaluation excluded).  The step size is tuned per
method and per budget: the grid value with the smallest median (over seeds) final score.

``run(config)`` returns, per method, the curve of its run tuned at the oracle budget
(median over seeds) — the demo table and plot; :func:`run_grid` the raw record of every
(method, lr, seed) run and :func:`summary` / :func:`format_summary` the table at both
budgets (bench/RESULTS-compare.md).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

import torchbilevel as tb

__all__ = ["CompareConfig", "METHODS", "LABELS", "oracles_per_step", "finite_sum_quadratic", "make_method",
           "run_grid", "summary", "tuned_curves", "run", "format_summary", "Task", "make_task", "SCORES"]

LABELS = {"fdehbo": "FdeHBO", "fmbo": "FMBO", "soba": "SOBA", "ma_soba": "MA-SOBA", "mrbo": "MRBO",
          "f2sa": "F2SA", "bome": "BOME", "aid_cg": "AID-CG", "stocbio": "stocBiO",
          "saba": "SABA", "srba": "SRBA", "amigo": "AmIGO", "ttsa": "TTSA", "fsla": "FSLA", "vrbo": "VRBO"}
METHODS = tuple(LABELS)
PAIRED = ("saba", "srba")        # draw (i, batch) pairs of fixed minibatches
SCORES = {"quadratic": "‖∇Φ‖² / ‖∇Φ(x_0)‖²", "hyperclean": "test loss"}


@dataclasses.dataclass
class CompareConfig:
    """Settings of the comparison (defaults: about 6 min on 2 shared CPU cores).

    ``steps`` caps the steps of one run; a run stops once it has used both ``oracles``
    calls and ``seconds`` of optimisation time (None: the oracle budget only).
    ``seed`` is the first of ``n_seeds`` seeds of the minibatch streams."""
    methods: tuple = METHODS
    problem: str = "quadratic"
    grid: tuple = (0.03, 0.1, 0.3)
    x_ratio: Optional[float] = None   # lr_x = x_ratio·lr; None: 1/5 (quadratic), 200 (hyperclean)
    oracles: int = 6000
    seconds: Optional[float] = 4.0
    steps: int = 20000
    seed: int = 0
    n_seeds: int = 3
    batch_size: int = 64
    n: int = 512
    p: int = 10
    d: int = 10
    rho: float = 0.1
    eta: float = 0.5            # FdeHBO / FMBO momentum weights
    radius: float = 100.0       # FdeHBO / FMBO ball (‖v*‖ is about 5 here: never binds)
    inner_steps: int = 5        # double loop: warm-started inner SGD steps per outer step
    solver_steps: int = 5       # AID-CG iterations / stocBiO Neumann terms
    eval_every: int = 100       # oracle calls between evaluations (at least one step)
    device: str = "cpu"

    def __post_init__(self):
        self.grid = tuple(float(v) for v in self.grid)      # --set grid=0.1,0.3 gives strings
        unknown = [m for m in self.methods if m not in LABELS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(LABELS)}")
        if self.problem not in ("quadratic", "hyperclean"):
            raise ValueError(f"problem must be 'quadratic' or 'hyperclean', got {self.problem!r}")
        if self.x_ratio is None:
            self.x_ratio = 0.2 if self.problem == "quadratic" else 200.0
        if not self.grid or any(not (lr > 0) for lr in self.grid):
            raise ValueError(f"grid must hold step sizes > 0, got {self.grid}")


def finite_sum_quadratic(n: int = 512, p: int = 10, d: int = 10, rho: float = 0.1, seed: int = 0,
                         dtype=torch.float64, device="cpu"):
    """(problem, grad_phi): the problem of the module docstring (batches are index tensors)
    and the true ∇Φ(x) of its full sum."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    Q = r(n, d, d)
    A = torch.eye(d, dtype=torch.float64) + Q @ Q.transpose(1, 2) / d
    B = r(d, p) / math.sqrt(p) + 0.5 * r(n, d, p) / math.sqrt(p)
    a = r(d) + 0.5 * r(n, d)
    C = 2 * r(d) + r(n, d)
    A, B, a, C = (t.to(dtype=dtype, device=device) for t in (A, B, a, C))

    def inner(x, y, idx):
        w = y["w"]
        return 0.5 * w @ A[idx].mean(0) @ w - w @ B[idx].mean(0) @ x["h"] - a[idx].mean(0) @ w

    def outer(x, y, idx):
        return 0.5 * ((y["w"] - C[idx]) ** 2).sum(1).mean() + 0.5 * rho * x["h"] @ x["h"]

    Am, Bm, am, cm = A.mean(0), B.mean(0), a.mean(0), C.mean(0)
    M = torch.linalg.solve(Am, Bm)

    def grad_phi(x):
        return rho * x + M.T @ (torch.linalg.solve(Am, Bm @ x + am) - cm)

    return tb.Bilevel(outer, inner), grad_phi


def _stream(n, size, seed, device):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(n, (size,), generator=gen).to(device)


class Task(NamedTuple):
    """One problem of the comparison: the bilevel problem, the starting point, the seeded
    batch streams of a run, the metrics of an iterate and which of them is the score
    (lower is better) the step size is tuned on."""
    problem: object
    x0: dict
    y0: dict
    streams: Callable[[int], tuple]
    metrics: Callable[[dict, dict], dict]
    score: str
    pairs: Optional[Callable[[int], tuple]] = None    # (i, batch) streams for SABA / SRBA


def make_task(c: "CompareConfig") -> Task:
    """The ``c.problem`` task: "quadratic" (score: ‖∇Φ‖²/‖∇Φ(x_0)‖², exact) or "hyperclean"
    (MNIST-5k, 40 % corrupted labels, score: test cross-entropy; also test accuracy)."""
    if c.problem == "quadratic":
        problem, grad_phi = finite_sum_quadratic(c.n, c.p, c.d, c.rho, device=c.device)
        dt = torch.float64
        x0, y0 = ({"h": torch.zeros(c.p, dtype=dt, device=c.device)}, {"w": torch.zeros(c.d, dtype=dt, device=c.device)})
        g0 = float(grad_phi(x0["h"]).pow(2).sum())

        def metrics(x, y):
            return {"grad_ratio": float(grad_phi(x["h"]).pow(2).sum()) / g0}

        def streams(seed):
            return (_stream(c.n, c.batch_size, 2 * seed, c.device), _stream(c.n, c.batch_size, 2 * seed + 1, c.device))

        parts = _partition(c.n, c.batch_size, c.device)

        def pairs(seed):
            return (_pairs(parts, lambda i: i, 2 * seed), _pairs(parts, lambda i: i, 2 * seed + 1))

        return Task(problem, x0, y0, streams, metrics, "grad_ratio", pairs)
    from . import hyperclean as hc
    from .streams import minibatches
    hcfg = hc.HypercleanConfig(seed=0, device=c.device)
    data = hc.make_data(hcfg)
    x0, y0 = hc.initial_point(hcfg, data)
    evaluate = hc.evaluate(data)

    def metrics(x, y):
        m = evaluate(x, y)
        return {"test_loss": m["test_loss"], "test_acc": m["test_acc"]}

    def streams(seed):
        return (minibatches(data.train_x, data.train_noisy, batch_size=c.batch_size, seed=100 + seed, with_index=True),
                minibatches(*data.val, batch_size=c.batch_size, seed=200 + seed))

    tr, va = _partition(data.train_x.shape[0], c.batch_size, c.device), _partition(data.val[0].shape[0], c.batch_size,
                                                                                   c.device)

    def pairs(seed):
        return (_pairs(tr, lambda i: (i, data.train_x[i], data.train_noisy[i]), 100 + seed),
                _pairs(va, lambda i: tuple(t[i] for t in data.val), 200 + seed))

    return Task(tb.Bilevel(hc.outer_loss, hc.inner_loss(hcfg.reg)), x0, y0, streams, metrics, "test_loss", pairs)


def _partition(n, size, device):
    """The n rows as n // size fixed minibatches of a seeded permutation (SABA / SRBA's finite sum)."""
    size = min(size, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    return [order[k * size:(k + 1) * size].to(device) for k in range(n // size)]


def _pairs(parts, batch_of, seed):
    """Endless (i, batch_of(rows of minibatch i)) with i drawn uniformly from the fixed minibatches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        i = int(torch.randint(len(parts), (1,), generator=gen))
        yield i, batch_of(parts[i])


def _n_fixed(c: CompareConfig):
    """SABA / SRBA's numbers of fixed minibatches (inner, outer) on ``c.problem``."""
    if c.problem == "quadratic":
        k = c.n // min(c.batch_size, c.n)
        return k, k
    from . import hyperclean as hc
    h = hc.HypercleanConfig()
    return h.n_train // min(c.batch_size, h.n_train), h.n_val // min(c.batch_size, h.n_val)


def oracles_per_step(name: str, c: CompareConfig) -> int:
    """Oracle calls per step (gradient, HVP or mixed product = 1), from each method's docstring;
    for SRBA and VRBO the periodic full-sum / large-batch steps spread over their period,
    for TTSA the expected length of its random Neumann series (rounded)."""
    q_mrbo, t_bome, t_f2sa = 10, 10, 10           # their defaults: neumann_steps, inner_steps (BOME, F2SA)
    if name == "srba":                            # SARAH steps 8, a full sum 3 n_inner + n_outer
        n_in, n_out = _n_fixed(c)
        period = max(1, (n_in + n_out) // 2)
        return round(8 * (period - 1) / period + (3 * n_in + n_out) / period)
    m, q, period, large = 10, 10, 100, 10         # VRBO's defaults
    return {"fdehbo": 8, "fmbo": 8, "soba": 4, "ma_soba": 4, "mrbo": 2 * (q_mrbo + 3), "f2sa": 3 * t_f2sa + 3,
            "bome": t_bome + 3, "aid_cg": c.inner_steps + c.solver_steps + 2,
            "stocbio": c.inner_steps + c.solver_steps + 2,
            "saba": 4, "amigo": 10 + 10 + 2, "ttsa": round(3 + (10 - 1) / 2), "fsla": 7,
            "vrbo": round(2 * m * (q + 3) + large * (q + 3) / period)}[name]


def make_method(name: str, problem, lr: float, c: CompareConfig):
    """The algorithm ``name`` with step size ``lr`` (``lr_x = x_ratio·lr``), other arguments
    as in the module docstring."""
    lx = c.x_ratio * lr
    if name in ("fdehbo", "fmbo"):
        return getattr(tb, name)(problem, lr_x=lx, lr_y=lr, lr_v=lr, eta_x=c.eta, eta_y=c.eta, eta_v=c.eta,
                                 radius=c.radius)
    if name in ("soba", "ma_soba"):
        return getattr(tb, name)(problem, lr_x=lx, lr_y=lr, lr_v=lr)
    if name == "mrbo":
        return tb.mrbo(problem, lr_x=lx, lr_y=lr, eta=lr)
    if name == "f2sa":
        return tb.f2sa(problem, lr_x=lx, lr_y=lr, lr_z=lr)
    if name == "bome":
        return tb.bome(problem, lr_x=lx, lr_y=lr)
    if name in PAIRED:
        n_in, n_out = _n_fixed(c)
        return getattr(tb, name)(problem, lr_x=lx, lr_y=lr, lr_v=lr, n_inner=n_in, n_outer=n_out)
    if name in ("amigo", "fsla", "vrbo"):
        return getattr(tb, name)(problem, lr_x=lx, lr_y=lr, lr_v=lr)
    if name == "ttsa":
        return tb.ttsa(problem, lr_x=lx, lr_y=lr)
    est = tb.aid(tb.cg(steps=c.solver_steps)) if name == "aid_cg" else tb.stocbio(c.solver_steps, lr)
    return tb.double_loop(problem, est, lr_x=lx, inner_steps=c.inner_steps, lr_y=lr, outer="sgd")


def _one_run(name, lr, seed, c: CompareConfig, task: Task):
    algo = make_method(name, task.problem, lr, c)
    s = algo.init(task.x0, task.y0)
    it_in, it_out = (task.pairs if name in PAIRED else task.streams)(seed)
    per_step = oracles_per_step(name, c)
    first = task.metrics(s.x, s.y)
    rows = [dict(method=name, lr=lr, seed=seed, step=0, oracles=0, seconds=0.0, score=first[task.score], **first)]
    spent, step = 0.0, 0
    every = max(1, c.eval_every // per_step)        # equal oracle spacing for every method
    while step < c.steps:
        t0 = time.perf_counter()
        try:
            for _ in range(every):
                s = algo.step(s, it_in, it_out)
                step += 1
        except FloatingPointError:
            rows.append(dict(method=name, lr=lr, seed=seed, step=step, oracles=step * per_step,
                             seconds=spent + time.perf_counter() - t0, score=math.inf, diverged=True))
            break
        spent += time.perf_counter() - t0
        m = task.metrics(s.x, s.y)
        score = m[task.score] if math.isfinite(m[task.score]) else math.inf
        rows.append(dict(method=name, lr=lr, seed=seed, step=step, oracles=step * per_step, seconds=spent,
                         score=score, **m))
        if not math.isfinite(score) or (step * per_step >= c.oracles and (c.seconds is None or spent >= c.seconds)):
            break
    return rows


def run_grid(config: CompareConfig, progress=None) -> list:
    """Every (method, lr, seed) run: one row per evaluation with method, lr, seed, step,
    oracles, seconds, the task's metrics and ``score`` (the tuned metric; inf once diverged)."""
    c = config
    task = make_task(c)
    record = []
    share = (c.seconds or 1.0) / (len(c.grid) * c.n_seeds)
    for name in c.methods:
        for lr in c.grid:
            for seed in range(c.seed, c.seed + c.n_seeds):
                record += _one_run(name, lr, seed, c, task)
                if progress is not None:
                    progress.update(share)
    return record


def _at(rows, key, budget):
    """The score of one run at ``budget`` of ``key`` (its last evaluation within it)."""
    within = [r for r in rows if r[key] <= budget]
    last = within[-1] if within else rows[0]
    if any(r.get("diverged") for r in rows) and rows[-1][key] <= budget:
        return math.inf
    return last["score"]


def summary(record, config: CompareConfig) -> list:
    """Per method and budget ("oracles", "seconds"): the tuned lr and the median, best and
    worst over seeds of the final score."""
    out = []
    runs = {}
    for r in record:
        runs.setdefault((r["method"], r["lr"], r["seed"]), []).append(r)
    budgets = [("oracles", config.oracles)] + ([("seconds", config.seconds)] if config.seconds else [])
    for name in config.methods:
        row = {"method": LABELS[name], "oracles_per_step": oracles_per_step(name, config)}
        for key, budget in budgets:
            best = None
            for lr in config.grid:
                vals = [_at(runs[(name, lr, s)], key, budget) for s in range(config.seed, config.seed + config.n_seeds)
                        if (name, lr, s) in runs]
                if not vals:
                    continue
                med = statistics.median(vals)
                if best is None or med < best[1]:
                    best = (lr, med, min(vals), max(vals))
            if best is not None:
                row.update({f"lr@{key}": best[0], f"median@{key}": best[1], f"best@{key}": best[2],
                            f"worst@{key}": best[3]})
        out.append(row)
    return out


def format_summary(rows, config: CompareConfig) -> str:
    """A markdown table of :func:`summary`."""
    head = ["method", "oracles/step"]
    keys = [("oracles", f"{config.oracles} oracle calls")] + ([("seconds", f"{config.seconds:g} s")]
                                                              if config.seconds else [])
    for _, lab in keys:
        head += [f"lr ({lab})", f"{SCORES[config.problem]}, median [best, worst] ({lab})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "diverged" if not math.isfinite(v) else f"{v:.2e}"
    for r in rows:
        cells = [r["method"], str(r["oracles_per_step"])]
        for key, _ in keys:
            if f"lr@{key}" in r:
                cells += [f"{r[f'lr@{key}']:g}",
                          f"{fmt(r[f'median@{key}'])} [{fmt(r[f'best@{key}'])}, {fmt(r[f'worst@{key}'])}]"]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuned_curves(record, config: CompareConfig) -> list:
    """Per method, the curve of its run tuned at the oracle budget, median over seeds at each
    evaluation: method (label), lr, step, oracles, seconds, score and the task's metrics."""
    tuned = {r["method"]: r["lr@oracles"] for r in summary(record, config) if "lr@oracles" in r}
    out = []
    for name in config.methods:
        lr = tuned[LABELS[name]]
        curves = [[r for r in record if r["method"] == name and r["lr"] == lr and r["seed"] == s]
                  for s in range(config.seed, config.seed + config.n_seeds)]
        for i in range(min(len(cv) for cv in curves)):
            pts = [cv[i] for cv in curves]
            row = dict(method=LABELS[name], lr=lr, step=pts[0]["step"], oracles=pts[0]["oracles"],
                       seconds=statistics.median(p["seconds"] for p in pts))
            for k in [k for k in pts[0] if k not in row and k not in ("seed", "diverged")]:
                if all(k in p for p in pts):
                    row[k] = statistics.median(p[k] for p in pts)
            out.append(row)
    return out


def run(config: CompareConfig, progress=None) -> list:
    """The demo record: :func:`tuned_curves` of :func:`run_grid`."""
    return tuned_curves(run_grid(config, progress), config)
