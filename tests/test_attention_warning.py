"""The math-backend warning (torchbilevel.wrappers.warn_math_attention) fires for any module
whose forward calls scaled_dot_product_attention — a transformers GPT-2 built from a config
(random init, nothing downloaded), a hand-written attention — when a second-order method
differentiates it twice, and never for a gradient-only method or a model without attention."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchbilevel as tb
from torchbilevel import wrappers as W


class Handmade(torch.nn.Module):
    def __init__(self, sdpa=True):
        super().__init__()
        self.qkv, self.head, self.sdpa = torch.nn.Linear(8, 24), torch.nn.Linear(8, 1), sdpa

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        z = F.scaled_dot_product_attention(q, k, v) if self.sdpa else torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.head(z).mean()


def gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    return m, (lambda n, p: n.startswith("transformer.ln_f")), torch.randint(0, 50, (2, 8)), \
        (lambda out: out.logits.float().pow(2).mean())


def handmade(sdpa):
    torch.manual_seed(0)
    return Handmade(sdpa), ["head"], torch.randn(2, 5, 8), (lambda out: out)


def warned(build, estimator):
    module, inner, batch, loss = build()
    x, y = tb.nn.split(module, inner=inner)
    f = lambda x, y, b: loss(tb.nn.call(module, x, y, b))
    prob = tb.Bilevel(outer=f, inner=lambda x, y, b: f(x, y, b) + sum((t ** 2).sum() for t in y.values()))
    W._WARNED_MATH_ATTENTION[0] = False          # once per process: reset for each case
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dx = tb.hypergrad(prob, estimator)(x, y, batch, batch)
    assert all(torch.isfinite(t).all() for t in dx.values())
    return sum("math backend" in str(w.message) for w in seen)


@pytest.mark.parametrize("build", [gpt2, lambda: handmade(True)], ids=["gpt2", "handmade_sdpa"])
def test_second_order_on_sdpa_warns_once(build):
    assert warned(build, tb.aid(tb.cg(steps=2))) == 1
    assert warned(build, tb.first_order()) == 0


def test_no_warning_without_sdpa():
    assert warned(lambda: handmade(False), tb.aid(tb.cg(steps=2))) == 0
