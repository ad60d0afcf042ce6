"""Command line: ``python -m torchbilevel demo`` and ``python -m torchbilevel run NAME``.

    python -m torchbilevel demo                      # hyper-cleaning on MNIST-5k, ~2 min on 2 cores
    python -m torchbilevel demo --methods aid_cg,fmbo,noisy --seconds 5
    python -m torchbilevel run shallow_hr --set embedding=two_layer --out out/hr.png
    python -m torchbilevel run deep_hr --device cuda

Prints a results table (one row per method: steps, optimisation seconds,
metrics) and saves a PNG of the metrics against seconds plus a CSV record.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser"]


_UNSET = object()  # --seconds not given (None means "no limit")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seconds(text: str):
    if text.lower() in ("none", "inf", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a positive number or 'none'), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", help="comma-separated method names (default: all of the experiment)")
    parser.add_argument("--out", help="PNG path (default out/demo_<experiment>.png); a CSV is written beside it")
    parser.add_argument("--steps", type=_positive_int, help="maximum steps per method")
    parser.add_argument("--seconds", type=_seconds, default=_UNSET,
                        help="optimisation-time budget per method ('none': no limit)")
    parser.add_argument("--seed", type=int, help="seed of data split, corruption and minibatches")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch CPU threads (default 1: the tensors are small, and on a "
                             "2-core machine 2 threads made steps several times slower "
                             "whenever another process was running)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set corruption=0.1 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``torchbilevel`` argument parser (subcommands ``demo`` and ``run``)."""
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="torchbilevel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="hyper-cleaning demo (or --experiment NAME)")
    demo.add_argument("--experiment", default="hyperclean", choices=sorted(EXPERIMENTS))
    _add_common(demo)
    run = sub.add_parser("run", help="run one experiment")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS))
    _add_common(run)
    return parser


def _convert(default, text: str):
    if text.lower() == "none":
        return None
    kind = type(default)
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return kind(float(text)) if kind is int and float(text).is_integer() else float(text)
    if isinstance(default, (tuple, list)):
        return tuple(t for t in text.split(",") if t)
    if default is None:
        return float(text)
    return text


def _config(parser, args, config_cls, module):
    import torch

    config = config_cls()
    changes = {}
    fields = {f.name: f for f in dataclasses.fields(config)}
    for item in args.set:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            changes[name] = _convert(getattr(config, name), text)
        except ValueError as err:
            parser.error(f"--set {item!r}: {err}")
    if args.methods is not None:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in module.METHODS]
        if not methods or unknown:
            parser.error(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(module.METHODS)}")
        changes["methods"] = methods
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.seconds is not _UNSET:
        changes["seconds"] = args.seconds
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            parser.error(f"--device {args.device!r}: {err}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        changes["device"] = args.device
    try:
        return dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torchbilevel`` and the ``torchbilevel`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .datasets import DataUnavailableError
    from .experiments import EXPERIMENTS
    from .experiments.demo import demo

    module, config_cls = EXPERIMENTS[args.experiment]
    config = _config(parser, args, config_cls, module)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out
    if out is None and args.command == "run":
        out = f"out/{args.experiment}.png"
    start = time.perf_counter()
    try:
        result = demo(args.experiment, config, out=out, progress=not args.no_progress)
    except DataUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    print()
    print(result.table)
    print(f"\nseconds = optimisation time per method (metric evaluation excluded); "
          f"total wall-clock {wall:.1f} s")
    print(f"plot: {result.png}")
    print(f"record: {result.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
