"""Command line of torchbilevel: the demo and the papers' experiments.

    python -m torchbilevel demo                      # hyper-cleaning on MNIST-5k, about 1.5 min on 2 cores
    python -m torchbilevel demo --methods aid_cg,fmbo,noisy --seconds 5
    python -m torchbilevel run shallow_hr --set embedding=two_layer --out out/hr.png
    python -m torchbilevel run deep_hr --device cuda
    python -m torchbilevel run lm_reweight           # LM data reweighting, about 5 min on 2 cores
    torchrun --nproc-per-node 2 -m torchbilevel run lm_reweight --shard   # FSDP2, 2 CPU ranks

Each run prints a results table (one row per method: steps, optimisation seconds,
metrics) and saves a PNG of the metrics against optimisation time plus a CSV record.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from typing import Sequence

__all__ = ["main", "build_parser", "default_out", "EXPERIMENT_LINES"]


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


#: one line per experiment, for the help text
EXPERIMENT_LINES = {
    "hyperclean": "data hyper-cleaning on MNIST-5k: learn a weight per training sample when 40% of labels are corrupted",
    "shallow_hr": "shallow hyper-representation on synthetic data, with exact hypergradients to compare against",
    "deep_hr": "deep hyper-representation: LeNet body (outer) and linear head (inner) on MNIST-5k",
    "weight_decay": "per-feature weight decay of logistic regression on scikit-learn digits or breast_cancer",
    "lm_reweight": "language-model data reweighting (ScaleBiO in miniature): weights of four text domains (two corrupted) for a 1M-parameter transformer, learned from held-out documentation loss",
    "compare": "every stochastic method on a finite-sum quadratic, tuned on one step-size grid, at equal gradient evaluations and equal time",
    "fewshot": "few-shot meta-learning: CNN4 body (outer) and per-task heads (inner) on 40 rotated MNIST-5k digit classes, 5-way 5-shot",
}


def _experiments_epilog() -> str:
    """The experiments with one line each, their method names and default budgets."""
    from .experiments import EXPERIMENTS

    lines = ["experiments (default budget per method; methods: name (label in the table)):"]
    for name in sorted(EXPERIMENTS):
        module, config_cls = EXPERIMENTS[name]
        cfg = config_cls()
        budget = f"{cfg.seconds:g} s or {cfg.steps} steps" if cfg.seconds is not None else f"{cfg.steps} steps"
        lines += textwrap.wrap(EXPERIMENT_LINES.get(name, ""), width=92, initial_indent=f"  {name:<14}",
                               subsequent_indent=" " * 18)
        lines.append(" " * 16 + f"defaults: {budget}, seed {cfg.seed}")
        entries = [f"{k} ({module.LABELS[k]})" for k in module.METHODS]
        line = " " * 16 + "methods:"
        for i, entry in enumerate(entries):  # whole entries per line, never split inside one
            entry += "," if i < len(entries) - 1 else ""
            if len(line) + 1 + len(entry) > 92:
                lines.append(line)
                line = " " * 18 + entry
            else:
                line += " " + entry
        lines.append(line)
    return "\n".join(lines)


def _add_common(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("--methods", metavar="M1,M2",
                        help="comma-separated method names, see the list below (default: all methods "
                             "of the experiment)")
    parser.add_argument("--out", metavar="PATH",
                        help=f"PNG path (default: {out_default}); the CSV record is written beside it "
                             "with the extension .csv")
    parser.add_argument("--steps", type=_positive_int, metavar="N",
                        help="maximum steps per method (default: the experiment's, listed below)")
    parser.add_argument("--seconds", type=_seconds, default=_UNSET, metavar="S",
                        help="optimisation-time budget per method in seconds; 'none' = no limit "
                             "(default: the experiment's, listed below)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="seed of data split, corruption and minibatches (default: 0)")
    parser.add_argument("--device", metavar="DEV", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                        help="torch CPU threads (default: 1; the tensors are small, and on a "
                             "2-core machine 2 threads made steps several times slower "
                             "whenever another process was running)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any field of the experiment's config, e.g. --set corruption=0.1 "
                             "(repeatable; default: none)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar whose time left is the budget not yet spent)")


def build_parser() -> argparse.ArgumentParser:
    """The ``torchbilevel`` argument parser (subcommands ``demo`` and ``run``)."""
    from .experiments import EXPERIMENTS

    epilog = _experiments_epilog()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="torchbilevel", formatter_class=fmt, epilog=epilog,
        description="Bilevel optimisation with torchbilevel: run the demo or one of the papers'\n"
                    "experiments, print a results table and save a plot and a CSV record.\n\n"
                    "  demo           hyper-cleaning demo on MNIST-5k (about 1.5 min on 2 CPU cores);\n"
                    "                 writes out/demo_<experiment>.png and .csv\n"
                    "  run NAME       run experiment NAME; writes out/NAME.png and .csv\n\n"
                    "'python -m torchbilevel demo --help' and 'python -m torchbilevel run --help'\n"
                    "list the options with their defaults.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,run}")
    demo = sub.add_parser(
        "demo", formatter_class=fmt, epilog=epilog,
        help="hyper-cleaning demo (or --experiment NAME); writes out/demo_<experiment>.png",
        description="Run the demo: data hyper-cleaning on MNIST-5k with every method side by side\n"
                    "(or another experiment with --experiment), print the results table, save\n"
                    "out/demo_<experiment>.png and a CSV record beside it.")
    demo.add_argument("--experiment", default="hyperclean", choices=sorted(EXPERIMENTS),
                      help="the experiment to run (default: hyperclean)")
    _add_common(demo, "out/demo_<experiment>.png")
    run = sub.add_parser(
        "run", formatter_class=fmt, epilog=epilog,
        help="run one experiment; writes out/NAME.png",
        description="Run one of the papers' experiments with every method side by side, print\n"
                    "the results table, save out/NAME.png and a CSV record beside it.")
    run.add_argument("experiment", choices=sorted(EXPERIMENTS), metavar="NAME",
                     help="one of: " + ", ".join(sorted(EXPERIMENTS)) + " (see below)")
    _add_common(run, "out/<NAME>.png")
    run.add_argument("--shard", action="store_true",
                     help="lm_reweight only: shard the model with FSDP2 over the ranks of a torchrun "
                          "launch (torchrun --nproc-per-node 2 -m torchbilevel run lm_reweight "
                          "--shard), each rank holding 1/N of every batch (default: one process)")
    return parser


def default_out(command: str, experiment: str) -> str:
    """Where a command writes its PNG when ``--out`` is not given."""
    return f"out/demo_{experiment}.png" if command == "demo" else f"out/{experiment}.png"


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
    if getattr(args, "shard", False):
        if "shard" not in fields:
            parser.error(f"--shard: only lm_reweight runs sharded, not {args.experiment}")
        changes["shard"] = True
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
    out = args.out if args.out is not None else default_out(args.command, args.experiment)
    start = time.perf_counter()
    rank = 0
    if getattr(config, "shard", False):
        try:
            module.init_shard(config.device)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        rank = torch.distributed.get_rank()
    try:
        result = demo(args.experiment, config, out=out, progress=not args.no_progress and rank == 0)
        if getattr(config, "shard", False) and torch.distributed.is_initialized():
            torch.distributed.barrier()      # rank 0 writes the files: nobody leaves the group before
    except (DataUnavailableError, getattr(module, "CallIgnoresParameters", DataUnavailableError)) as err:
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr)
        return 2
    finally:
        if getattr(config, "shard", False) and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    wall = time.perf_counter() - start
    print()
    print(result.table)
    print(f"\ntotal wall-clock {wall:.1f} s (data loading, metric evaluation and plotting included)")
    print(f"plot: {result.png}")
    print(f"record: {result.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
