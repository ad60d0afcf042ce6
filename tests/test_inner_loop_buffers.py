"""A user's own inner loop (README Quickstart 2, docs/guide/train-mode.md): steps taken with
tb.derivatives.gradient + tb.tree.axpy leave a BatchNorm model exactly where plain PyTorch
training (model(X), loss.backward(), torch.optim.SGD) leaves it, running statistics included;
tb.derivatives.grad_y (torch.func.grad) leaves the statistics untouched, as documented."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().train()


def data():
    gen = torch.Generator().manual_seed(1)
    return (1.0 + 2.0 * torch.randn(32, 1, 6, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (32,), generator=gen))


def test_gradient_and_axpy_loop_equals_plain_pytorch_training_with_its_running_statistics():
    X, t = data()
    model, reference = cnn(), cnn()
    _, y = tb.nn.split(model, inner=lambda name, p: True)
    loss = lambda x, y, b: F.cross_entropy(tb.nn.call(model, {}, y, b[0]), b[1])
    for _ in range(5):
        _, (gy,) = tb.derivatives.gradient(loss, {}, y, (X, t), argnums=1)
        y = tb.tree.axpy(-0.1, gy, y)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)        # the independent reference
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(reference(X), t).backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(y[name], p.detach(), rtol=1e-12, atol=1e-12)
    for (name, b), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        assert not torch.equal(b, torch.zeros_like(b)) or "num_batches" in name
        torch.testing.assert_close(b, ref, rtol=1e-12, atol=1e-12, msg=name)


def test_grad_y_leaves_running_statistics_as_they_were():
    X, t = data()
    model = cnn()
    before = copy.deepcopy(dict(model.named_buffers()))
    _, y = tb.nn.split(model, inner=lambda name, p: True)
    loss = lambda x, y, b: F.cross_entropy(tb.nn.call(model, {}, y, b[0]), b[1])
    gy = tb.derivatives.grad_y(loss, {}, y, (X, t))
    assert tb.tree.norm(gy).item() > 0
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
