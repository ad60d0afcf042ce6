"""Common random numbers: a sample is a batch *and* a random stream.

Evaluations that the maths compares point against point — the two finite-difference
points y ± δv (FdeHBO paper eq. (9), (11)), the current and previous iterate on one
sample (eq. (6), (7), (10)), PZOBO's perturbed and unperturbed inner paths (Hessian-free
paper eq. (4)-(5)), a step recomputed in a checkpointed backward pass — must see the same
dropout masks, or their difference measures mask noise divided by a small step.

The mechanism is torch's own generator state: :func:`capture` reads the state of the
CPU generator and of the CUDA generators of the devices in use, :func:`restore` writes it
back, so that the next evaluation replays the same random stream.  Inside
``torch.func.vmap`` the library asks for ``randomness="same"`` instead (one draw shared by
the vmapped points).  A model needs no change and no flag.  (One torch subtlety: under
vmap, dropout on a non-contiguous tensor — the batch-first attention output inside
``nn.TransformerEncoderLayer`` — lays its shared mask out in another element order than
the same call outside vmap.  The vmapped points still share one mask, which is what a
difference needs; only a comparison against a separate plain evaluation at the same
stream sees another mask.)

Under ``torch.compile`` the generator state cannot be read (dynamo refuses
``torch.get_rng_state``): there :func:`capture` returns None and :func:`restore` does
nothing, so compiled steps of objectives that draw random numbers do not replay their
streams (objectives without dropout are unaffected).

Threads: torch's generators are process-wide, so two threads running models with dropout
at once draw from (and rewind) one stream; their results then depend on the interleaving.
Everything else the library keeps per call is per thread (tests/test_layers.py): run
stochastic models of different problems in separate processes, or in one thread.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["RandomState", "capture", "restore", "replaying", "restored_on_error", "VMAP_RANDOMNESS"]

# vmap over points that are one sample (± FD points, PZOBO directions): one shared draw
VMAP_RANDOMNESS = "same"


class RandomState(NamedTuple):
    """The random stream at one moment: the CPU generator's state, the states of the CUDA
    generators of ``cuda`` devices, and of extra user generators (e.g. PZOBO's)."""
    cpu: Tensor
    cuda: Tuple[Tuple[int, Tensor], ...]
    generators: Tuple[Tuple[torch.Generator, Tensor], ...]


def _cuda_devices(tensors: Iterable) -> Tuple[int, ...]:
    devs = set()
    for t in tensors:
        if isinstance(t, Tensor) and t.is_cuda:
            devs.add(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return tuple(sorted(devs))


def _leaves(trees):
    for tr in trees:
        if tr is None:
            continue
        if isinstance(tr, Tensor):
            yield tr
        elif isinstance(tr, dict):
            yield from tr.values()


def capture(*trees, generators: Iterable[Optional[torch.Generator]] = ()) -> Optional[RandomState]:
    """The current random stream: the CPU generator, the CUDA generator of every device that
    a tensor of ``trees`` (dicts of tensors or tensors) lives on, and ``generators``.
    None under torch.compile (see the module docstring)."""
    if torch.compiler.is_compiling():
        return None
    cuda = tuple((d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(_leaves(trees)))
    gens = tuple((g, g.get_state()) for g in generators if g is not None)
    return RandomState(torch.get_rng_state(), cuda, gens)


def restore(state: Optional[RandomState]) -> None:
    """Rewind the random stream to ``state`` (from :func:`capture`); None does nothing."""
    if state is None:
        return
    torch.set_rng_state(state.cpu)
    for d, s in state.cuda:
        torch.cuda.set_rng_state(s, d)
    for g, s in state.generators:
        g.set_state(s)


def replaying(state: Optional[RandomState], fns):
    """Call each function of ``fns`` (no arguments) starting from the same random stream
    ``state``; returns their results.  The stream ends where the last call left it (as if
    one sample had been drawn), so later evaluations draw fresh randomness."""
    out = []
    for i, fn in enumerate(fns):
        if i:
            restore(state)
        out.append(fn())
    return out


@contextlib.contextmanager
def restored_on_error(*trees, generators: Iterable[Optional[torch.Generator]] = ()):
    """Run the block; if it raises, rewind the random stream (and ``generators``) to where
    it was on entry, so that a failed step leaves the caller's stream as it found it, like
    the state it leaves unchanged."""
    state = capture(*trees, generators=generators)
    try:
        yield
    except BaseException:
        restore(state)
        raise
