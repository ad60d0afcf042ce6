"""Experiments at tiny sizes: every method row present and timed, finite metrics,
the learned hyper-cleaning weights separate corrupted samples, exact references are exact,
and the demo / CLI write their table, PNG and CSV."""
import math
import time
from typing import NamedTuple

import pytest
import torch

from torchbilevel import __main__ as cli
from torchbilevel import datasets
from torchbilevel.experiments import EXPERIMENTS, deep_hr, hyperclean, shallow_hr, weight_decay
from torchbilevel.experiments.demo import demo
from torchbilevel.experiments.hozog import zeroth_order_hypergrad
from torchbilevel.experiments.metrics import auc
from torchbilevel.experiments.records import final_rows, format_table, methods_in
from torchbilevel.experiments.runner import Method, run_method
from torchbilevel.experiments.streams import minibatches

TINY_HC = dict(n_train=300, n_val=200, n_test=200, steps=6, seconds=None, eval_every=3,
               eval_seconds=None, batch_size=100, inner_steps=3, solver_steps=3,
               baseline_steps=6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_rows(record, labels, metric_names):
    assert methods_in(record) == labels
    for row in final_rows(record):
        assert "diverged" not in row, row
        assert row["seconds"] > 0 and row["step"] >= 1
        for name in metric_names:
            value = row[name]
            assert value is None or math.isfinite(value), (row["method"], name, value)


# ----------------------------------------------------------------- small pieces

def test_auc_rank_form():
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auc(torch.ones(6), torch.tensor([0, 1, 0, 1, 0, 1])) == 0.5
    # one tie between a positive and a negative counts one half: (1 + 0.5 + 1 + 1) / 4
    assert auc(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 1])) == 0.875
    assert math.isnan(auc(torch.ones(3), torch.ones(3)))


def test_corrupt_labels_always_changes_to_another_class():
    labels = torch.arange(10).repeat(500)
    noisy, flipped = hyperclean.corrupt_labels(labels, 0.4, 10, torch.Generator().manual_seed(0))
    assert torch.equal(noisy != labels, flipped)
    assert abs(flipped.float().mean().item() - 0.4) < 0.03
    # the new class is uniform over the 9 others
    counts = torch.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].max()


def test_minibatches_are_seeded_and_cover_an_epoch():
    data = torch.arange(10.0)
    a, b = minibatches(data, batch_size=5, seed=1, with_index=True), minibatches(data, batch_size=5, seed=1)
    first, second = next(a), next(a)
    assert torch.equal(first[1], next(b)[0])
    assert sorted(torch.cat([first[0], second[0]]).tolist()) == list(range(10))
    with pytest.raises(ValueError):
        minibatches(data, batch_size=11, seed=0)


class _State(NamedTuple):
    x: dict
    y: dict


class _SlowEvalAlgo:
    def init(self, x, y):
        return _State(x, y)

    def step(self, state, inner, outer):
        return _State(state.x, {"w": state.y["w"] + 1})


