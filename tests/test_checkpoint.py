"""Checkpoint and resume: interrupt a run at a random (seeded) step, ``torch.save`` the
algorithm's ``state_dict`` with the positions of the user's batch iterators,
``torch.load(weights_only=True)`` into a freshly built algorithm and iterators, continue:
the resumed run is bit-identical on CPU to the uninterrupted one.

The library owns its state and the random generators it was given (PZOBO's ``generator``
is saved in ``state_dict``); it does not own the user's batch iterators, so the test saves
their positions next to the state and re-creates them there (:class:`SeededStream`).
"""
import random

import pytest
import torch

import torchbilevel as tb

N, D_FEAT, BS = 48, 5, 8
TOTAL = 9                                   # steps of the uninterrupted run


class SeededStream:
    """Infinite minibatches; minibatch i depends only on (seed, i), so the stream can be
    re-created at any position (what a checkpoint of a user's data pipeline must allow)."""

    def __init__(self, data, seed, position=0):
        self.data, self.seed, self.position = data, seed, position

    def __iter__(self):
        return self

    def __next__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        idx = torch.randperm(N, generator=gen)[:BS]
        self.position += 1
        return tuple(t[idx] for t in self.data)


def data(dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, D_FEAT, generator=gen, dtype=dtype)
    Xv = torch.randn(N, D_FEAT, generator=gen, dtype=dtype)
    w = torch.randn(D_FEAT, generator=gen, dtype=dtype)
    return (X, (X @ w > 0).to(dtype)), (Xv, (Xv @ w > 0).to(dtype))


def inner(x, y, batch):
    X, lab = batch
    z = X @ y["w"] + y["b"]
    return torch.nn.functional.binary_cross_entropy_with_logits(z, lab) + 0.5 * (torch.exp(x["h"]) * y["w"] ** 2).sum()


def outer(x, y, batch):
    X, lab = batch
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ y["w"] + y["b"], lab)


PROBLEM = tb.Bilevel(outer=outer, inner=inner)

# name -> (builder(generator) -> Algorithm, streams?, dtype)
ALGOS = {
    "double_loop-aid-cg": (lambda gen: tb.double_loop(PROBLEM, tb.aid(tb.cg(steps=4)), lr_x=0.3, inner_steps=3,
                                                       lr_y=0.5), True, torch.float64),
    "double_loop-aid-fp-adam": (lambda gen: tb.double_loop(PROBLEM, tb.aid(tb.fixed_point(4, 0.5)), lr_x=0.05,
                                                            inner_steps=2, lr_y=0.5, outer="adam"), False, torch.float32),
    "double_loop-stocbio": (lambda gen: tb.double_loop(PROBLEM, tb.stocbio(5, 0.5), lr_x=0.3, inner_steps=3,
                                                        lr_y=0.5), True, torch.float64),
    "double_loop-itd": (lambda gen: tb.double_loop(PROBLEM, tb.itd(4, 0.5), lr_x=0.3, inner_steps=0, lr_y=0.5),
                        True, torch.float32),
    "double_loop-pzobo": (lambda gen: tb.double_loop(PROBLEM, tb.pzobo(3, 0.5, directions=3, mu=1e-2, generator=gen),
                                                      lr_x=0.3, inner_steps=0, lr_y=0.5), False, torch.float64),
    "double_loop-pzobo-s-adam": (lambda gen: tb.double_loop(PROBLEM, tb.pzobo(3, 0.5, directions=2, mu=1e-2,
                                                                              generator=gen, antithetic=True),
                                                             lr_x=0.05, inner_steps=1, lr_y=0.5, outer="adam"),
                                 True, torch.float32),
    "fdehbo": (lambda gen: tb.fdehbo(PROBLEM, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5,
                                     radius=5.0), True, torch.float32),
    "fdehbo-theorem1": (lambda gen: tb.fdehbo(PROBLEM, **tb.schedules.theorem1(w=8), radius=5.0), True, torch.float64),
    "fmbo": (lambda gen: tb.fmbo(PROBLEM, lr_x=0.3, lr_y=0.5, lr_v=0.5, eta_x=0.5, eta_y=0.5, eta_v=0.5,
                                 radius=5.0), True, torch.float64),
}


def start(dtype):
    return ({"h": torch.full((D_FEAT,), -1.0, dtype=dtype)},
            {"w": torch.zeros(D_FEAT, dtype=dtype), "b": torch.zeros((), dtype=dtype)})


