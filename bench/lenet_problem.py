"""The LeNet hyper-representation problem of the FdeHBO paper (Section 4.1) and the
PZOBO paper (4.2): x = a LeNet body, y = a linear head with L2, batch 128.

Shared by the step-cost benchmarks.  Data: random MNIST-shaped tensors (the cost of a
step does not depend on the pixel values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb


class LeNetBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, img):
        h = F.max_pool2d(F.relu(self.conv1(img)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(h.flatten(1)))))


def make(batch: int = 128, device: str = "cpu", seed: int = 0, l2: float = 1e-3, declared: bool = False):
    """(problem, x, y, inner_batch, outer_batch): body as x, head (84 -> 10) as y.
    ``declared=True``: the same problem with the body declared as features
    (``tb.Bilevel(..., features=phi)``)."""
    torch.manual_seed(seed)
    body = LeNetBody().to(device)
    x = {k: p.detach().clone() for k, p in body.named_parameters()}
    head = nn.Linear(84, 10).to(device)
    y = {"w": head.weight.detach().clone(), "b": head.bias.detach().clone()}

    def logits(x, y, img):
        return tb.nn.call(body, x, {}, img) @ y["w"].T + y["b"]

    def g(x, y, batch):
        img, lab = batch
        return F.cross_entropy(logits(x, y, img), lab) + l2 * (y["w"].pow(2).sum() + y["b"].pow(2).sum())

    def f(x, y, batch):
        img, lab = batch
        return F.cross_entropy(logits(x, y, img), lab)

    def data():
        return (torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device))

    if declared:
        phi = lambda x, batch: tb.nn.call(body, x, {}, batch[0])
        head_loss = lambda z, y, batch: F.cross_entropy(z @ y["w"].T + y["b"], batch[1])
        g_head = lambda z, y, batch: head_loss(z, y, batch) + l2 * (y["w"].pow(2).sum() + y["b"].pow(2).sum())
        return tb.Bilevel(outer=head_loss, inner=g_head, features=phi), x, y, data(), data()
    return tb.Bilevel(outer=f, inner=g), x, y, data(), data()
