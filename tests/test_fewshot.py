"""The few-shot experiment at a tiny size: every method row present with finite accuracies
and 95 % intervals, meta-train and meta-test classes disjoint, tasks built from the classes
they name, ProtoNet's loss re-derived by hand, the loop and vmap modes train the same
network, and `python -m torchbilevel run fewshot` writes its table, PNG and CSV."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchbilevel import __main__ as cli
from torchbilevel import datasets
from torchbilevel.experiments import fewshot
from torchbilevel.experiments.records import final_rows, methods_in

TINY = dict(ways=3, shots=1, queries=2, meta_batch=2, width=4, steps=2, seconds=None, eval_every=1,
            eval_seconds=None, eval_tasks=2, test_tasks=4, inner_steps=2, solver_steps=2, imaml_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rotated_classes_are_rotations_of_the_digits():
    classes = datasets.rotated_mnist5k_classes()
    assert classes.shape == (40, 500, 1, 28, 28)
    for digit in (0, 7):
        base = classes[4 * digit]
        for k in range(1, 4):
            assert torch.equal(classes[4 * digit + k], torch.rot90(base, k, dims=(2, 3)))
    feats, labels = datasets.load_mnist5k(seed=0)
    assert torch.equal(torch.sort(base.flatten(1).sum(1)).values,
                       torch.sort(feats[labels == 7].sum(1)).values)


def test_meta_train_and_meta_test_classes_are_disjoint_and_tasks_use_them():
    cfg = fewshot.FewShotConfig(**TINY)
    data = fewshot.make_data(cfg)
    assert not set(data["train_ids"]) & set(data["test_ids"])
    assert len(data["train_ids"]) + len(data["test_ids"]) == 40
    (xs, ls), (xq, lq) = next(fewshot.TaskSampler(data["train"], 3, 2, 4, tasks=2, seed=0))
    assert xs.shape == (2, 6, 1, 28, 28) and xq.shape == (2, 12, 1, 28, 28)
    flat = data["train"].flatten(2)
    for t in range(2):
        for k in range(3):
            # every image labelled k in a task comes from one and the same meta-train class
            imgs = torch.cat([xs[t][ls[t] == k], xq[t][lq[t] == k]]).flatten(1)
            owners = {int(c) for im in imgs for c in torch.nonzero((flat == im).all(-1).any(-1)).flatten()}
            assert len(owners) == 1


def test_protonet_loss_matches_a_hand_derivation():
    torch.manual_seed(0)
    model = fewshot.CNN4(4, 3).train()
    x = {k: v.detach() for k, v in model.named_parameters() if k.startswith("body.")}
    s = (torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2]))
    q = (torch.rand(3, 1, 28, 28), torch.tensor([2, 0, 1]))
    loss, _ = fewshot.protonet_loss(model, x, s, q, 3)
    zs, zq = model.body(s[0]), model.body(q[0])
    protos = torch.stack([(zs[k] + zs[k + 3]) / 2 for k in range(3)])
    d = ((zq[:, None, :] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(loss, F.cross_entropy(-d, q[1]), rtol=1e-5, atol=1e-6)


def test_interval_and_time_to_target():
    mean, half = fewshot.interval95([0.0, 1.0] * 50)
    assert mean == 0.5 and abs(half - 1.96 * math.sqrt(0.25 * 100 / 99) / 10) < 1e-12
    rows = [{"seconds": 1.0, "test_acc": 0.3}, {"seconds": 2.0, "test_acc": 0.9}]
    assert fewshot.time_to(rows, "test_acc", 0.8) == 2.0 and fewshot.time_to(rows, "test_acc", 0.95) is None


def test_every_method_runs_with_intervals():
    cfg = fewshot.FewShotConfig(**TINY)
    record = fewshot.run(cfg)
    assert methods_in(record) == [fewshot.LABELS[m] for m in fewshot.METHODS]
    for row in final_rows(record):
        assert "diverged" not in row, row
        assert row["step"] == 2 and row["seconds"] > 0
        assert 0.0 <= row["final_acc"] <= 1.0 and math.isfinite(row["ci95"]) and row["ci95"] >= 0
        assert 0.0 <= row["test_acc"] <= 1.0


def test_loop_and_vmap_modes_train_the_same_network():
    out = {}
    for mode in ("loop", "vmap"):
        cfg = fewshot.FewShotConfig(methods=("itd", "aid_cg"), mode=mode, **TINY)
        out[mode] = {r["method"]: r["test_acc"] for r in fewshot.run(cfg)}
    assert out["loop"] == out["vmap"]


def test_cli_runs_fewshot(tmp_path, capsys):
    png = tmp_path / "fs.png"
    sets = [a for k, v in TINY.items() if k not in ("steps", "seconds") for a in ("--set", f"{k}={v}")]
    code = cli.main(["run", "fewshot", "--methods", "itd,protonet", "--steps", "2", "--seconds", "none",
                     "--no-progress", "--out", str(png), *sets])
    assert code == 0 and png.exists() and png.with_suffix(".csv").exists()
    text = capsys.readouterr().out
    assert "ITD-BiO (ANIL)" in text and "ProtoNet" in text and "ci95" in text


def test_imaml_hessian_variant_runs():
    cfg = fewshot.FewShotConfig(methods=("imaml",), imaml_curvature="hessian", imaml_lam=50.0, **TINY)
    (row,) = final_rows(fewshot.run(cfg))
    assert "diverged" not in row and 0.0 <= row["final_acc"] <= 1.0


def test_imaml_defaults_are_inside_its_assumptions_at_the_meta_initialisation():
    # issue 24: at λ = 2 the proximal problem of CNN4 is not convex (the Hessian solve meets
    # non-positive curvature); the default solves with the Gauss-Newton matrix (positive
    # definite: CG converges, no warning) and keeps the inner lr below 2/L
    import warnings

    import torchbilevel as tb
    from torchbilevel.estimators.base import unroll
    cfg = fewshot.FewShotConfig()
    assert cfg.imaml_curvature == "gauss_newton"
    data = fewshot.make_data(cfg)
    torch.manual_seed(0)
    model = fewshot.CNN4(cfg.width, cfg.ways).train()
    x = {k: v.detach() for k, v in model.named_parameters()}
    (sx, sl), (qx, ql) = next(fewshot.TaskSampler(data["train"], cfg.ways, cfg.shots, cfg.queries, 1, 5))
    s, q = (sx[0], sl[0]), (qx[0], ql[0])
    problem = fewshot.imaml_problem(model, cfg.imaml_lam, output_loss=True)
    with tb.buffers.frozen():
        y = unroll(problem, x, dict(x), [s] * cfg.imaml_steps, cfg.imaml_lr, differentiable=False)
    y = {k: v.detach() for k, v in y.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)        # no indefinite-solve warning
        est = tb.aid(tb.cg(cfg.imaml_solver_steps), curvature=cfg.imaml_curvature)
        _, aux = tb.hypergrad(problem, est, has_aux=True)(x, y, s, q)
    assert int(aux.solve.nonpositive_curvature) == 0 and float(aux.solve.residual) < 1e-2
    hess = tb.aid(tb.cg(cfg.imaml_solver_steps, indefinite="truncate"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, aux_h = tb.hypergrad(problem, hess, has_aux=True)(x, y, s, q)
    assert int(aux_h.solve.nonpositive_curvature) > 0             # why not the Hessian at λ = 2
    # the largest eigenvalue of ∇yy g by power iteration: lr < 2/L
    yr = {k: v.clone().requires_grad_(True) for k, v in y.items()}
    with tb.buffers.frozen():
        gr = torch.autograd.grad(problem.inner(x, yr, s), list(yr.values()), create_graph=True)
    v = [torch.randn_like(t) for t in gr]
    for _ in range(15):
        n = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / n for t in v]
        hv = torch.autograd.grad(gr, list(yr.values()), v, retain_graph=True)
        lam_max = float(sum((a * b).sum() for a, b in zip(v, hv)))
        v = list(hv)
    assert cfg.imaml_lr < 2.0 / lam_max