def batches(streams, dtype, positions=(0, 0)):
    train, val = data(dtype)
    if not streams:
        return train, val
    return SeededStream(train, 1, positions[0]), SeededStream(val, 2, positions[1])


def state_tensors(state):
    """Every tensor of a state, by field name (dict fields flattened); plus the step count."""
    out = {}
    for field, value in state._asdict().items():
        if isinstance(value, torch.Tensor):
            out[field] = value
        elif isinstance(value, dict):
            out.update({f"{field}.{k}": t for k, t in value.items()})
        elif hasattr(value, "_asdict"):                          # the outer rule's state
            out.update({f"{field}.{k}": t for k, t in state_tensors(value).items()})
        elif isinstance(value, (int, float)):
            out[field] = value
    return out


def assert_bit_identical(a, b):
    ta, tb_ = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb_.keys()
    for k in ta:
        if isinstance(ta[k], torch.Tensor):
            assert ta[k].dtype == tb_[k].dtype and ta[k].shape == tb_[k].shape, k
            assert torch.equal(ta[k].reshape(-1).view(torch.uint8), tb_[k].reshape(-1).view(torch.uint8)), k
        else:
            assert ta[k] == tb_[k], k


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(ALGOS))
def test_resume_at_a_random_step_is_bit_identical(tmp_path, name, seed):
    build, streams, dtype = ALGOS[name]
    interrupt = random.Random(1000 * seed + len(name)).randrange(1, TOTAL)

    # the uninterrupted run
    algo = build(torch.Generator().manual_seed(42))
    ib, ob = batches(streams, dtype)
    ref = algo.init(*start(dtype))
    for _ in range(TOTAL):
        ref = algo.step(ref, ib, ob)

    # interrupted at `interrupt`: save the state and the iterators' positions
    algo = build(torch.Generator().manual_seed(42))
    ib, ob = batches(streams, dtype)
    s = algo.init(*start(dtype))
    for _ in range(interrupt):
        s = algo.step(s, ib, ob)
    ckpt = {"algorithm": algo.state_dict(s),
            "positions": [ib.position, ob.position] if streams else None}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    del algo, s, ib, ob

    # a fresh process would rebuild everything; the generator is seeded differently on
    # purpose: load_state_dict restores the one the algorithm owns
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    algo = build(torch.Generator().manual_seed(12345))
    s = algo.load_state_dict(loaded["algorithm"])
    assert s.step == interrupt
    ib, ob = batches(streams, dtype, loaded["positions"] or (0, 0))
    for _ in range(TOTAL - interrupt):
        s = algo.step(s, ib, ob)
    assert_bit_identical(s, ref)


@pytest.mark.parametrize("name", ["double_loop-pzobo", "fdehbo"])
def test_a_resumed_run_can_be_checkpointed_again(tmp_path, name):
    build, streams, dtype = ALGOS[name]
    algo = build(torch.Generator().manual_seed(3))
    ib, ob = batches(streams, dtype)
    ref = algo.init(*start(dtype))
    for _ in range(6):
        ref = algo.step(ref, ib, ob)
    algo = build(torch.Generator().manual_seed(3))
    ib, ob = batches(streams, dtype)
    s = algo.init(*start(dtype))
    for k in range(6):                                   # save and reload after every step
        s = algo.step(s, ib, ob)
        torch.save(algo.state_dict(s), tmp_path / f"ckpt{k}.pt")
        algo = build(torch.Generator().manual_seed(k))
        s = algo.load_state_dict(torch.load(tmp_path / f"ckpt{k}.pt", weights_only=True))
    assert_bit_identical(s, ref)


def test_state_dict_holds_only_plain_types():
    # what torch.load(weights_only=True) accepts: dicts, lists, tensors, numbers, strings, None
    def plain(o):
        if isinstance(o, dict):
            return all(isinstance(k, str) and plain(v) for k, v in o.items())
        if isinstance(o, (list, tuple)):
            return all(plain(v) for v in o)
        return o is None or isinstance(o, (torch.Tensor, int, float, str, bool))
    for name, (build, streams, dtype) in ALGOS.items():
        algo = build(torch.Generator().manual_seed(0))
        ib, ob = batches(streams, dtype)
        s = algo.step(algo.init(*start(dtype)), ib, ob)
        assert plain(algo.state_dict(s)), name
