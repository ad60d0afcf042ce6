"""What common random numbers and frozen buffers (torchbilevel.randomness, .buffers) add to
an FdeHBO / FMBO step of LeNet hyper-representation on CPU: the same step with the
machinery on, and with it replaced by no-ops (capture/restore of the generator state,
the buffer contexts), interleaved in one run, CPU time, median of ``--repeats``.

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    problem, x, y, ib, ob = lenet_problem.make()
    common = dict(lr_x=0.01, lr_y=0.01, lr_v=0.01, eta_x=0.5, eta_y=0.5, eta_v=0.5, radius=10.0)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} repeats={a.repeats} (CPU time, median)")
    print(f"{'step':10s} {'on ms':>8s} {'off ms':>8s} {'on/off':>7s}")
    for name, ctor in (("FdeHBO", tb.fdehbo), ("FMBO", tb.fmbo)):
        algo = ctor(problem, **common)
        s1 = algo.step(algo.init(x, y), ib, ob)          # t = 1: previous-iterate evaluations included
        on, off = [], []
        for _ in range(3):                               # interleaved rounds
            on.append(timeit(lambda: algo.step(s1, ib, ob), a.repeats // 3, "cpu"))
            with machinery_off():
                off.append(timeit(lambda: algo.step(s1, ib, ob), a.repeats // 3, "cpu"))
        t_on, t_off = sorted(on)[1], sorted(off)[1]
        print(f"{name:10s} {1e3 * t_on:8.2f} {1e3 * t_off:8.2f} {t_on / t_off:7.3f}")


if __name__ == "__main__":
    main()
