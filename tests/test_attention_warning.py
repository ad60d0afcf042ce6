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
        heads = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)      # (batch, heads, length, 4)
        q, k, v = (heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        z = F.scaled_dot_product_attention(q, k, v) if self.sdpa else torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
        return self.head(z.transpose(1, 2).flatten(-2)).mean()


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


def test_vmapped_pair_on_sdpa_has_no_batching_fallback():
    """FdeHBO's ± pair through one vmap on a model calling scaled_dot_product_attention: no
    "batching rule" fallback warning in float32 (CPU: the flash kernel, which has no batching
    rule, is replaced by the math backend inside the vmap), and in float64 the same products
    as two plain evaluations."""
    from torchbilevel.derivatives import fd_products
    for dtype in (torch.float32, torch.float64):
        module, inner, batch, loss = handmade(True)
        module, batch = module.to(dtype), batch.to(dtype)
        x, y = tb.nn.split(module, inner=["qkv"])
        g = lambda x, y, b: loss(tb.nn.call(module, x, y, b))
        v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(4), dtype=dtype) for k, t in y.items()}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            pair = fd_products(g, x, y, v, batch, delta=1e-3, batched=True)
        assert pair.batched is True
        assert not [w for w in seen if "batching rule" in str(w.message)], dtype
    plain = fd_products(g, x, y, v, batch, delta=1e-3, batched=False)
    for k in plain.hvp:
        torch.testing.assert_close(pair.hvp[k], plain.hvp[k], rtol=1e-7, atol=1e-9)
    for k in plain.mixed:
        torch.testing.assert_close(pair.mixed[k], plain.mixed[k], rtol=1e-7, atol=1e-9)


def test_math_backend_contexts_of_two_threads_restore_the_process_flags():
    # sdpa_kernel's flags are process-wide; two threads' contexts interleaved (A enters,
    # B enters, A exits, B exits) once left the process on the math backend for good
    import threading

    from torchbilevel.derivatives.second_order import math_sdpa
    flags = lambda: (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled())
    before = flags()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with math_sdpa():
            seen["a"] = flags()
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def thread_b():
        a_in.wait(5)
        with math_sdpa():
            b_in.set()
            a_out.wait(5)
            seen["b"] = flags()            # A has left; B still on the math backend
    ts = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen["a"] == (False, False, True) and seen["b"] == (False, False, True)
    assert flags() == before
