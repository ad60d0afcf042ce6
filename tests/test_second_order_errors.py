"""A model without a double backward (a cuDNN RNN on CUDA; simulated here on CPU by a
custom function whose backward's own backward fails with the error cuDNN's RNN gives) gives a clear error naming the method and the
alternatives, and the methods that need only gradients still run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb


class _Undifferentiable(torch.autograd.Function):
    # identity whose backward fails like the backward of cuDNN's RNN backward
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for aten::_cudnn_rnn_backward is not implemented")


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        out = torch.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        res = grad * (1 - out * out)
        return _Undifferentiable.apply(res) if res.requires_grad else res


class OnceTanh(nn.Module):
    def forward(self, a):
        return _OnceTanh.apply(a)


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), OnceTanh(), nn.Linear(6, 3)).double()
    x, y = tb.nn.split(model, inner=["1", "3"])        # the once-differentiable op sits inside y's path
    X, t = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    g = lambda x, y, b: F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1]) + 1e-2 * sum((p ** 2).sum() for p in y.values())
    f = lambda x, y, b: F.cross_entropy(tb.nn.call(model, x, y, b[0]), b[1])
    return tb.Bilevel(outer=f, inner=g), x, y, (X, t)


@pytest.mark.parametrize("est,name", [(tb.aid(tb.cg(steps=2)), "AID-BiO"), (tb.itd(2, 0.1), "ITD-BiO"),
                                      (tb.stocbio(2, 0.1), "stocBiO")])
def test_second_order_estimators_name_the_method_and_the_alternatives(est, name):
    prob, x, y, b = problem()
    with pytest.raises(RuntimeError, match="no double backward") as err:
        tb.hypergrad(prob, est)(x, y, b, b)
    assert name in str(err.value) and "tb.fdehbo" in str(err.value)


def test_fmbo_names_itself_and_fdehbo_runs():
    prob, x, y, b = problem()
    algo = tb.fmbo(prob, lr_x=0.01, lr_y=0.1, lr_v=0.1, radius=10.0)
    with pytest.raises(RuntimeError, match="fmbo differentiates"):
        algo.step(algo.init(x, y), b, b)
    fd = tb.fdehbo(prob, lr_x=0.01, lr_y=0.1, lr_v=0.1, radius=10.0)
    s = fd.step(fd.step(fd.init(x, y), b, b), b, b)
    assert all(torch.isfinite(t).all() for t in s.x.values())
    dx = tb.hypergrad(prob, tb.pzobo(2, 0.1, 2, 1e-3))(x, y, b, b)
    assert all(torch.isfinite(t).all() for t in dx.values())


def test_cudnn_rnns_are_named_only_on_cuda():
    lstm = nn.Sequential(nn.LSTM(3, 4))
    tb.nn.call(lstm, {}, dict(lstm.named_parameters()), torch.randn(2, 5, 3))
    assert "nn.LSTM" not in tb.nn.cudnn_rnns_seen()          # CPU: no cuDNN kernels involved
