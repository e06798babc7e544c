"""Tables from the loaded results: DP overhead over non-DP, and the affine memory fit per method.

Both tables are plain DataFrames (written as Markdown and CSV by :func:`write_table`). A cell that cannot hold a
number says why: "OOM", "unsupported", "error" (the DP case), "nondp OOM" (its baseline), "no nondp", or "n/a"
(the figure does not exist on that device, e.g. allocator figures on CPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from bench.maxbatch import affine_fit, predict_max_batch  # the one fit, shared with the max-batch search

__all__ = [
    "BASELINE_METHOD",
    "FIT_NOTES",
    "HELPER_COLUMNS",
    "MIB",
    "OVERHEAD_NOTES",
    "RATIO_COLUMNS",
    "affine_fit",
    "affine_fit_table",
    "all_ok_batches",
    "fit_metric_for",
    "overhead_table",
    "present",
    "status_label",
    "to_markdown",
    "write_table",
]

BASELINE_METHOD = "nondp"
MIB = 2**20
# Raw-byte columns of the fit table kept for code (figures), left out of the Markdown and HTML tables.
HELPER_COLUMNS = ("fixed_bytes", "per_sample_bytes")

# Ratio columns of the overhead table: column title -> the record's figure it divides.
RATIO_COLUMNS = {
    "peak tensor ×nondp": "peak_tensor_bytes",
    "peak allocated ×nondp": "peak_allocated_bytes",
    "peak reserved ×nondp": "peak_reserved_bytes",
    "median step ×nondp": "time_median_s",
}

OVERHEAD_NOTES = (
    "Each ratio is the DP method's figure divided by `nondp`'s at the same workload, batch size, device and "
    "machine. `peak tensor` = peak live tensor bytes (exact tracker, every device); `peak allocated` / "
    '`peak reserved` = torch CUDA allocator max allocated / max reserved (CUDA only, "n/a" on CPU); '
    "`median step` = median seconds per fused DP step over the timed rounds. MiB columns are peak tensor bytes."
)

FIT_NOTES = (
    "Affine fit peak(B) = fixed + per_sample · B of each method's peak memory over the batch sizes that ran "
    "(`fit metric`: peak_reserved_bytes on CUDA where every point has it, else peak_tensor_bytes). "
    "`predicted max batch` is the largest B with peak(B) ≤ `memory`; `measured max batch` is the largest batch "
    'that ran ok ("≥" when no larger batch failed).'
)

_STATUS_LABELS = {"oom": "OOM", "unsupported": "unsupported", "error": "error"}


def status_label(status: str) -> str:
    return _STATUS_LABELS.get(status, status)


def present(value: Any) -> bool:
    """True unless ``value`` is None or a float NaN (how a missing figure reaches a DataFrame cell)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def all_ok_batches(rows: pd.DataFrame) -> list[int]:
    """Batch sizes of ``rows`` (one workload on one machine) at which every method of ``rows`` ran ok."""
    methods = rows["method"].nunique()
    return [
        int(b)
        for b, at in rows.groupby("batch_size")
        if (at["status"] == "ok").all() and at["method"].nunique() == methods
    ]


# ---------------------------------------------------------------------------------------------------------------
# Overhead over non-DP
# ---------------------------------------------------------------------------------------------------------------
def overhead_table(cases: pd.DataFrame) -> pd.DataFrame:
    """One row per DP case: its peak memory and median step time divided by ``nondp``'s (see OVERHEAD_NOTES)."""
    group_key = ["machine", "device", "workload", "batch_size"]
    columns = [*group_key, "method", "status", "peak tensor MiB", "nondp peak tensor MiB", *RATIO_COLUMNS]
    rows = []
    for _, group in cases.groupby(group_key, sort=True):
        baselines = group[group["method"] == BASELINE_METHOD]
        baseline = baselines.iloc[0] if len(baselines) else None
        for _, case in group[group["method"] != BASELINE_METHOD].sort_values("method").iterrows():
            row = {k: case[k] for k in group_key}
            row["method"] = case["method"]
            row["status"] = case["status"]
            row["peak tensor MiB"] = (
                _mib(case["peak_tensor_bytes"]) if case["status"] == "ok" else status_label(case["status"])
            )
            row["nondp peak tensor MiB"] = _baseline_problem(baseline) or _mib(baseline["peak_tensor_bytes"])
            for title, figure in RATIO_COLUMNS.items():
                row[title] = _ratio_cell(case, baseline, figure)
            rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _baseline_problem(baseline: pd.Series | None) -> str | None:
    """Why the nondp baseline gives no number ("no nondp", "nondp OOM", ...), or None when it ran ok."""
    if baseline is None:
        return "no nondp"
    if baseline["status"] != "ok":
        return f"nondp {status_label(baseline['status'])}"
    return None


def _ratio_cell(case: pd.Series, baseline: pd.Series | None, figure: str) -> float | str:
    if case["status"] != "ok":
        return status_label(case["status"])
    problem = _baseline_problem(baseline)
    if problem is not None:
        return problem
    numerator, denominator = case[figure], baseline[figure]
    if not (present(numerator) and present(denominator)) or float(denominator) <= 0:
        return "n/a"
    return round(float(numerator) / float(denominator), 3)


