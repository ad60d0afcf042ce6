"""A small causal transformer language model (GPT-style), for the ``lm_reweight`` experiment.

Pre-LayerNorm blocks (Radford et al. 2019, GPT-2 §2.3): attention through
``torch.nn.functional.scaled_dot_product_attention`` with a causal mask, a GELU MLP of
width 4·d_model, learned positions, and an output head whose weight *is* the token
embedding's tensor (tied, as in GPT-2: ``model.head.weight is model.embed.weight``).
The logits are multiplied by 1/√d_model (μP's output multiplier, Yang et al., "Tensor
Programs V", 2021, Table 3): the LayerNorm output has norm √d_model, so without it one
plain SGD step of size O(1) on the tied head moves the logits by O(d_model) and the loss
spikes (measured: 5.5 -> 8.6 nats in 3 steps at step 0.3, d_model = 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "TinyGPT", "token_losses"]


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)); causal multi-head self-attention via SDPA."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (batch, time, d_model) -> same shape."""
        b, t, c = h.shape
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(h)).split(c, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    """Causal LM over ``vocab`` tokens: embedding + positions, ``layers`` blocks, LN, tied head.

    ``forward(tokens (batch, time))`` returns logits (batch, time, vocab); ``time`` at most
    ``context``. Weights start N(0, 0.02) (GPT-2), biases 0, LayerNorms at identity.
    """

    def __init__(self, vocab: int = 256, d_model: int = 128, layers: int = 4, heads: int = 4,
                 context: int = 64):
        super().__init__()
        for name, value in (("vocab", vocab), ("d_model", d_model), ("layers", layers),
                            ("heads", heads), ("context", context)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.context = context
        self.scale = d_model ** -0.5
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two uses
        for name, p in self.named_parameters():
            if p.dim() >= 2 or name == "pos":
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next token at every position of ``tokens`` (batch, time)."""
        t = tokens.shape[-1]
        if t > self.context:
            raise ValueError(f"tokens has {t} positions, more than context={self.context}")
        h = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h)) * self.scale


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy (nats), shaped like ``targets``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").reshape(targets.shape)
