"""Peak memory per method in bytes per parameter, one process: the state a method keeps
(``state_dict`` tensors) and the peak a step adds above it, on an MLP (x = a body of
Linear(W, W) blocks, y = a head Linear(W, C)), float32, CPU.

    python bench/memory_methods.py                 # width 512, 6 blocks, head of 100 classes

The step's peak is measured with bench/peak_memory.py (a dispatch-mode tracker: every
tensor an operator creates, counted until its storage is freed; CPU keeps no allocator
statistics), on the second step (which evaluates the previous iterate too).  One JSON line
per method: parameters, state and step-peak bytes, both per parameter, and the step peak in
units of the parameter bytes.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import torchbilevel as tb                       # noqa: E402
from peak_memory import peak_tensor_bytes      # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = []
    for _ in range(a.blocks):
        layers += [torch.nn.Linear(a.width, a.width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(a.width, a.classes)).to(a.device)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(a.batch, a.width, generator=gen).to(a.device),
             torch.randint(0, a.classes, (a.batch,), generator=gen).to(a.device))
    ce = lambda x, y, b: F.cross_entropy(tb.nn.call(net, x, y, b[0]), b[1])
    prob = tb.Bilevel(outer=ce, inner=lambda x, y, b: ce(x, y, b) + 1e-3 * sum((w ** 2).sum() for w in y.values()))
    x, y = tb.nn.split(net, inner=[str(len(net) - 1)])
    n = sum(t.numel() for t in x.values()) + sum(t.numel() for t in y.values())
    pbytes = 4 * n
    kw = dict(lr_x=0.01, lr_y=0.05, lr_v=0.05, radius=10.0)
    algos = {"fdehbo": tb.fdehbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, **kw),
             "fmbo": tb.fmbo(prob, eta_x=0.5, eta_y=0.5, eta_v=0.5, **kw),
             "f2sa": tb.f2sa(prob, lr_x=0.01, lr_y=0.05, lr_z=0.05),
             "bome": tb.bome(prob, lr_x=0.01, lr_y=0.05),
             "first_order (double_loop, 1 inner step)": tb.double_loop(prob, tb.first_order(), lr_x=0.01,
                                                                        inner_steps=1, lr_y=0.05),
             "pzobo (double_loop, N=1, Q=1)": tb.double_loop(prob, tb.pzobo(1, 0.05, directions=1, mu=1e-3),
                                                             lr_x=0.01, inner_steps=1, lr_y=0.05)}
    for name, algo in algos.items():
        s = algo.init(x, y)
        s = algo.step(s, batch, batch)
        holder = [s]
        state = sum(v.numel() * v.element_size() for v in _tensors(algo, s))

        def step():
            holder[0] = algo.step(holder[0], batch, batch)
        peak = peak_tensor_bytes(step)
        print(json.dumps({"method": name, "params": n, "state_bytes_per_param": state / n,
                          "step_peak_bytes_per_param": peak / n, "step_peak_x_param_bytes": peak / pbytes,
                          "total_bytes_per_param": (state + peak) / n}))


def _tensors(algo, s):
    try:
        d = algo.state_dict(s)
    except Exception:
        d = s._asdict() if hasattr(s, "_asdict") else {}
    out = []
    for v in d.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out += [t for t in v.values() if isinstance(t, torch.Tensor)]
    return out


if __name__ == "__main__":
    main()
