"""What common random numbers and frozen buffers (torchbilevel.randomness, .buffers) add to
an FdeHBO / FMBO step of LeNet hyper-representation on CPU, measured two ways in one run:
(1) the same step with the machinery on, and with it replaced by no-ops (capture/restore
of the generator state, the buffer contexts), interleaved, CPU time, median of
``--repeats`` — a ratio that machine noise can swamp when the difference is small; (2)
the machinery's own CPU time inside a step (every capture/restore and buffer-context
entry timed), as a fraction of the step.

    python bench/crn_overhead.py [--repeats 30] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import lenet_problem  # noqa: E402
from step_cost import timeit  # noqa: E402

import torchbilevel as tb  # noqa: E402
from torchbilevel import buffers as B  # noqa: E402
from torchbilevel import randomness as R  # noqa: E402


@contextlib.contextmanager
def machinery_off():
    """capture/restore and the buffer contexts as no-ops (what the step cost before)."""
    saved = (R.capture, R.restore, B.frozen, B.updating)
    R.capture = lambda *a, **k: None
    R.restore = lambda state: None
    B.frozen = B.updating = contextlib.nullcontext
    try:
        yield
    finally:
        R.capture, R.restore, B.frozen, B.updating = saved


def machinery_share(step, repeats):
    """(machinery seconds per step, step seconds): every call of the machinery timed."""
    import time
    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.process_time() - t0
        return wrapper

    def timed_cm(cm):
        @contextlib.contextmanager
        def wrapper():
            t0 = time.process_time()
            with cm():
                spent[0] += time.process_time() - t0
                yield
                t0 = time.process_time()
            spent[0] += time.process_time() - t0
        return wrapper

    saved = (R.capture, R.restore, B.frozen, B.updating, B.transaction, B.journal)
    R.capture, R.restore = timed(R.capture), timed(R.restore)
    B.frozen, B.updating, B.transaction = timed_cm(B.frozen), timed_cm(B.updating), timed_cm(B.transaction)
    B.journal = timed(B.journal)
    try:
        total = []
        for _ in range(repeats):
            t0 = time.process_time()
            step()
            total.append(time.process_time() - t0)
    finally:
        R.capture, R.restore, B.frozen, B.updating, B.transaction, B.journal = saved
    return spent[0] / repeats, sorted(total)[len(total) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    problem, x, y, ib, ob = lenet_problem.make()
    common = dict(lr_x=0.01, lr_y=0.01, lr_v=0.01, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} repeats={a.repeats} (CPU time, median)")
    print(f"{'step':10s} {'on ms':>8s} {'off ms':>8s} {'on/off':>7s} {'machinery ms':>13s} {'share':>7s}")
    for name, ctor in (("FdeHBO", tb.fdehbo), ("FMBO", tb.fmbo)):
        algo = ctor(problem, **common)
        s1 = algo.step(algo.init(x, y), ib, ob)          # t = 1: previous-iterate evaluations included
        on, off = [], []
        for _ in range(3):                               # interleaved rounds
            on.append(timeit(lambda: algo.step(s1, ib, ob), a.repeats // 3, "cpu"))
            with machinery_off():
                off.append(timeit(lambda: algo.step(s1, ib, ob), a.repeats // 3, "cpu"))
        t_on, t_off = sorted(on)[1], sorted(off)[1]
        mach, step_s = machinery_share(lambda: algo.step(s1, ib, ob), a.repeats)
        print(f"{name:10s} {1e3 * t_on:8.2f} {1e3 * t_off:8.2f} {t_on / t_off:7.3f} {1e3 * mach:13.3f} "
              f"{mach / step_s:7.2%}")


if __name__ == "__main__":
    main()