def test_runner_times_only_the_steps():
    def slow_eval(x, y):
        time.sleep(0.05)
        return {"w": float(y["w"])}

    rows = run_method(Method("m", _SlowEvalAlgo(), None, None, steps=4, eval_every=1),
                      {"x": torch.zeros(1)}, {"w": torch.zeros(())}, slow_eval)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["w"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rows[-1]["seconds"] < 0.05  # five 50 ms evaluations are not counted


def test_runner_records_divergence():
    class Diverges(_SlowEvalAlgo):
        def step(self, state, inner, outer):
            raise FloatingPointError("non-finite hypergradient")

    rows = run_method(Method("m", Diverges(), None, None, steps=3), {"x": torch.zeros(1)},
                      {"w": torch.zeros(())}, lambda x, y: {}, warmup=False)
    assert rows[-1]["diverged"] == "non-finite hypergradient" and len(rows) == 2


# ------------------------------------------------------------------ experiments

def test_hyperclean_every_method_runs_and_cleaning_separates():
    cfg = hyperclean.HypercleanConfig(corruption=0.4, **TINY_HC)
    record = hyperclean.run(cfg)
    _check_rows(record, [hyperclean.LABELS[m] for m in hyperclean.METHODS],
                ["val_loss", "val_acc", "test_loss", "test_acc", "auc"])
    last = {r["method"]: r for r in final_rows(record)}
    # baselines learn no weights; bilevel methods give every training sample one
    assert last["train on noisy"]["auc"] is None and last["AID-CG"]["auc"] is not None
    # the clean-only oracle beats training on 40 % corrupted labels
    assert last["train on clean only"]["test_loss"] < last["train on noisy"]["test_loss"]
    for name in ("AID-CG", "AID-FP", "ITD", "stocBiO", "FMBO", "FdeHBO"):
        assert last[name]["auc"] > 0.6, (name, last[name]["auc"])


def test_hyperclean_longer_aid_run_beats_noisy_training():
    cfg = hyperclean.HypercleanConfig(corruption=0.4, methods=("aid_fp", "noisy"),
                                      **{**TINY_HC, "steps": 40, "baseline_steps": 40, "eval_every": 40})
    last = {r["method"]: r for r in final_rows(hyperclean.run(cfg))}
    assert last["AID-FP"]["auc"] > 0.75
    assert last["AID-FP"]["test_acc"] > last["train on noisy"]["test_acc"]


def test_hyperclean_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown methods"):
        hyperclean.run(hyperclean.HypercleanConfig(methods=("nope",), **{k: v for k, v in TINY_HC.items()}))


def test_shallow_hr_exact_hypergradient_matches_finite_differences():
    cfg = shallow_hr.ShallowHRConfig(p=4, d=6, n=30)
    data = shallow_hr.make_data(cfg)
    x, _ = shallow_hr.initial_point(cfg)
    phi, grad = shallow_hr.exact_hypergradient(x, data, cfg.gamma)
    direction = torch.randn(x["H"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-6
    plus, _ = shallow_hr.exact_hypergradient({"H": x["H"] + eps * direction}, data, cfg.gamma)
    minus, _ = shallow_hr.exact_hypergradient({"H": x["H"] - eps * direction}, data, cfg.gamma)
    assert (plus - minus) / (2 * eps) == pytest.approx(float((grad["H"] * direction).sum()), rel=1e-6)
    # the ridge solution is the inner minimiser: zero inner gradient there
    w = shallow_hr.ridge_solution(x, data["train"], cfg.gamma).requires_grad_(True)
    (g,) = torch.autograd.grad(shallow_hr.inner_loss(cfg.gamma)(x, {"w": w}, data["train"]), [w])
    assert g.abs().max() < 1e-10


@pytest.mark.parametrize("embedding", ["linear", "two_layer"])
def test_shallow_hr_all_methods(embedding):
    cfg = shallow_hr.ShallowHRConfig(embedding=embedding, p=6, d=8, n=40, hidden=5, steps=30,
                                     seconds=None, eval_every=30, eval_seconds=None,
                                     lr_x=0.1, pzobo_lr_x=1e-3, hozog_lr_x=1e-3,
                                     pzobo_sphere_lr_x=0.1, first_order_lr_x=0.1)
    record = shallow_hr.run(cfg)
    _check_rows(record, [shallow_hr.LABELS[m] for m in shallow_hr.METHODS],
                ["val_loss", "phi", "test_loss", "grad_norm", "hypergrad_error"])
    last = {r["method"]: r for r in final_rows(record)}
    first = {r["method"]: r for r in record if r["step"] == 0}
    # AID-CG at a warm inner iterate is accurate (far more than the zeroth-order
    # estimates with one direction) and decreases Φ
    assert last["AID-CG"]["hypergrad_error"] < (0.2 if embedding == "linear" else 0.5)
    assert last["AID-CG"]["hypergrad_error"] < last["PZOBO"]["hypergrad_error"]
    assert last["AID-CG"]["hypergrad_error"] < last["HOZOG (full ZO)"]["hypergrad_error"]
    assert last["AID-CG"]["phi"] < first["AID-CG"]["phi"]


def test_zeroth_order_baseline_estimates_the_hypergradient():
    cfg = shallow_hr.ShallowHRConfig(p=2, d=3, n=30)
    data = shallow_hr.make_data(cfg)
    x, _ = shallow_hr.initial_point(cfg)
    _, exact = shallow_hr.exact_hypergradient(x, data, cfg.gamma)
    w_star = {"w": shallow_hr.ridge_solution(x, data["train"], cfg.gamma)}
    estimate, _ = zeroth_order_hypergrad(
        shallow_hr.outer_loss, shallow_hr.inner_loss(cfg.gamma), x, w_star, data["train"],
        data["val"], steps=10, lr=0.5, directions=150, mu=1e-4,
        generator=torch.Generator().manual_seed(0))
    cos = float((estimate["H"] * exact["H"]).sum() / (estimate["H"].norm() * exact["H"].norm()))
    assert cos > 0.9


def test_deep_hr_all_methods():
    cfg = deep_hr.DeepHRConfig(n_inner=64, n_outer=64, n_test=64, batch_size=32, steps=2,
                               seconds=None, eval_every=2, eval_seconds=None, inner_steps=2,
                               solver_steps=2)
    record = deep_hr.run(cfg)
    _check_rows(record, [deep_hr.LABELS[m] for m in deep_hr.METHODS],
                ["outer_loss", "outer_acc", "test_loss", "test_acc"])
    model, x, y = deep_hr.initial_point(cfg)
    assert any(k.startswith("body.") for k in x) and set(y) == {"head.weight", "head.bias"}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in record)


TINY_DEEP = dict(n_inner=64, n_outer=64, n_test=64, batch_size=32, steps=2, seconds=None,
                 eval_every=2, eval_seconds=None, inner_steps=2, solver_steps=2)


def test_deep_hr_declared_features_give_the_undeclared_numbers():
    methods = ("aid_cg", "pzobo_s_sphere", "first_order", "fdehbo")
    last = {}
    for declared in (False, True):
        cfg = deep_hr.DeepHRConfig(methods=methods, declared_features=declared, **TINY_DEEP)
        assert (deep_hr.problem_of(deep_hr.initial_point(cfg)[0], cfg).features is not None) == declared
        last[declared] = {r["method"]: r for r in final_rows(deep_hr.run(cfg))}
    for name, row in last[False].items():
        for metric in ("outer_loss", "test_loss"):
            assert abs(row[metric] - last[True][name][metric]) < 1e-6, (name, metric)


def test_deep_hr_body_with_batchnorm_and_dropout():
    cfg = deep_hr.DeepHRConfig(body_norm_dropout=True, **TINY_DEEP)
    model, _, _ = deep_hr.initial_point(cfg)
    kinds = {type(m) for m in model.modules()}
    assert {torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.Dropout} <= kinds and model.training
    record = deep_hr.run(cfg)
    _check_rows(record, [deep_hr.LABELS[m] for m in deep_hr.METHODS],
                ["outer_loss", "outer_acc", "test_loss", "test_acc"])
    # every method starts from the same running statistics (evaluated in eval mode)
    starts = {r["outer_loss"] for r in record if r["step"] == 0}
    assert len(starts) == 1


def test_pzobo_direction_rules_and_first_order_are_registered():
    from torchbilevel.experiments.methods import Hyper, estimator
    hp = Hyper(lr_x=0.1, lr_y=0.1)
    assert estimator("pzobo", hp).distribution == "gaussian"
    assert estimator("pzobo_s", hp).distribution == "gaussian"
    assert estimator("pzobo_sphere", hp).distribution == "sphere"
    assert estimator("pzobo_s_sphere", hp).distribution == "sphere"
    assert type(estimator("first_order", hp)).__name__ == "FirstOrder"
    assert {"pzobo_sphere", "first_order"} <= set(shallow_hr.METHODS)
    assert {"pzobo_s_sphere", "first_order"} <= set(deep_hr.METHODS)


def test_weight_decay_all_methods_move_lambda():
    cfg = weight_decay.WeightDecayConfig(dataset="breast_cancer", steps=5, seconds=None,
                                         eval_every=5, eval_seconds=None, inner_steps=3,
                                         solver_steps=3)
    record = weight_decay.run(cfg)
    _check_rows(record, [weight_decay.LABELS[m] for m in weight_decay.METHODS],
                ["val_loss", "test_loss", "test_acc", "mean_lam"])
    last = {r["method"]: r for r in final_rows(record)}
    assert last["fixed decay (λ=0)"]["mean_lam"] == 0.0
    assert last["AID-CG"]["mean_lam"] != 0.0
    assert last["AID-CG"]["test_acc"] > 0.8


# ------------------------------------------------------------------ demo and CLI

def test_demo_function_writes_table_png_and_csv(tmp_path):
    cfg = hyperclean.HypercleanConfig(methods=("aid_cg", "fmbo", "noisy"), **TINY_HC)
    out = tmp_path / "plots" / "demo.png"
    result = demo("hyperclean", cfg, out=str(out), progress=False)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plots" / "demo.csv").read_text().startswith("method,step,seconds")
    for label in ("AID-CG", "FMBO", "train on noisy"):
        assert label in result.table
    assert result.table.splitlines()[0].split() == ["method", "step", "seconds", "test_acc",
                                                    "test_loss", "val_loss", "auc"]


def test_main_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "d.png"
    code = cli.main(["demo", "--methods", "aid_fp,noisy", "--steps", "3", "--seconds", "none",
                     "--out", str(out), "--no-progress", "--set", "n_train=200",
                     "--set", "n_val=100", "--set", "n_test=100", "--set", "eval_seconds=none"])
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "AID-FP" in printed and "train on noisy" in printed and str(out) in printed


def test_main_run_subcommand(tmp_path, capsys):
    out = tmp_path / "wd.png"
    code = cli.main(["run", "weight_decay", "--methods", "aid_cg,fixed", "--steps", "2",
                     "--seconds", "none", "--out", str(out), "--no-progress",
                     "--set", "dataset=breast_cancer"])
    assert code == 0 and out.exists() and "AID-CG" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["demo", "--methods", "aid_cg,bogus"], "unknown ['bogus']"),
    (["demo", "--steps", "0"], "positive integer"),
    (["demo", "--seconds", "soon"], "expected seconds"),
    (["demo", "--set", "nonsense=1"], "FIELD=VALUE"),
    (["demo", "--device", "tpu9"], "--device"),
    (["run", "no_such_experiment"], "invalid choice"),
])
def test_main_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_main_rejects_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_main_reports_missing_data(monkeypatch, capsys, tmp_path):
    def missing(*args, **kwargs):
        raise datasets.DataUnavailableError('MNIST is missing: pip install "torchbilevel[demo]"')

    monkeypatch.setattr(datasets, "load_mnist5k", missing)
    code = cli.main(["demo", "--no-progress", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "torchbilevel[demo]" in capsys.readouterr().err


def test_every_experiment_is_registered_with_a_table():
    from torchbilevel.experiments.demo import PLOTS, TABLE_COLUMNS
    assert set(EXPERIMENTS) == set(TABLE_COLUMNS) == set(PLOTS)
    text = format_table([{"method": "a", "x": 1.0}, {"method": "b"}], ["method", "x"])
    assert text.splitlines()[-1].split() == ["b", "-"]


# ------------------------------------------------------------------ help text, out paths, table, plot

@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["run", "--help"]])
def test_help_lists_experiments_methods_and_defaults(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text  # no raw reST markup
    for name, (module, config_cls) in EXPERIMENTS.items():
        assert name in text and cli.EXPERIMENT_LINES[name][:30] in text
        for key in module.METHODS:
            assert key in text, (name, key)
        assert f"{config_cls().seconds:g} s or {config_cls().steps} steps" in text
    if argv != ["--help"]:
        # every option says its default
        for option in ("--methods", "--out", "--steps", "--seconds", "--seed", "--device", "--threads",
                       "--set", "--no-progress"):
            block = text.split("options:", 1)[1].split("\n  " + option, 1)[1].split("\n  -", 1)[0]
            assert "default" in " ".join(block.split()), option
    if argv == ["run", "--help"]:
        assert "out/<NAME>.png" in text and "demo_" not in text.split("options:")[1].split("experiments")[0]
    if argv == ["demo", "--help"]:
        assert "out/demo_<experiment>.png" in text and "(default: hyperclean)" in text


def test_default_out_paths_match_the_help(tmp_path, monkeypatch, capsys):
    """Without --out, `run NAME` writes out/NAME.png and `demo` writes out/demo_<experiment>.png."""
    monkeypatch.chdir(tmp_path)
    common = ["--steps", "2", "--seconds", "none", "--no-progress", "--set", "dataset=breast_cancer"]
    assert cli.main(["run", "weight_decay", "--methods", "aid_cg", *common]) == 0
    assert (tmp_path / "out" / "weight_decay.png").exists() and (tmp_path / "out" / "weight_decay.csv").exists()
    assert cli.main(["demo", "--experiment", "weight_decay", "--methods", "fixed", *common]) == 0
    assert (tmp_path / "out" / "demo_weight_decay.png").exists()
    printed = capsys.readouterr().out
    assert "plot: out/weight_decay.png" in printed and "plot: out/demo_weight_decay.png" in printed
    assert cli.default_out("run", "x") == "out/x.png" and cli.default_out("demo", "x") == "out/demo_x.png"


def test_table_has_fixed_decimals_units_and_the_pzobo_note():
    from torchbilevel.experiments.demo import table
    cfg = hyperclean.HypercleanConfig(methods=("aid_cg", "pzobo_s", "noisy"), **TINY_HC)
    record = [{"method": "AID-CG", "step": 6, "seconds": 0.5, "test_acc": 0.9, "test_loss": 0.41234567,
               "val_loss": 0.4, "auc": 0.95},
              {"method": "PZOBO-S", "step": 6, "seconds": 1.23456, "test_acc": 0.87654, "test_loss": 1.0,
               "val_loss": 1.0, "auc": 0.5},
              {"method": "train on noisy", "step": 6, "seconds": 0.1, "test_acc": 0.7, "test_loss": 1.1,
               "val_loss": 1.0, "auc": None}]
    text = table("hyperclean", cfg, record)
    rows = [line.split() for line in text.splitlines()[2:4]]
    assert rows[0][2:] == ["0.50", "0.900", "0.4123", "0.4000", "0.950"]  # fixed decimals per column
    assert rows[1][2:] == ["1.23", "0.877", "1.0000", "1.0000", "0.500"]
    assert "auc: AUC" in text and "cross-entropy, nats" in text
    assert any(line.startswith("Note: PZOBO-S") for line in text.splitlines())
    no_pzobo = table("hyperclean", cfg, [record[0]])
    assert "Note:" not in no_pzobo


def test_shallow_hr_table_says_what_hypergrad_error_is():
    from torchbilevel.experiments.demo import table
    cfg = shallow_hr.ShallowHRConfig()
    text = table("shallow_hr", cfg, [{"method": "AID-CG", "step": 1, "seconds": 0.1, "phi": 0.5,
                                      "test_loss": 0.5, "grad_norm": 1.0, "hypergrad_error": 1e-3}])
    assert "1.000e-03" in text and "hypergrad_error: relative error ‖ĝ − ∇Φ‖/‖∇Φ‖" in text


def test_plot_is_150_dpi_with_labels_and_one_marker_per_method(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from torchbilevel.experiments import plotting
    record = [{"method": m, "seconds": float(t), "a": float(t) + i, "b": None if m == "base" else float(t)}
              for i, m in enumerate(["m1", "m2", "base"]) for t in range(5)]
    seen = {}
    original = plt.Figure.savefig

    def spy(fig, path, **kw):
        seen["dpi"] = kw.get("dpi")
        seen["labels"] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        seen["markers"] = [[(ln.get_label(), ln.get_marker(), ln.get_color()) for ln in ax.get_lines()]
                           for ax in fig.axes]
        seen["legends"] = len(fig.legends)
        return original(fig, path, **kw)

    plt.Figure.savefig = spy
    try:
        plotting.plot_curves(record, str(tmp_path / "p.png"), ["a", "b"], xlabel="time (s)",
                             ylabels=["loss (nats)", "auc"], title="setting")
    finally:
        plt.Figure.savefig = original
    assert seen["dpi"] >= 150 and seen["legends"] == 1
    assert seen["labels"] == [("time (s)", "loss (nats)"), ("time (s)", "auc")]
    left, right = seen["markers"]
    assert [m[0] for m in left] == ["m1", "m2", "base"] and [m[0] for m in right] == ["m1", "m2"]
    assert left[:2] == right  # same marker and colour for a method on every panel
    assert len({m[1] for m in left}) == 3


def test_progress_bar_time_left_is_the_unspent_budget():
    from torchbilevel.experiments.demo import progress_bar
    pytest.importorskip("tqdm")
    import io
    bar = progress_bar(100.0, "x", unit="s")
    bar.fp = io.StringIO()
    bar.start_t -= 50.0  # 50 s of wall-clock passed (say, data loading) ...
    bar.update(1.0)      # ... but only 1 s of the 100 s budget spent
    text = str(bar)
    bar.close()
    assert "~01:39 left" in text  # 99 s of budget left, not an extrapolation of 50 s per second
