"""Never a silent zero (issue 16, item 2): an objective that does not depend on the x it is
given, or a wrapper whose forward ignores the tensors functional_call gives, raises a clear
error before any work instead of returning an all-zero hypergradient."""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import torchbilevel as tb

DT = torch.float64


def data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=gen, dtype=DT), torch.randn(8, generator=gen, dtype=DT)


def test_neither_objective_using_x_raises_for_every_method_family():
    A, b = data()
    g = lambda x, y, bb: ((A @ y["w"] - b) ** 2).mean()            # x ignored
    f = lambda x, y, bb: (y["w"] ** 2).sum()                          # x ignored
    prob = tb.Bilevel(outer=f, inner=g)
    x, y = {"h": torch.zeros(3, dtype=DT)}, {"w": torch.zeros(3, dtype=DT)}
    with pytest.raises(ValueError, match="neither objective depends on x"):
        tb.hypergrad(prob, tb.aid(tb.cg(3)))(x, y, None, None)
    algo = tb.fdehbo(prob, lr_x=0.1, lr_y=0.1, lr_v=0.1, radius=1.0)
    s = algo.init(x, y)
    with pytest.raises(ValueError, match="neither objective depends on x"):
        algo.step(s, None, None)
    algo = tb.double_loop(prob, tb.first_order())
    with pytest.raises(ValueError, match="neither objective depends on x"):
        algo.step(algo.init(x, y), None, None)
    algo = tb.f2sa(prob, lr_x=0.1, lr_y=0.1, lr_z=0.1)
    with pytest.raises(ValueError, match="neither objective depends on x"):
        algo.step(algo.init(x, y), None, None)


def test_x_used_by_f_alone_is_legitimate_and_gives_grad_x_f():
    A, b = data()
    g = lambda x, y, bb: ((A @ y["w"] - b) ** 2).mean()
    f = lambda x, y, bb: (y["w"] ** 2).sum() + (x["h"] ** 2).sum()
    x, y = {"h": torch.ones(3, dtype=DT)}, {"w": torch.zeros(3, dtype=DT)}
    dx = tb.hypergrad(tb.Bilevel(outer=f, inner=g), tb.aid(tb.cg(3)))(x, y, None, None)
    torch.testing.assert_close(dx["h"], 2 * x["h"])                 # ∇x f exactly, no implicit term


def test_a_compiled_module_is_refused_naming_the_module_inside():
    net = torch.nn.Linear(3, 1).to(DT)
    x, y = tb.nn.split(net, inner=["bias"])
    with pytest.raises(TypeError, match="_orig_mod"):
        tb.nn.call(torch.compile(net), x, y, data()[0])


def test_distributed_data_parallel_is_refused_naming_module():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo unavailable")
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'rdv')}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        try:
            net = torch.nn.Linear(3, 1).to(DT)
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            x, y = tb.nn.split(net, inner=["bias"])
            with pytest.raises(TypeError, match="module.module"):
                tb.nn.call(ddp, x, y, data()[0])
        finally:
            dist.destroy_process_group()
