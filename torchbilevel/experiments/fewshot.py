"""Few-shot meta-learning on rotated MNIST-5k digits (stocBiO paper sec. 5; Hessian-free
paper sec. 4.3), a CPU-sized stand-in for their miniImageNet / FC100 runs.

Classes: the 10 MNIST-5k digits x 4 rotations = 40 classes (the Omniglot benchmarks'
rule), split into disjoint meta-train and meta-test classes.  A task is N-way K-shot:
N classes, K support and Q query images per class, labels permuted per task.  The model
is CNN4 (4 blocks of 3x3 conv, BatchNorm, ReLU, 2x2 max-pool; ``width`` channels; 28x28
inputs give ``width`` features) as the shared outer variable x, and per task:

    ANIL-type (y = linear head of task i, from 0; declared features phi = body):
        inner  g_i(x, y) = CE(head(phi(x, S_i); y)) + reg/2 ‖y‖²        (stocBiO paper eq. (27))
        outer  f_i(x, y) = CE(head(phi(x, Q_i); y))
    iMAML (y = all weights of task i, from x; Rajeswaran et al. 2019 eq. (3)-(4)):
        inner  g_i(x, y) = CE(net(S_i; y)) + λ/2 ‖y − x‖²,   outer f_i = CE(net(Q_i; y))

and the meta-gradient (1/B) Σ_i ∇Φ_i(x) over a meta-batch of B tasks
(:func:`torchbilevel.over_tasks`), then one Adam step on x.  Methods:

* ``itd``: ITD-BiO = ANIL: backprop through T inner GD steps from y = 0.
* ``aid_cg`` / ``aid_fp``: AID-BiO: T inner GD steps, then CG / fixed point (N steps).
* ``pzobo`` / ``pzobo_sphere``: PZOBO with Gaussian / the authors' sphere directions.
* ``first_order``: FO-ANIL, ∇x f at the head reached by T inner steps.
* ``imaml``: iMAML, ``imaml_steps`` inner GD steps on all weights then AID-CG on the
  Gauss-Newton matrix (or the Hessian: ``imaml_curvature``).
* ``protonet``: ProtoNet (Snell et al. 2017; not bilevel): class means of the support
  features, logits −‖z − c_k‖², CE on the queries, backprop into the body.

Evaluation: mean accuracy on meta-test tasks (train-mode BatchNorm, i.e. each task's own
batch statistics, as MAML/ANIL evaluate; the head fitted by ``test_steps`` GD steps from
0, iMAML by ``imaml_steps`` steps from x), during training on ``eval_tasks`` fixed tasks,
at the end on ``test_tasks`` fresh ones with a 95 % interval (1.96 standard errors).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb

from .. import datasets
from ..estimators.base import unroll
from ..optim.outer import outer_init, outer_update
from .runner import Method, run_methods

__all__ = ["FewShotConfig", "LABELS", "METHODS", "CNN4", "TaskSampler", "MetaState", "MetaLearner",
           "anil_problem", "imaml_problem", "protonet_loss", "make_data", "evaluate_tasks", "interval95",
           "time_to", "run"]

LABELS = {
    "itd": "ITD-BiO (ANIL)", "aid_cg": "AID-BiO (CG)", "aid_fp": "AID-BiO (FP)",
    "pzobo": "PZOBO", "pzobo_sphere": "PZOBO (sphere)", "first_order": "FO-ANIL",
    "imaml": "iMAML (AID-CG)", "protonet": "ProtoNet",
}
METHODS = tuple(LABELS)


@dataclasses.dataclass
class FewShotConfig:
    """Settings of one few-shot run (``ways``-way ``shots``-shot, ``queries`` per class).

    ``inner_steps`` T inner GD steps of ``lr_y`` on the head (ITD-BiO unrolls them;
    AID-BiO, PZOBO and FO-ANIL take them first), ``solver_steps`` N CG / fixed-point
    steps, ``directions`` PZOBO directions of radius ``mu``; Adam on x with ``lr_x``;
    ``meta_batch`` tasks per meta-gradient, through ``tb.over_tasks(mode=mode)``.
    iMAML: ``imaml_steps`` GD steps of ``imaml_lr`` on all weights, proximal weight
    ``imaml_lam``, then CG(``imaml_solver_steps``) with ``imaml_curvature`` ``"gauss_newton"``
    (G = Jᵀ∇²CE J + λI, positive definite: CG converges, relative residual ~2e-3 at 10 steps)
    or ``"hessian"`` (∇yy g, the paper's matrix).  Measured (bench/RESULTS.md, "Non-convex
    inner problems"): the support CE Hessian of CNN4 at the task iterate has eigenvalues
    down to −15 (−39 at the meta-initialisation) and up to 40-90, so with the Hessian the
    proximal problem is convex only for λ ≳ 40 (``imaml_lam=50, imaml_lr=0.01,
    imaml_curvature="hessian"``: CG(10) converged, no negative curvature, but y stays within
    ‖∇CE‖/λ of x and accuracy falls to 0.35-0.37); the old λ = 2, lr 0.1 (above 2/L ≈ 0.05)
    solved an indefinite system (CG(10) vs CG(100) cosine 0.1-0.3).  The default keeps λ = 2
    with the inner lr below 2/L and Gauss-Newton curvature.  ``target_acc``: the accuracy whose first crossing (on the
    ``eval_tasks`` curve) is reported as time to accuracy.  Step sizes were not tuned
    beyond a few trials (bench/RESULTS.md, few-shot section): with ``lr_y = 0.5`` ITD-BiO
    learned and both AID-BiO variants fell to chance (the body's features grow, a fixed
    0.5 head step then diverges, and AID's formula, which assumes a converged head, does
    not see it; ITD differentiates the path actually taken); at 0.1 all of them learn.
    Default run: 8 methods x 20 s of optimisation plus evaluation (600 test tasks per
    method), about 5 minutes on a quiet 2-core CPU (7-14 minutes measured while other runs
    shared it); tiny sizes via ``--set`` (see tests/test_fewshot.py).
    """

    ways: int = 5
    shots: int = 5
    queries: int = 15
    meta_batch: int = 4
    width: int = 16
    train_classes: int = 28
    methods: Sequence[str] = METHODS
    steps: int = 10000
    seconds: float | None = 20.0
    eval_every: int = 25
    eval_seconds: float | None = 4.0
    eval_tasks: int = 25
    test_tasks: int = 600
    inner_steps: int = 10
    solver_steps: int = 10
    test_steps: int | None = None
    lr_y: float = 0.1
    lr_x: float = 3e-3
    reg: float = 0.1
    directions: int = 1
    mu: float = 0.01
    imaml_steps: int = 10
    imaml_lr: float = 0.02
    imaml_lam: float = 2.0
    imaml_solver_steps: int = 10
    imaml_curvature: str = "gauss_newton"
    target_acc: float = 0.8
    mode: str = "auto"
    seed: int = 0
    device: str = "cpu"


class CNN4(nn.Module):
    """CNN4 (Vinyals et al. 2016; the ANIL / MAML body): 4 blocks of 3x3 conv (padding 1),
    BatchNorm, ReLU, 2x2 max-pool; on 28x28 inputs ``width`` features; a linear head."""

    def __init__(self, width: int = 16, ways: int = 5, channels: int = 1):
        super().__init__()
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(width, ways)

    def forward(self, images):
        return self.head(self.body(images))


class TaskSampler:
    """An endless stream of meta-batches ``(support, query)`` from ``classes`` (a tensor
    ``(C, n, 1, 28, 28)``): each is ``(images (B, N·K, ...), labels (B, N·K))`` with the
    task dimension first; classes and images drawn with a seeded generator."""

    def __init__(self, classes: torch.Tensor, ways: int, shots: int, queries: int, tasks: int, seed: int):
        if ways > classes.shape[0]:
            raise ValueError(f"ways={ways} needs at least {ways} classes, have {classes.shape[0]}")
        self.classes, self.ways, self.shots, self.queries, self.tasks = classes, ways, shots, queries, tasks
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        c, n = self.classes.shape[:2]
        sup, qry = [], []
        for _ in range(self.tasks):
            picked = torch.randperm(c, generator=self.gen)[: self.ways]
            imgs = [self.classes[k][torch.randperm(n, generator=self.gen)[: self.shots + self.queries]] for k in picked]
            sup.append(torch.cat([im[: self.shots] for im in imgs]))
            qry.append(torch.cat([im[self.shots:] for im in imgs]))
        dev = self.classes.device
        ls = torch.arange(self.ways, device=dev).repeat_interleave(self.shots).expand(self.tasks, -1)
        lq = torch.arange(self.ways, device=dev).repeat_interleave(self.queries).expand(self.tasks, -1)
        return (torch.stack(sup), ls.contiguous()), (torch.stack(qry), lq.contiguous())


def anil_problem(model: CNN4, reg: float) -> tb.Bilevel:
    """ANIL as a bilevel problem with the body declared as features (stocBiO paper eq. (27))."""
    phi, head = tb.nn.features(model, body="body", head="head")

    def f(z, y, batch):
        return F.cross_entropy(head(z, y), batch[1])

    def g(z, y, batch):
        return f(z, y, batch) + 0.5 * reg * sum((v * v).sum() for v in y.values())

    return tb.Bilevel(outer=f, inner=g, features=phi)


def imaml_problem(model: CNN4, lam: float, output_loss: bool = False) -> tb.Bilevel:
    """iMAML (Rajeswaran et al. 2019, eq. (3)-(4)): y = all weights of the task, x = the
    meta-initialisation; g = support CE + λ/2 ‖y − x‖², f = query CE.  ``output_loss``:
    declare g as ``tb.OutputLoss`` (logits, CE, the proximal term) for Gauss-Newton curvature."""

    def logits(x, y, batch):
        return tb.nn.call(model, {}, y, batch[0])

    def f(x, y, batch):
        return F.cross_entropy(logits(x, y, batch), batch[1])

    def prox(x, y, batch):
        return 0.5 * lam * sum(((y[k] - x[k]) ** 2).sum() for k in y)

    def g(x, y, batch):
        return f(x, y, batch) + prox(x, y, batch)

    if output_loss:
        g = tb.OutputLoss(logits, lambda out, x, batch: F.cross_entropy(out, batch[1]), prox)
    return tb.Bilevel(outer=f, inner=g)


def protonet_loss(model: CNN4, x, support, query, ways: int):
    """ProtoNet loss of one task (Snell et al. 2017 eq. (1)-(2)): prototypes are the class
    means of the support features; logits −‖z − c_k‖²; cross-entropy on the query."""
    zs = tb.nn.call(model.body, _body(x), {}, support[0])
    zq = tb.nn.call(model.body, _body(x), {}, query[0])
    protos = torch.stack([zs[support[1] == k].mean(0) for k in range(ways)])
    logits = -torch.cdist(zq, protos) ** 2
    return F.cross_entropy(logits, query[1]), logits


def _body(x):
    return {k[len("body."):]: t for k, t in x.items() if k.startswith("body.")}


class MetaState(NamedTuple):
    """State of a meta-learner: x (body, or all weights for iMAML), y (per-task inner start,
    one task's shape), the Adam state of x and the step count."""
    x: dict
    y: dict
    outer: object
    t: int


class MetaLearner:
    """init/step over meta-batches: one step draws a meta-batch from ``inner`` (a
    :class:`TaskSampler`; ``outer`` unused) and takes one Adam step along its meta-gradient."""

    def __init__(self, method: str, model: CNN4, cfg: FewShotConfig):
        self.method, self.model, self.cfg = method, model, cfg
        T, lr = cfg.inner_steps, cfg.lr_y
        if method == "protonet":
            self.fn = None
            return
        if method == "imaml":
            problem = imaml_problem(model, cfg.imaml_lam, output_loss=cfg.imaml_curvature == "gauss_newton")
            est = tb.aid(tb.cg(cfg.imaml_solver_steps), curvature=cfg.imaml_curvature)
            T, lr = cfg.imaml_steps, cfg.imaml_lr
        else:
            problem = anil_problem(model, cfg.reg)
            est = {"itd": tb.itd(T, lr), "aid_cg": tb.aid(tb.cg(cfg.solver_steps)),
                   "aid_fp": tb.aid(tb.fixed_point(cfg.solver_steps, lr)),
                   "pzobo": tb.pzobo(T, lr, cfg.directions, cfg.mu,
                                     generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7)),
                   "pzobo_sphere": tb.pzobo(T, lr, cfg.directions, cfg.mu, distribution="sphere",
                                            generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7)),
                   "first_order": tb.first_order()}[method]
        hg = tb.hypergrad(problem, est)
        presolve = method not in ("itd", "pzobo", "pzobo_sphere")    # those run their own T steps

        def per_task(x, y, support, query):
            if presolve:                # T inner GD steps (no graph), then the estimator at y_T
                with tb.buffers.frozen():
                    y = unroll(problem, x, y, [support] * T, lr, differentiable=False)
                y = {k: v.detach() for k, v in y.items()}
            return hg(x, y, support, query)

        self.fn = tb.over_tasks(per_task, mode=cfg.mode)

    def init(self, x, y) -> MetaState:
        """Start from the model's x; y is the per-task inner start (0 head, or x for iMAML)."""
        if self.method == "imaml":
            x = {**x, **y}
            y = {k: v.clone() for k, v in x.items()}
        else:
            y = {k: torch.zeros_like(v) for k, v in y.items()}
        return MetaState(dict(x), y, outer_init("adam", x), 0)

    def meta_gradient(self, x, y, support, query):
        """The mean over the meta-batch of the per-task hypergradients (ProtoNet: of its loss)."""
        if self.method == "protonet":
            xr = {k: v.detach().requires_grad_(True) for k, v in x.items()}
            with tb.buffers.frozen():
                loss = sum(protonet_loss(self.model, xr, (support[0][i], support[1][i]),
                                         (query[0][i], query[1][i]), self.cfg.ways)[0]
                           for i in range(support[0].shape[0])) / support[0].shape[0]
            grads = torch.autograd.grad(loss, list(xr.values()))
            return dict(zip(xr, grads))
        B = support[0].shape[0]
        ys = {k: (x[k] if self.method == "imaml" else v).expand(B, *v.shape).clone() for k, v in y.items()}
        return self.fn(x, ys, support, query)

    def step(self, state: MetaState, inner, outer=None) -> MetaState:
        """Draw a meta-batch from ``inner``, one Adam step on x along the meta-gradient."""
        support, query = next(inner)
        d = self.meta_gradient(state.x, state.y, support, query)
        x, opt = outer_update("adam", state.outer, state.x, d, self.cfg.lr_x)
        self.last_x = x                 # (the experiment's final meta-test reads it)
        return MetaState(x, state.y, opt, state.t + 1)