def _mib(value: Any) -> float | str:
    return round(float(value) / MIB, 2) if present(value) else "n/a"


# ---------------------------------------------------------------------------------------------------------------
# Affine fit: fixed + per-sample memory, predicted max batch
# ---------------------------------------------------------------------------------------------------------------
def fit_metric_for(rows: pd.DataFrame) -> str:
    """The peak figure to fit/plot for these rows: allocator reserved on CUDA where every ok row has it."""
    ok = rows[rows["status"] == "ok"]
    if len(ok) and ok["device"].astype(str).str.startswith("cuda").all() and ok["peak_reserved_bytes"].notna().all():
        return "peak_reserved_bytes"
    return "peak_tensor_bytes"


def affine_fit_table(cases: pd.DataFrame, max_batches: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per machine × device × workload × method: the affine fit and max batch (measured vs predicted).

    A max-batch search record, where present, is the source; otherwise the fit uses the case rows (at least two
    ok batch sizes) and the measured max batch is the largest ok batch among them."""
    key = ["machine", "device", "workload", "method"]
    columns = [
        *key,
        "source",
        "fit metric",
        "points",
        "fixed MiB",
        "per-sample MiB",
        "memory GiB",
        "measured max batch",
        "first failing batch",
        "predicted max batch",
        "fixed_bytes",
        "per_sample_bytes",
    ]
    rows: dict[tuple, dict[str, Any]] = {}
    if max_batches is not None and len(max_batches):
        for _, mb in max_batches.iterrows():
            if not (present(mb["fit_fixed_bytes"]) and present(mb["fit_per_sample_bytes"])):
                continue
            measured = mb["max_batch_measured"]
            rows[tuple(mb[k] for k in key)] = {
                **{k: mb[k] for k in key},
                "source": "max-batch search",
                "fit metric": mb["fit_metric"],
                "points": None,
                "fixed_bytes": float(mb["fit_fixed_bytes"]),
                "per_sample_bytes": float(mb["fit_per_sample_bytes"]),
                "memory_bytes": mb["memory_limit_bytes"],
                "measured max batch": int(measured) if present(measured) else "none",
                "first failing batch": int(mb["first_failing_batch"]) if present(mb["first_failing_batch"]) else None,
                "predicted max batch": int(mb["predicted_max_batch"]) if present(mb["predicted_max_batch"]) else None,
            }
    for group_key, group in cases.groupby(key, sort=True):
        if group_key in rows:
            continue
        metric = fit_metric_for(group)
        ok = group[(group["status"] == "ok") & group[metric].notna()]
        if ok["batch_size"].nunique() < 2:
            continue
        fixed, per_sample = affine_fit(list(zip(ok["batch_size"].astype(int), ok[metric].astype(float))))
        largest_ok = int(ok["batch_size"].max())
        failing = group[(group["status"] == "oom") & (group["batch_size"] > largest_ok)]["batch_size"]
        memory = group["device_memory_bytes"].dropna()
        memory_bytes = float(memory.iloc[0]) if len(memory) else None
        rows[group_key] = {
            **dict(zip(key, group_key)),
            "source": "fit to cases",
            "fit metric": metric,
            "points": len(ok),
            "fixed_bytes": fixed,
            "per_sample_bytes": per_sample,
            "memory_bytes": memory_bytes,
            "measured max batch": largest_ok if len(failing) else f"≥{largest_ok}",
            "first failing batch": int(failing.min()) if len(failing) else None,
            "predicted max batch": predict_max_batch(fixed, per_sample, memory_bytes) if memory_bytes else None,
        }
    out = []
    for row in rows.values():
        row["fixed MiB"] = round(row["fixed_bytes"] / MIB, 2)
        row["per-sample MiB"] = round(row["per_sample_bytes"] / MIB, 3)
        memory = row.pop("memory_bytes")
        row["memory GiB"] = round(float(memory) / 2**30, 2) if present(memory) else "n/a"
        if row["predicted max batch"] is None:
            row["predicted max batch"] = "n/a"
        if row["first failing batch"] is None:
            row["first failing batch"] = "none"
        out.append(row)
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(key).reset_index(drop=True) if len(table) else table


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def to_markdown(table: pd.DataFrame, *, drop: tuple[str, ...] = HELPER_COLUMNS) -> str:
    """A GitHub Markdown table (no dependency on ``tabulate``); raw-byte helper columns are left out."""
    shown = table[[c for c in table.columns if c not in drop]]
    header = "| " + " | ".join(str(c) for c in shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _cell(value: Any) -> str:
    if not present(value):
        return ""
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_table(table: pd.DataFrame, out_dir: Path, stem: str, notes: str) -> list[Path]:
    """Write ``stem``.md (notes + table) and ``stem``.csv; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md_path.write_text(f"{notes}\n\n{to_markdown(table)}", encoding="utf-8")
    table.to_csv(csv_path, index=False)
    return [md_path, csv_path]
