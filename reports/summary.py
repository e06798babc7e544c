"""The short auto-written summary at the top of the report: a few plain sentences per machine."""

from __future__ import annotations

import pandas as pd

from .load import Results
from .tables import (
    BASELINE_METHOD,
    MIN_NOISE_ROUNDS,
    RATIO_COLUMNS,
    TIME_NOISE,
    TIME_RATIO,
    TIME_VERDICT,
    all_ok_batches,
    first_line,
    fit_metric_for,
    present,
)

__all__ = ["summary_lines"]

# fit metric -> its ratio column in the overhead table, and its name in the headline sentence
_RATIO_TITLE = {figure: title for title, figure in RATIO_COLUMNS.items()}
_METRIC_WORDS = {"peak_reserved_bytes": "peak reserved", "peak_tensor_bytes": "peak live tensors"}


def summary_lines(results: Results) -> list[str]:
    """Sentences like "On NVIDIA A100 (a100), at dit-xl-2-cond batch 64 (peak reserved): bk costs 1.03× non-DP
    memory and 1.20× its step time; ...". A time ratio is stated only when it is beyond its noise; otherwise the
    sentence says "within noise" (or why it cannot tell).

    Per machine: the overhead of every DP method at the headline case (the largest DiT with a batch at which
    every method and nondp ran ok, else the largest workload with one), then per method where it ran out of
    memory, where it was unsupported and how often it failed with an error."""
    if results.cases.empty:
        return ["The input holds no case rows."]
    cases = results.cases[results.cases["world_size"] == 1]  # cases on many ranks: their own figure
    if cases.empty:
        return ["Every case ran on many ranks: see the per-rank figure."]
    lines = []
    for machine, rows in cases.groupby("machine", sort=True):
        names = sorted(set(rows["device_name"].dropna()))
        where = f"{', '.join(names)} ({machine})" if names and names != [machine] else machine
        lines += _headline_lines(results.overhead, machine, rows, where)
        for method, mrows in rows[rows["method"] != BASELINE_METHOD].groupby("method", sort=True):
            lines += _method_lines(method, mrows, where)
    return lines or ["No DP method has a non-DP baseline to compare with."]


def _headline_lines(overhead: pd.DataFrame, machine: str, rows: pd.DataFrame, where: str) -> list[str]:
    """The one overhead sentence of a machine at its headline case (none when it has no such case)."""
    headline = _headline_case(rows)
    if headline is None:
        return []
    workload, batch = headline
    metric = fit_metric_for(rows[(rows["workload"] == workload) & (rows["batch_size"] == batch)])
    column = _RATIO_TITLE[metric]
    table = overhead[
        (overhead["machine"] == machine)
        & (overhead["workload"] == workload)
        & (overhead["batch_size"] == batch)
        & (overhead["world_size"] == 1)
    ]
    parts = []
    for _, row in table.iterrows():
        memory = row[column]
        if present(memory):
            parts.append(f"{row['method']} costs {memory:.2f}× non-DP memory" + _time_words(row))
    if not parts:
        return []
    return [f"On {where}, at {workload} batch {batch} ({_METRIC_WORDS[metric]}): " + "; ".join(parts) + "."]


def _time_words(row: pd.Series) -> str:
    """The step-time part of a headline: the ratio only when it is beyond its noise (tables.OVERHEAD_NOTES)."""
    verdict = row[TIME_VERDICT]
    if not present(row[TIME_RATIO]):
        return ""
    if verdict == "beyond noise":
        return f" and {row[TIME_RATIO]:.2f}× its step time"
    if verdict == "within noise":
        return f", its step time within noise of non-DP's (±{row[TIME_NOISE]:.0%})"
    if verdict == "threads differ":
        return ", its step time not comparable (timed with different torch thread counts)"
    return f", its step time noise unknown (fewer than {MIN_NOISE_ROUNDS} timed rounds, or no IQR)"


def _method_lines(method: str, mrows: pd.DataFrame, where: str) -> list[str]:
    """Where one DP method ran out of memory, was unsupported or failed, on one machine."""
    lines = []
    oom_text = []
    for workload, wrows in mrows.groupby("workload", sort=True):
        ooms = wrows[wrows["status"] == "oom"]["batch_size"]
        if len(ooms):
            ok = wrows[wrows["status"] == "ok"]["batch_size"]
            below = ok[ok < ooms.min()]
            oom_text.append(
                f"above batch {int(below.max())} on {workload}"
                if len(below)
                else f"at every batch tried (from {int(ooms.min())}) on {workload}"
            )
    if oom_text:
        lines.append(f"On {where}, {method} runs out of memory " + ", ".join(oom_text) + ".")
    unsupported = mrows[mrows["status"] == "unsupported"]
    if len(unsupported):
        reason = first_line(unsupported["reason"].iloc[0])
        workloads = ", ".join(sorted(unsupported["workload"].unique()))
        lines.append(f"On {where}, {method} is unsupported on {workloads}" + (f": {reason}" if reason else "") + ".")
    errors = mrows[mrows["status"] == "error"]
    if len(errors):
        lines.append(f"On {where}, {method} failed with an error in {len(errors)} case(s) (see the tables).")
    return lines


def _headline_case(rows: pd.DataFrame) -> tuple[str, int] | None:
    """(workload, batch) for the headline sentence: prefer DiT, then the most parameters, then the largest batch."""
    candidates = []
    for workload, wrows in rows.groupby("workload"):
        if BASELINE_METHOD not in set(wrows["method"]):
            continue
        good = all_ok_batches(wrows)
        if good:
            params = wrows["params_total"].max()
            candidates.append(
                (wrows["family"].iloc[0] == "dit", params if pd.notna(params) else 0, max(good), workload)
            )
    if not candidates:
        return None
    *_, batch, workload = max(candidates)
    return workload, int(batch)
