"""lr_x for the double loop, measured on README Quickstart 2 (data reweighting, one weight
logit per training example, a CNN with BatchNorm and dropout in train mode, ITD(20, 0.1),
one warm-started inner step per outer step).

    OMP_NUM_THREADS=1 python docs/measurements/lr_x_double_loop.py > docs/measurements/lr_x_double_loop.txt

For each outer rule (Adam, SGD) and step size, two data seeds, 40 outer steps: the AUC of
the learned weights (probability that a wrong-label example weighs less than a clean one;
0.5 = chance, below 0.5 = the wrong sign), the mean weights, the validation loss and the
test accuracy in eval mode. Results: docs/guide/algorithms.md, "Choosing lr_x".
"""
import itertools
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import torchbilevel as tb


def setup(seed):
    torch.manual_seed(seed)
    templates = torch.randn(4, 1, 12, 12)

    def images(n):
        t = torch.randint(0, 4, (n,))
        return templates[t] + 1.5 * torch.randn(n, 1, 12, 12), t

    (Xtr, ttr), (Xva, tva), (Xte, tte) = images(256), images(128), images(1000)
    wrong = torch.rand(256) < 0.3
    ttr = torch.where(wrong, (ttr + torch.randint(1, 4, (256,))) % 4, ttr)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 4)).train()
    return model, (Xtr, ttr), (Xva, tva), (Xte, tte), wrong


def run(seed, rule, lr_x, steps=40):
    model, train, val, (Xte, tte), wrong = setup(seed)
    _, y = tb.nn.split(model, inner=lambda name, p: True)
    x = {"logit": torch.zeros(256)}

    def inner(x, y, batch):
        X, t = batch
        losses = F.cross_entropy(tb.nn.call(model, {}, y, X), t, reduction="none")
        return (torch.sigmoid(x["logit"]) * losses).mean()

    def outer(x, y, batch):
        X, t = batch
        return F.cross_entropy(tb.nn.call(model, {}, y, X), t)

    for _ in range(100):
        _, (gy,) = tb.derivatives.gradient(inner, x, y, train, argnums=1)
        y = tb.tree.axpy(-0.1, gy, y)
    algo = tb.double_loop(tb.Bilevel(outer=outer, inner=inner), tb.itd(steps=20, lr=0.1),
                          lr_x=lr_x, inner_steps=1, lr_y=0.1, outer=rule)
    state = algo.init(x, y)
    for _ in range(steps):
        state = algo.step(state, train, val)
    w = torch.sigmoid(state.x["logit"])
    auc = (w[wrong][:, None] < w[~wrong][None, :]).float().mean().item()
    model.eval()
    acc = (tb.nn.call(model, {}, state.y, Xte).argmax(1) == tte).float().mean().item()
    model.train()
    return auc, w[wrong].mean().item(), w[~wrong].mean().item(), outer(state.x, state.y, val).item(), acc


if __name__ == "__main__":
    torch.set_num_threads(1)
    grid = [("adam", lr) for lr in (0.03, 0.1, 0.3, 1.0, 3.0)] + [("sgd", lr) for lr in (10, 30, 100, 300, 1000)]
    print("rule  lr_x  seed  AUC   w_wrong  w_clean  val_loss  test_acc  seconds")
    for (rule, lr), seed in itertools.product(grid, (0, 1)):
        t0 = time.perf_counter()
        auc, ww, wc, vl, acc = run(seed, rule, lr)
        print(f"{rule:5s} {lr:<5g} {seed:4d}  {auc:.3f} {ww:7.3f} {wc:8.3f} {vl:9.3f} {acc:9.3f} {time.perf_counter() - t0:8.1f}",
              flush=True)
