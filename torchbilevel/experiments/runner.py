"""Run bilevel algorithms side by side and record metrics against optimisation time.

Every algorithm has the library's ``init(x, y)`` / ``step(state, inner, outer)``
shape. Only ``step`` is timed (with a device synchronisation on CUDA);
evaluating the metrics is not.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import torch

__all__ = ["Method", "run_method", "run_methods", "detached"]


@dataclasses.dataclass
class Method:
    """One line of an experiment: a named algorithm and the batches it is fed.

    ``inner`` / ``outer`` are a full batch (tuple) or a minibatch iterator.
    ``steps`` caps the number of ``step`` calls. Metrics are recorded every
    ``eval_every`` steps, or once ``eval_seconds`` of optimisation time have
    passed since the last record, whichever comes first (and at the end).
    """

    name: str
    algo: Any
    inner: Any
    outer: Any
    steps: int
    eval_every: int = 10
    eval_seconds: float | None = None


def detached(tree: dict) -> dict:
    """Copy of a parameter dict with every tensor detached and cloned."""
    return {k: v.detach().clone() for k, v in tree.items()}


def _sync(device: torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _advance(progress, reported: float, amount: float, total: float) -> float:
    """Advance a progress bar by ``amount`` without passing ``total``; new reported sum."""
    amount = max(0.0, min(amount, total - reported))
    if amount:
        progress.update(amount)
    return reported + amount


def run_method(method: Method, x0: dict, y0: dict,
               evaluate: Callable[[dict, dict], dict], max_seconds: float | None = None,
               progress=None, device=None, warmup: bool = True) -> list[dict]:
    """Run one method from ``(x0, y0)``; return its rows.

    A row ``{"method", "step", "seconds", **evaluate(x, y)}`` is recorded at
    step 0, every ``eval_every`` steps and at the last step. ``seconds`` sums
    the wall-clock time of the ``init`` and ``step`` calls only. The run stops
    after ``method.steps`` steps or once ``max_seconds`` of optimisation time
    are spent, and also stops (after recording the row) when a metric is NaN
    or when the algorithm raises ``FloatingPointError`` (the library's NaN/inf
    check); then a last row with a ``diverged`` message and no metrics ends it.
    ``progress`` (e.g. a tqdm bar) advances by optimisation seconds when
    ``max_seconds`` is set (the rest of the budget when the method stops
    early), else by one per step (the rest of ``steps`` likewise). With
    ``warmup`` one untimed step is taken first from a throw-away state, so
    one-off lazy initialisation (first autograd / torch.func use) is not
    charged to whichever method runs first; it draws one batch from streams.
    """
    rows: list[dict] = []
    if progress is not None and hasattr(progress, "set_postfix_str"):
        progress.set_postfix_str(method.name)
    if warmup:
        method.algo.step(method.algo.init(detached(x0), detached(y0)), method.inner, method.outer)

    def record(state, step, seconds):
        with torch.no_grad():
            metrics = evaluate(state.x, state.y)
        rows.append({"method": method.name, "step": step, "seconds": seconds, **metrics})
        return any(isinstance(v, float) and math.isnan(v) for v in metrics.values())

    _sync(device)
    start = time.perf_counter()
    state = method.algo.init(detached(x0), detached(y0))
    _sync(device)
    seconds = time.perf_counter() - start
    record(state, 0, seconds)
    last_record, reported = seconds, 0.0
    for step in range(1, method.steps + 1):
        _sync(device)
        start = time.perf_counter()
        try:
            new_state = method.algo.step(state, method.inner, method.outer)
        except FloatingPointError as err:  # the library's NaN/inf check: a diverged run
            rows.append({"method": method.name, "step": step, "seconds": seconds,
                         "diverged": str(err)})
            break
        state = new_state
        _sync(device)
        elapsed = time.perf_counter() - start
        seconds += elapsed
        if progress is not None:
            reported = _advance(progress, reported, elapsed if max_seconds is not None else 1,
                                max_seconds if max_seconds is not None else method.steps)
        out_of_time = max_seconds is not None and seconds >= max_seconds
        due = step % method.eval_every == 0 or (
            method.eval_seconds is not None and seconds - last_record >= method.eval_seconds)
        if due or step == method.steps or out_of_time:
            last_record = seconds
            if record(state, step, seconds) or out_of_time:
                break
    if progress is not None:
        total = max_seconds if max_seconds is not None else method.steps
        _advance(progress, reported, total, total)
    return rows


def run_methods(methods: Sequence[Method], x0: dict, y0: dict,
                evaluate: Callable[[dict, dict], dict], max_seconds: float | None = None,
                progress=None, device=None, warmup: bool = True) -> list[dict]:
    """Run every method from the same start (see :func:`run_method`); concatenated rows."""
    record: list[dict] = []
    for method in methods:
        record += run_method(method, x0, y0, evaluate, max_seconds, progress, device, warmup)
    return record
