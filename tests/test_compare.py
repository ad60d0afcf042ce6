"""The comparison experiment at a tiny size: every method runs, the budgets and the tuning
are applied as documented, and the quadratic's ∇Φ is the closed form."""
import math

import pytest
import torch

from torchbilevel.experiments import compare


def tiny(**kw):
    base = dict(grid=(0.1, 0.3), oracles=120, seconds=None, n_seeds=2, n=64, p=3, d=4, batch_size=8,
                eval_every=20, inner_steps=2, solver_steps=2)
    return compare.CompareConfig(**{**base, **kw})


def test_closed_form_hypergradient_matches_a_converged_aid_estimate():
    prob, grad_phi = compare.finite_sum_quadratic(n=32, p=3, d=4)
    x = {"h": torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    full = torch.arange(32)
    y = {"w": torch.zeros(4, dtype=torch.float64)}
    for _ in range(100):                       # inner solution by gradient descent
        y = {"w": y["w"] - 0.4 * torch.func.grad(prob.inner, argnums=1)(x, y, full)["w"]}
    dx = tb_hypergrad(prob)(x, y, full, full)["h"]
    torch.testing.assert_close(dx, grad_phi(x["h"]), rtol=1e-8, atol=1e-10)


def tb_hypergrad(prob):
    import torchbilevel as tb
    return tb.hypergrad(prob, tb.aid(tb.cg(steps=20)))


def test_every_method_runs_and_the_summary_tunes_within_the_budget():
    c = tiny()
    record = compare.run_grid(c)
    assert {r["method"] for r in record} == set(compare.METHODS)
    for name in compare.METHODS:
        per_step = compare.oracles_per_step(name, c)
        for lr in c.grid:
            for seed in (0, 1):
                rows = [r for r in record if (r["method"], r["lr"], r["seed"]) == (name, lr, seed)]
                assert rows[0]["grad_ratio"] == 1.0 and rows[0]["oracles"] == 0
                last = rows[-1]
                # stops at the first evaluation past the oracle budget (or on divergence)
                every = max(1, c.eval_every // per_step)
                assert last.get("diverged") or c.oracles <= last["oracles"] < c.oracles + every * per_step
    table = compare.summary(record, c)
    assert [r["method"] for r in table] == [compare.LABELS[m] for m in compare.METHODS]
    for row in table:
        assert row["lr@oracles"] in c.grid
        assert row["best@oracles"] <= row["median@oracles"] <= row["worst@oracles"]
    text = compare.format_summary(table, c)
    assert "SOBA" in text and "oracle calls" in text


def test_run_returns_the_tuned_median_curves_and_time_budget():
    c = tiny(methods=("soba", "f2sa"), seconds=0.05, oracles=30)
    out = compare.run(c)
    assert {r["method"] for r in out} == {"SOBA", "F2SA"}
    assert all(math.isfinite(r["seconds"]) and r["lr"] in c.grid for r in out)
    rows = compare.summary(compare.run_grid(c), c)
    assert all("lr@seconds" in r for r in rows)


def test_config_rejects_unknown_methods_and_bad_grid():
    with pytest.raises(ValueError, match="unknown methods"):
        compare.CompareConfig(methods=("nope",))
    with pytest.raises(ValueError, match="grid"):
        compare.CompareConfig(grid=(0.0,))


def test_cli_runs_the_comparison(tmp_path, capsys):
    from torchbilevel import __main__ as cli
    out = tmp_path / "compare.png"
    code = cli.main(["run", "compare", "--methods", "soba,bome", "--steps", "10", "--seconds", "none",
                     "--set", "grid=0.1,0.3", "--set", "n_seeds=1", "--set", "eval_every=20", "--no-progress",
                     "--out", str(out)])
    assert code == 0 and out.exists() and (tmp_path / "compare.csv").exists()
    text = capsys.readouterr().out
    assert "SOBA" in text and "BOME" in text and "score" in text
