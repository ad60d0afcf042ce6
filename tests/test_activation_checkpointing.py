"""Activation checkpointing inside the model (torch.utils.checkpoint with use_reentrant=False,
as transformers' gradient_checkpointing_enable can use): every gradient-only method gives the
same numbers as the model without checkpointing (float64), although the backward recomputes
the checkpointed pieces after tb.nn.call has returned (torchbilevel.wrappers.recomputable
puts the call's x and y back in the module for the recomputation; without it the recompute
saw the module's own parameters: a wrong hypergradient, no error)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import torchbilevel as tb

DT = torch.float64


class Net(torch.nn.Module):
    def __init__(self, ckpt):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
        self.ckpt = ckpt

    def forward(self, inp):
        z = torch.tanh(self.a(inp))
        block = lambda t: torch.tanh(self.b(t))
        z = checkpoint(block, z, use_reentrant=False) if self.ckpt else block(z)
        return self.head(z)


def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, generator=gen, dtype=DT)
    return X, torch.tanh(X.sum(1, keepdim=True))


def methods(prob, x, y, batch):
    """{name: dict of results} for each gradient-only method; x differs from the module's own
    parameters, so a recomputation at those would show."""
    out = {"first_order": tb.hypergrad(prob, tb.first_order())(x, y, batch, batch),
           "pzobo": tb.hypergrad(prob, tb.pzobo(2, 0.1, directions=2, mu=1e-3,
                                                generator=torch.Generator().manual_seed(3)))(x, y, batch, batch)}
    for name, algo in (("fdehbo", tb.fdehbo(prob, lr_x=0.1, lr_y=0.1, lr_v=0.1, eta_x=0.5, eta_y=0.5, eta_v=0.5,
                                            radius=10.0)),
                       ("f2sa", tb.f2sa(prob, lr_x=0.1, lr_y=0.1, lr_z=0.1)),
                       ("bome", tb.bome(prob, lr_x=0.1, lr_y=0.1))):
        s = algo.init(x, y)
        for _ in range(2):
            s = algo.step(s, batch, batch)
        out[name] = {**s.x, **{"y/" + k: v for k, v in s.y.items()}}
    return out


def run_mlp(ckpt):
    torch.manual_seed(1)
    net = Net(ckpt).to(DT)
    x, y = tb.nn.split(net, inner=["head"])
    x = {k: v + 0.1 for k, v in x.items()}
    mse = lambda x, y, b: ((tb.nn.call(net, x, y, b[0]) - b[1]) ** 2).mean()
    prob = tb.Bilevel(outer=mse, inner=lambda x, y, b: mse(x, y, b) + 1e-2 * sum((t ** 2).sum() for t in y.values()))
    return methods(prob, x, y, data())


def run_gpt2(ckpt):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).to(DT).train()
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x, y = tb.nn.split(m, inner=lambda n, p: n.startswith("transformer.ln_f"))
    x = {k: v + 0.01 for k, v in x.items()}
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    lm = lambda x, y, b: tb.nn.call(m, x, y, input_ids=b, labels=b).loss
    prob = tb.Bilevel(outer=lm, inner=lambda x, y, b: lm(x, y, b) + 1e-2 * sum((t ** 2).sum() for t in y.values()))
    out = {"first_order": tb.hypergrad(prob, tb.first_order())(x, y, ids, ids)}
    algo = tb.fdehbo(prob, lr_x=0.01, lr_y=0.01, lr_v=0.01, radius=10.0)
    s = algo.step(algo.init(x, y), ids, ids)
    out["fdehbo"] = {**s.x, **{"y/" + k: v for k, v in s.y.items()}}
    return out


@pytest.mark.parametrize("run", [run_mlp, run_gpt2], ids=["mlp", "gpt2"])
def test_checkpointed_model_equals_plain(run):
    plain, ckpt = run(False), run(True)
    for name, ref in plain.items():
        assert any(float(t.abs().max()) > 0 for t in ref.values()), name
        for k, v in ref.items():
            torch.testing.assert_close(ckpt[name][k], v, rtol=1e-10, atol=1e-12, msg=f"{name} {k}")
