"""Regression gate: compare two result sets case by case, and export memory for github-action-benchmark.

Cases match on (workload, method, batch size, device) and machine (runner label, else GPU/CPU name). A case
fails the gate when any peak figure present on both sides grew by more than the threshold, or when it went
from ok to OOM. Step times are shown but never gate (they are too noisy across runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .load import CASE_KEY, PEAK_COLUMNS, Results
from .tables import MIB, present, to_markdown

__all__ = [
    "Comparison",
    "ThresholdError",
    "benchmark_action_entries",
    "compare_results",
    "format_comparison",
    "parse_threshold",
]


class ThresholdError(ValueError):
    """A --max-regression value that is not "5%" or "0.05" style; one line."""


def parse_threshold(text: str) -> float:
    """ "5%" → 0.05, "0.05" → 0.05; must be finite and ≥ 0."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ThresholdError(f"--max-regression {text!r} is not a fraction (0.05) or a percentage (5%)") from None
    if not math.isfinite(value) or value < 0:
        raise ThresholdError(f"--max-regression {text!r} must be a finite fraction >= 0")
    return value


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per matched case: statuses, peak figures, deltas, time delta, verdict
    failures: list[str] = field(default_factory=list)  # one line per failing case
    only_base: list[str] = field(default_factory=list)  # cases that disappeared
    only_new: list[str] = field(default_factory=list)
    threshold: float = 0.05

    @property
    def failed(self) -> bool:
        return bool(self.failures)


def _case_name(key: tuple) -> str:
    workload, method, batch, device, machine = key
    return f"{workload}/{method}/bs{batch}/{device} [{machine}]"


def compare_results(base: Results, new: Results, threshold: float) -> Comparison:
    key = list(CASE_KEY)
    base_rows = {tuple(r[k] for k in key): r for _, r in base.cases.iterrows()}
    new_rows = {tuple(r[k] for k in key): r for _, r in new.cases.iterrows()}
    rows, failures = [], []
    for case in sorted(set(base_rows) & set(new_rows), key=str):
        b, n = base_rows[case], new_rows[case]
        row: dict[str, Any] = {"case": _case_name(case), "base status": b["status"], "new status": n["status"]}
        problems = []
        if b["status"] == "ok" and n["status"] == "oom":
            problems.append("ok → OOM")
        worst = None
        for figure in PEAK_COLUMNS:
            if not (b["status"] == n["status"] == "ok" and present(b[figure]) and present(n[figure])):
                continue
            if float(b[figure]) <= 0:
                continue
            change = float(n[figure]) / float(b[figure]) - 1.0
            if worst is None or change > worst[1]:
                worst = (figure, change)
            if change > threshold:
                problems.append(f"{figure} +{change:.1%} (> {threshold:.1%})")
        row["base peak MiB"] = (
            round(float(b["peak_tensor_bytes"]) / MIB, 2) if present(b["peak_tensor_bytes"]) else None
        )
        row["new peak MiB"] = round(float(n["peak_tensor_bytes"]) / MIB, 2) if present(n["peak_tensor_bytes"]) else None
        row["worst memory change"] = f"{worst[0]} {worst[1]:+.1%}" if worst else "n/a"
        time_b, time_n = b["time_median_s"], n["time_median_s"]
        row["median step change"] = (
            f"{float(time_n) / float(time_b) - 1.0:+.1%}"
            if present(time_b) and present(time_n) and float(time_b) > 0
            else "n/a"
        )
        row["verdict"] = "FAIL: " + "; ".join(problems) if problems else "ok"
        if problems:
            failures.append(f"{row['case']}: {'; '.join(problems)}")
        rows.append(row)
    columns = [
        "case",
        "base status",
        "new status",
        "base peak MiB",
        "new peak MiB",
        "worst memory change",
        "median step change",
        "verdict",
    ]
    return Comparison(
        table=pd.DataFrame(rows, columns=columns),
        failures=failures,
        only_base=[_case_name(c) for c in sorted(set(base_rows) - set(new_rows), key=str)],
        only_new=[_case_name(c) for c in sorted(set(new_rows) - set(base_rows), key=str)],
        threshold=threshold,
    )


def format_comparison(comparison: Comparison) -> str:
    lines = [f"Compared {len(comparison.table)} case(s); memory regression threshold {comparison.threshold:.1%}.", ""]
    if len(comparison.table):
        lines.append(to_markdown(comparison.table))
    else:
        lines.append("No case is in both result sets (check the runner labels / GPU names match).")
    if comparison.only_base:
        lines.append(f"Only in base ({len(comparison.only_base)}): " + ", ".join(comparison.only_base))
    if comparison.only_new:
        lines.append(f"Only in new ({len(comparison.only_new)}): " + ", ".join(comparison.only_new))
    if comparison.failures:
        lines.append(f"REGRESSION in {len(comparison.failures)} case(s):")
        lines.extend(f"  {line}" for line in comparison.failures)
    else:
        lines.append("No memory regression.")
    return "\n".join(lines)


def benchmark_action_entries(results: Results) -> list[dict[str, Any]]:
    """github-action-benchmark ``customSmallerIsBetter`` entries: every peak figure of every ok case, in MiB."""
    entries = []
    for _, row in results.cases.iterrows():
        if row["status"] != "ok":
            continue
        name = _case_name(tuple(row[k] for k in CASE_KEY))
        for figure in PEAK_COLUMNS:
            if present(row[figure]):
                entries.append({"name": f"{name} {figure}", "unit": "MiB", "value": round(float(row[figure]) / MIB, 3)})
    return entries
