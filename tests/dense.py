"""Helpers for dense references in tests: a dict of tensors as one flat vector and back,
written independently of torchbilevel.tree (the code under test)."""
import math

import torch


def unflat(vec, shapes):
    """Split ``vec`` into a dict shaped by ``shapes`` ({name: shape})."""
    out, i = {}, 0
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = vec[i:i + n].reshape(s)
        i += n
    return out


def flat(tree):
    """Concatenate a dict of tensors into one vector (insertion order)."""
    return torch.cat([t.reshape(-1) for t in tree.values()])
