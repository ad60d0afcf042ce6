"""Tidy experiment records: a list of rows, one dict per (method, evaluation).

Every row has ``method``, ``step`` and ``seconds`` (optimisation time only,
evaluation excluded) plus the experiment's metrics. These helpers pick the
last row per method, format a text table and write CSV.
"""
from __future__ import annotations

import csv
import math
from typing import Iterable, Mapping, Sequence

__all__ = ["final_rows", "format_table", "write_csv", "methods_in"]


def methods_in(record: Iterable[dict]) -> list[str]:
    """Method names in order of first appearance."""
    seen: list[str] = []
    for row in record:
        if row["method"] not in seen:
            seen.append(row["method"])
    return seen


def final_rows(record: Sequence[dict]) -> list[dict]:
    """The last row of each method, in order of first appearance."""
    last = {row["method"]: row for row in record}
    return [last[name] for name in methods_in(record)]


def _cell(value, spec: str | None = None) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if spec is not None:
            return format(value, spec)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str], markdown: bool = False,
                 formats: Mapping[str, str] | None = None) -> str:
    """Rows as an aligned text table (or a markdown table) over ``columns``.

    ``formats`` maps a column to a format spec for its float values (e.g. ``".3f"``),
    so that a column prints with fixed decimals; other floats print with 4 significant
    digits. A column missing from a row prints as ``-``.
    """
    formats = formats or {}
    body = [[_cell(row.get(col, "-"), formats.get(col)) if row.get(col) is not None else "-"
             for col in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(col), *(len(cells[i]) for cells in body)) if body else len(col)
              for i, col in enumerate(columns)]
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    lines = [fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines)


def write_csv(record: Sequence[dict], path: str) -> None:
    """Write the record as CSV with the union of all row keys as header."""
    keys: list[str] = []
    for row in record:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(record)