def make_data(cfg: FewShotConfig) -> dict:
    """The 40 rotated-digit classes split (seeded) into ``train_classes`` meta-train and
    the rest meta-test classes, disjoint."""
    classes = datasets.rotated_mnist5k_classes().to(cfg.device)
    order = torch.randperm(classes.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    if not cfg.ways <= cfg.train_classes <= classes.shape[0] - cfg.ways:
        raise ValueError(f"train_classes must leave at least ways={cfg.ways} classes on both sides, "
                         f"got {cfg.train_classes} of {classes.shape[0]}")
    return {"train": classes[order[: cfg.train_classes]], "test": classes[order[cfg.train_classes:]],
            "train_ids": order[: cfg.train_classes].tolist(), "test_ids": order[cfg.train_classes:].tolist()}


def _fit_head(z, labels, cfg, steps):
    """GD from 0 on the head's inner objective at fixed features z (no graph to x)."""
    w = torch.zeros(cfg.ways, z.shape[1], device=z.device, requires_grad=True)
    b = torch.zeros(cfg.ways, device=z.device, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(z @ w.T + b, labels) + 0.5 * cfg.reg * ((w * w).sum() + (b * b).sum())
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - cfg.lr_y * gw).detach().requires_grad_(True), (b - cfg.lr_y * gb).detach().requires_grad_(True)
    return w.detach(), b.detach()


def evaluate_tasks(method: str, model: CNN4, cfg: FewShotConfig, x, tasks, losses: list | None = None) -> list:
    """Per-task query accuracies of ``method`` at x on the meta-batches ``tasks`` (and the
    per-task query cross-entropies appended to ``losses`` when a list is given)."""
    accs = []
    steps = cfg.test_steps or cfg.inner_steps
    problem = imaml_problem(model, cfg.imaml_lam) if method == "imaml" else None
    with tb.buffers.frozen(), torch.enable_grad():      # (the runner evaluates under no_grad)
        for support, query in tasks:
            for i in range(support[0].shape[0]):
                s, q = (support[0][i], support[1][i]), (query[0][i], query[1][i])
                if method == "protonet":
                    with torch.no_grad():
                        logits = protonet_loss(model, x, s, q, cfg.ways)[1]
                elif method == "imaml":
                    y = unroll(problem, x, dict(x), [s] * cfg.imaml_steps, cfg.imaml_lr, differentiable=False)
                    with torch.no_grad():
                        logits = tb.nn.call(model, {}, y, q[0])
                else:
                    with torch.no_grad():
                        zs, zq = (tb.nn.call(model.body, _body(x), {}, t[0]) for t in (s, q))
                    w, b = _fit_head(zs, s[1], cfg, steps)
                    logits = zq @ w.T + b
                accs.append(float((logits.argmax(-1) == q[1]).float().mean()))
                if losses is not None:
                    losses.append(float(F.cross_entropy(logits, q[1])))
    return accs


def interval95(values) -> tuple:
    """(mean, half-width of the 95 % interval = 1.96 standard errors)."""
    t = torch.tensor(values, dtype=torch.float64)
    half = 1.96 * float(t.std(unbiased=True)) / math.sqrt(len(t)) if len(t) > 1 else float("nan")
    return float(t.mean()), half


def _fixed_tasks(classes, cfg, count, seed):
    sampler = TaskSampler(classes, cfg.ways, cfg.shots, cfg.queries, min(count, 50), seed)
    out, left = [], count
    while left > 0:
        s, q = next(sampler)
        n = min(left, s[0].shape[0])
        out.append(((s[0][:n], s[1][:n]), (q[0][:n], q[1][:n])))
        left -= n
    return out


class _Evaluator:
    def __init__(self, method, model, cfg, tasks):
        self.method, self.model, self.cfg, self.tasks = method, model, cfg, tasks

    def __call__(self, x, y):
        losses = []
        accs = evaluate_tasks(self.method, self.model, self.cfg, x, self.tasks, losses)
        return {"test_acc": interval95(accs)[0], "test_loss": sum(losses) / len(losses)}


def time_to(record: Sequence[dict], metric: str, target: float):
    """Optimisation seconds at the first row of ``record`` whose ``metric`` reaches ``target``
    (None if never)."""
    for row in record:
        v = row.get(metric)
        if v is not None and v >= target:
            return row["seconds"]
    return None


def run(cfg: FewShotConfig, progress=None) -> list[dict]:
    """Meta-train every configured method from the same CNN4 on the same task stream, and
    evaluate on meta-test tasks; rows of (method, step, seconds, test_acc), the last row of
    each method with ``final_acc``, ``ci95`` (over ``test_tasks`` tasks) and ``t_target``."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    data = make_data(cfg)
    torch.manual_seed(cfg.seed)
    model = CNN4(cfg.width, cfg.ways).to(cfg.device).train()
    x0, y0 = tb.nn.split(model, inner=["head"])
    curve_tasks = _fixed_tasks(data["test"], cfg, cfg.eval_tasks, cfg.seed + 1000)
    record = []
    for k, key in enumerate(cfg.methods):
        learner = MetaLearner(key, model, cfg)
        stream = TaskSampler(data["train"], cfg.ways, cfg.shots, cfg.queries, cfg.meta_batch, cfg.seed + 100)
        method = Method(LABELS[key], learner, stream, None, cfg.steps, cfg.eval_every, cfg.eval_seconds)
        rows = run_methods([method], dict(x0), dict(y0), _Evaluator(key, model, cfg, curve_tasks), cfg.seconds,
                           progress, cfg.device)
        last = rows[-1]
        if "diverged" not in last and getattr(learner, "last_x", None) is not None:
            test = _fixed_tasks(data["test"], cfg, cfg.test_tasks, cfg.seed + 2000)
            acc, half = interval95(evaluate_tasks(key, model, cfg, learner.last_x, test))
            last.update(final_acc=acc, ci95=half, t_target=time_to(rows, "test_acc", cfg.target_acc))
        record += rows
    return record
