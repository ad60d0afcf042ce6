"""Runs own their decisions (issue 17): every algorithm's state carries what its run
decided, so (a) resume through a newly built algorithm object — in process and in a fresh
process — equals the straight run bit for bit, (b) two runs interleaved on one algorithm
object equal the same runs alone, and (c) a run under torch.compile takes the decisions
of the eager run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchbilevel as tb

BUILD = textwrap.dedent('''
    import torch
    import torchbilevel as tb

    def problem(seed=0, dtype=torch.float32):
        W1 = torch.randn(6, 5, generator=torch.Generator().manual_seed(99), dtype=dtype) * 0.5   # the model
        gen = torch.Generator().manual_seed(seed)                                            # data, start
        X, t = torch.randn(24, 5, generator=gen, dtype=dtype), torch.randn(24, generator=gen, dtype=dtype)

        def net(x, y, X):
            return torch.tanh(X @ (W1 * x["s"]).T) @ y["w"] + y["b"]

        def inner(x, y, b):
            return ((net(x, y, b[0]) - b[1]) ** 2).mean() + 0.05 * (y["w"] ** 2).sum()

        def outer(x, y, b):
            return ((net(x, y, b[0]) - b[1]) ** 2).mean() + 0.01 * (x["s"] ** 2).sum()

        x = {"s": torch.ones(6, 5, dtype=dtype)}
        y = {"w": torch.randn(6, generator=gen, dtype=dtype) * 0.1, "b": torch.zeros((), dtype=dtype)}
        return tb.Bilevel(outer=outer, inner=inner), x, y, (X, t)

    def algorithms(prob):
        gen = torch.Generator().manual_seed(3)
        common = dict(lr_x=0.05, lr_y=0.2)
        return {
            "fdehbo": tb.fdehbo(prob, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0, **common),
            "fmbo": tb.fmbo(prob, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0, **common),
            "soba": tb.soba(prob, lr_v=0.2, **common),
            "ma_soba": tb.ma_soba(prob, lr_v=0.2, **common),
            "mrbo": tb.mrbo(prob, **common),
            "f2sa": tb.f2sa(prob, lr_z=0.2, **common),
            "bome": tb.bome(prob, **common),
            "double_loop-aid-cg": tb.double_loop(prob, tb.aid(tb.cg(4)), inner_steps=2, **common),
            "double_loop-aid-fixed_point": tb.double_loop(prob, tb.aid(tb.fixed_point(4, 0.2)), inner_steps=2,
                                                          **common),
            "double_loop-itd": tb.double_loop(prob, tb.itd(3, 0.2), inner_steps=0, **common),
            "double_loop-stocbio": tb.double_loop(prob, tb.stocbio(4, 0.2), inner_steps=2, **common),
            "double_loop-pzobo": tb.double_loop(prob, tb.pzobo(3, 0.2, 3, 1e-2, generator=gen), inner_steps=0,
                                                **common),
            "double_loop-first_order": tb.double_loop(prob, tb.first_order(), inner_steps=2, **common),
            # the family completed in the third round (SABA/SRBA: one (index, batch) pair, n = 1)
            "saba": tb.saba(prob, lr_v=0.2, n_inner=1, n_outer=1, **common),
            "srba": tb.srba(prob, lr_v=0.2, n_inner=1, n_outer=1, **common),
            "amigo": tb.amigo(prob, lr_v=0.2, **common),
            "vrbo": tb.vrbo(prob, lr_v=0.2, **common),
            "ttsa": tb.ttsa(prob, **common),
            "fsla": tb.fsla(prob, lr_v=0.2, **common),
        }

    def batch_for(name, b):
        """SABA and SRBA draw (index, batch) pairs."""
        return (0, b) if name in ("saba", "srba") else b
''')
_NS: dict = {}
exec(BUILD, _NS)  # the same code runs in the fresh process below
problem, algorithms, batch_for = _NS["problem"], _NS["algorithms"], _NS["batch_for"]

NAMES = list(algorithms(problem()[0]))
SPLIT, TOTAL = 8, 14


def flat_x(algo, s):
    return torch.cat([t.reshape(-1) for t in s.x.values()])


def straight(name):
    prob, x, y, b = problem()
    algo = algorithms(prob)[name]
    s = algo.init(x, y)
    b = batch_for(name, b)
    for _ in range(TOTAL):
        s = algo.step(s, b, b)
    return flat_x(algo, s)


@pytest.mark.parametrize("name", NAMES)
def test_resume_through_a_new_algorithm_object_is_bit_identical(name, tmp_path):
    ref = straight(name)
    prob, x, y, b = problem()
    b = batch_for(name, b)
    algo = algorithms(prob)[name]
    s = algo.init(x, y)
    for _ in range(SPLIT):
        s = algo.step(s, b, b)
    path = tmp_path / "state.pt"
    torch.save(algo.state_dict(s), path)
    prob2, _, _, b2 = problem()
    b2 = batch_for(name, b2)
    fresh = algorithms(prob2)[name]                 # a newly built object, nothing shared
    r = fresh.load_state_dict(torch.load(path, weights_only=True))
    for _ in range(TOTAL - SPLIT):
        r = fresh.step(r, b2, b2)
    assert torch.equal(flat_x(fresh, r), ref)


@pytest.mark.parametrize("name", NAMES)
def test_two_runs_interleaved_on_one_object_equal_the_runs_alone(name):
    alone = [None, None]
    for i, seed in enumerate((0, 1)):
        prob, x, y, b = problem(seed)
        b = batch_for(name, b)
        algo = algorithms(prob)[name]
        s = algo.init(x, y)
        for _ in range(6):
            s = algo.step(s, b, b)
        alone[i] = flat_x(algo, s)
    # one algorithm object, two runs (different data and starts) stepped in turn
    prob0, x0, y0, b0 = problem(0)
    _, x1, y1, b1 = problem(1)
    b0, b1 = batch_for(name, b0), batch_for(name, b1)
    algo = algorithms(prob0)[name]
    s0 = algo.init(x0, y0)
    s1 = algo.init(x1, y1)          # init of a second run touches nothing of the first
    for _ in range(6):
        s0 = algo.step(s0, b0, b0)
        s1 = algo.step(s1, b1, b1)
    assert torch.equal(flat_x(algo, s0), alone[0])
    assert torch.equal(flat_x(algo, s1), alone[1])


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    prob, x, y, b = problem()
    algos = algorithms(prob)
    for name in NAMES:
        s = algos[name].init(x, y)
        bb = batch_for(name, b)
        for _ in range(SPLIT):
            s = algos[name].step(s, bb, bb)
        torch.save(algos[name].state_dict(s), tmp_path / f"{name}.pt")
    script = BUILD + textwrap.dedent(f'''
        import json, sys
        prob, x, y, b = problem()
        algos = algorithms(prob)
        out = {{}}
        for name in {NAMES!r}:
            s = algos[name].load_state_dict(torch.load(sys.argv[1] + "/" + name + ".pt", weights_only=True))
            bb = batch_for(name, b)
            for _ in range({TOTAL - SPLIT}):
                s = algos[name].step(s, bb, bb)
            out[name] = torch.cat([t.reshape(-1) for t in s.x.values()]).tolist()
        print(json.dumps(out))
    ''')
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in NAMES:
        assert torch.equal(torch.tensor(out[name], dtype=torch.float32), straight(name)), name


def test_the_decisions_live_in_the_state_and_its_checkpoint():
    prob, x, y, b = problem()
    algo = algorithms(prob)["fdehbo"]
    s = algo.init(x, y)
    assert s.pair_mode is None and s.gy_from_pair is None       # not decided before a sample is seen
    s = algo.step(s, b, b)
    assert isinstance(s.pair_mode, bool) and s.gy_from_pair is True   # no running statistics here
    d = algo.state_dict(s)
    assert d["pair_mode"] == s.pair_mode and d["gy_from_pair"] is True and d["warned"] is False
    # decided at init from a sample: the same decisions, no step needed
    s2 = algo.init(x, y, inner_batch=b)
    assert (s2.pair_mode, s2.gy_from_pair) == (s.pair_mode, s.gy_from_pair)
    with pytest.raises(TypeError, match="not an iterator"):
        algo.init(x, y, inner_batch=iter([b]))


def test_the_radius_warning_is_per_run():
    prob, x, y, b = problem()
    algo = tb.fdehbo(prob, lr_x=0.05, lr_y=0.2, lr_v=0.2, radius=1e-6)     # binds at every step
    s = algo.init(x, y)
    with pytest.warns(RuntimeWarning, match="radius"):
        for _ in range(20):
            s = algo.step(s, b, b)
    assert s.warned
    r = algo.init(x, y)                  # a second run of the same object warns again
    with pytest.warns(RuntimeWarning, match="radius"):
        for _ in range(20):
            r = algo.step(r, b, b)


@pytest.mark.parametrize("buffers", [False, True], ids=["plain", "batchnorm"])
def test_a_compiled_run_takes_the_eager_decisions(buffers):
    # FdeHBO is the one method with per-run decisions (the others take none: their state
    # holds no such field).  Compiled with the first decisions made on the first step (a
    # graph break there, eagerly) the state records what eager records.
    torch._dynamo.reset()
    if buffers:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                  torch.nn.Linear(6, 1)).double()
        x, y = tb.nn.split(net, inner=["3"])
        gen = torch.Generator().manual_seed(0)
        b = (torch.randn(24, 5, generator=gen, dtype=torch.float64), torch.randn(24, 1, generator=gen, dtype=torch.float64))
        loss = lambda x, y, b: ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean()
        prob = tb.Bilevel(outer=loss, inner=lambda x, y, bb: loss(x, y, bb) + 0.1 * (y["3.weight"] ** 2).sum())
    else:
        prob, x, y, b = problem(dtype=torch.float64)
    algo = tb.fdehbo(prob, lr_x=0.05, lr_y=0.2, lr_v=0.2, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=20.0,
                     check_finite=False)
    s = c = algo.init(x, y)
    step = torch.compile(algo.step, backend="aot_eager")
    for _ in range(3):
        s, c = algo.step(s, b, b), step(c, b, b)
    assert (c.pair_mode, c.gy_from_pair) == (s.pair_mode, s.gy_from_pair)
    assert s.gy_from_pair is (not buffers)
    torch.testing.assert_close(c.xf, s.xf, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
