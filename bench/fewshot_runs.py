"""The few-shot runs behind bench/RESULTS.md's few-shot verdicts: every method over seeds
(5-way 5-shot, default config), the inner-step sweep T = 5, 10, 20 for AID-BiO vs ITD-BiO,
and 5-way 1-shot; one JSON record per part (the experiment's rows).

    python bench/fewshot_runs.py --part main --seeds 0,1,2 --out /tmp/fs_main.json
    python bench/fewshot_runs.py --part sweep --out /tmp/fs_sweep.json
    python bench/fewshot_runs.py --part oneshot --out /tmp/fs_1shot.json
    python bench/fewshot_runs.py --part long --seconds 120 --out /tmp/fs_long.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from torchbilevel.experiments import fewshot
from torchbilevel.experiments.records import final_rows, format_table

COLUMNS = ["method", "step", "seconds", "test_acc", "final_acc", "ci95", "t_target"]


def runs(part: str, seeds, seconds: float):
    """(tag, config) pairs of one part."""
    base = fewshot.FewShotConfig(seconds=seconds)
    if part == "main":
        return [(f"seed{s}", dataclasses.replace(base, seed=s)) for s in seeds]
    if part == "oneshot":
        return [(f"1shot-seed{s}", dataclasses.replace(base, shots=1, seed=s)) for s in seeds]
    if part == "sweep":
        return [(f"T{t}-seed{s}", dataclasses.replace(base, inner_steps=t, solver_steps=t, seed=s,
                                                     methods=("itd", "aid_cg", "aid_fp")))
                for s in seeds for t in (5, 10, 20)]
    if part == "long":                 # ITD-BiO vs AID-BiO with many inner steps, longer budget
        return [(f"T20-long-seed{s}", dataclasses.replace(base, inner_steps=20, solver_steps=20, seed=s,
                                                          methods=("itd", "aid_cg"))) for s in seeds]
    raise ValueError(part)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("main", "sweep", "oneshot", "long"), required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for tag, cfg in runs(a.part, [int(s) for s in a.seeds.split(",")], a.seconds):
        start = time.perf_counter()
        record = fewshot.run(cfg)
        for row in record:
            row["run"] = tag
        out += record
        print(f"== {tag} ({time.perf_counter() - start:.0f} s wall) {dataclasses.asdict(cfg)}", flush=True)
        print(format_table(final_rows(record), COLUMNS), flush=True)
        with open(a.out, "w") as fh:
            json.dump(out, fh)


if __name__ == "__main__":
    main()
