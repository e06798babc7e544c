"""The short auto-written summary at the top of the report: a few plain sentences per machine."""

from __future__ import annotations

import pandas as pd

from .load import Results
from .tables import BASELINE_METHOD, fit_metric_for, overhead_table

__all__ = ["summary_lines"]

_RATIO_COLUMN = {"peak_reserved_bytes": ("peak reserved ×nondp", "peak reserved"),
                 "peak_tensor_bytes": ("peak tensor ×nondp", "peak live tensors")}


def summary_lines(results: Results) -> list[str]:
    """Sentences like "On NVIDIA A100 (a100), bk costs 1.03× non-DP memory on dit-xl-2-cond at batch 64 ...".

    Per machine: the overhead of every DP method on the headline workload (the largest DiT with a batch at which
    every method and nondp ran ok, else the largest workload), then which methods ran out of memory and where,
    then which were unsupported."""
    cases = results.cases
    if cases.empty:
        return ["The input holds no case rows."]
    overhead = overhead_table(cases)
    lines = []
    for machine, rows in cases.groupby("machine", sort=True):
        names = sorted(set(rows["device_name"].dropna()))
        where = f"{', '.join(names)} ({machine})" if names and names != [machine] else machine
        headline = _headline_case(rows)
        if headline is not None:
            workload, batch = headline
            at = rows[(rows["workload"] == workload) & (rows["batch_size"] == batch)]
            column, what = _RATIO_COLUMN[fit_metric_for(at)]
            table = overhead[(overhead["machine"] == machine) & (overhead["workload"] == workload)
                             & (overhead["batch_size"] == batch)]
            parts = []
            for _, row in table.iterrows():
                memory, time = row[column], row["median step ×nondp"]
                if isinstance(memory, float):
                    text = f"{row['method']} costs {memory:.2f}× non-DP memory"
                    if isinstance(time, float):
                        text += f" and {time:.2f}× its step time"
                    parts.append(text)
            if parts:
                lines.append(f"On {where}, at {workload} batch {batch} ({what}): " + "; ".join(parts) + ".")
        for method, mrows in rows[rows["method"] != BASELINE_METHOD].groupby("method", sort=True):
            oom_text = []
            for workload, wrows in mrows.groupby("workload", sort=True):
                ooms = wrows[wrows["status"] == "oom"]["batch_size"]
                if len(ooms):
                    ok = wrows[wrows["status"] == "ok"]["batch_size"]
                    largest_ok = int(ok[ok < ooms.min()].max()) if (ok < ooms.min()).any() else None
                    oom_text.append(f"above batch {largest_ok} on {workload}" if largest_ok is not None
                                    else f"at every batch tried (from {int(ooms.min())}) on {workload}")
            if oom_text:
                lines.append(f"On {where}, {method} runs out of memory " + ", ".join(oom_text) + ".")
            unsupported = mrows[mrows["status"] == "unsupported"]
            if len(unsupported):
                reason = (str(unsupported["reason"].iloc[0]).strip().splitlines() or [""])[0]
                workloads = ", ".join(sorted(unsupported["workload"].unique()))
                lines.append(f"On {where}, {method} is unsupported on {workloads}" + (f": {reason}" if reason else "") + ".")
            errors = mrows[mrows["status"] == "error"]
            if len(errors):
                lines.append(f"On {where}, {method} failed with an error in {len(errors)} case(s) (see the tables).")
    return lines or ["No DP method has a non-DP baseline to compare with."]


def _headline_case(rows: pd.DataFrame) -> tuple[str, int] | None:
    """(workload, batch) for the headline sentence: prefer DiT, then the most parameters, then the largest batch."""
    candidates = []
    for workload, wrows in rows.groupby("workload"):
        if BASELINE_METHOD not in set(wrows["method"]):
            continue
        methods = wrows["method"].nunique()
        good = [b for b, brows in wrows.groupby("batch_size")
                if (brows["status"] == "ok").all() and brows["method"].nunique() == methods]
        if good:
            params = wrows["params_total"].max()
            candidates.append((wrows["family"].iloc[0] == "dit", params if pd.notna(params) else 0, max(good), workload))
    if not candidates:
        return None
    *_, batch, workload = max(candidates)
    return workload, int(batch)
