"""Bytes per parameter of a donated step on a real language model: data reweighting of a GPT-2
built from a transformers config (random init, nothing downloaded), every weight inner (y),
one weight per training sequence outer (x), the shape of ScaleBiO's LLM data reweighting.

    python bench/memory_lm.py                 # 4 layers, width 256, vocabulary 2000, 8 x 32 tokens

For FdeHBO, F2SA and BOME, plain and donated, and an Adam training step of the same model: the
state (distinct storages of ``state_dict``) and the peak one step adds above it, by
bench/peak_memory.py's tracker (CPU) or ``torch.cuda.max_memory_allocated``.  At this size the
activations (8 x 32 tokens through an MLP of width 1024) are comparable to the parameters, so
the Adam row's step is itself 2.6x the parameter bytes; the rows say what the method adds
beside them.  One JSON line per row.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import torchbilevel as tb                           # noqa: E402
from memory_methods import _tensors, step_peak     # noqa: E402


def rows(layers=4, width=256, vocab=2000, batch=8, tokens=32, device="cpu"):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=vocab, n_positions=tokens,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    net = GPT2LMHeadModel(cfg).to(device).train()
    gen = torch.Generator().manual_seed(1)
    train, val = (torch.randint(0, vocab, (batch, tokens), generator=gen).to(device) for _ in range(2))

    def per_sequence(y, ids):
        logits = tb.nn.call(net, {}, y, ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1),
                               reduction="none").view(ids.shape[0], -1).mean(1)
    problem = tb.Bilevel(outer=lambda x, y, b: per_sequence(y, b).mean(),
                         inner=lambda x, y, b: (torch.sigmoid(x["w"]) * per_sequence(y, b)).mean())
    _, y = tb.nn.split(net, inner=lambda name, p: True)
    x = {"w": torch.zeros(batch, device=device)}
    n = sum(t.numel() for t in y.values()) + batch
    algos = {"fdehbo": lambda: tb.fdehbo(problem, lr_x=0.1, lr_y=0.01, lr_v=0.01, eta_x=0.5, eta_y=0.5, eta_v=0.5,
                                         radius=10.0),
             "f2sa": lambda: tb.f2sa(problem, lr_x=0.1, lr_y=0.01, lr_z=0.01, inner_steps=1),
             "bome": lambda: tb.bome(problem, lr_x=0.1, lr_y=0.01, inner_steps=1)}
    out = []
    for name, build in algos.items():
        for donate in (False, True):
            algo = build()
            holder = [algo.step(algo.init(x, y), train, val)]
            state = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                         for t in _tensors(algo, holder[0])}.values())

            def step():
                holder[0] = algo.step(holder[0], train, val, donate=donate)
            peak, how = step_peak(step, device)
            out.append({"method": name, "donate": donate, "params": n, "state_bytes_per_param": state / n,
                        "step_peak_x_param_bytes": peak / (4 * n), "measured_with": how})
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def adam():
        opt.zero_grad(set_to_none=True)
        net(train, labels=train).loss.backward()
        opt.step()
    adam()
    peak, how = step_peak(adam, device)
    out.append({"method": "Adam training", "donate": False, "params": n, "state_bytes_per_param": 8.0,
                "step_peak_x_param_bytes": peak / (4 * n), "measured_with": how})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    for row in rows(a.layers, a.width, device=a.device):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
