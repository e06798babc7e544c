"""Regression gate: compare two result sets case by case, and export memory for github-action-benchmark.

Cases match on (workload, method, batch size, device, training mode: precision, checkpointing, trainable) and
machine (runner label, else GPU/CPU name). A case fails the gate when a *gated* peak figure present on both sides
grew by more than the threshold, when it went from ok to OOM, when it broke (ok to error or unsupported;
``allow_status_change`` lets it pass, shown), or when it disappeared: a base case missing from the new results of a
machine they hold (``allow_missing`` lets it pass, shown; a machine the new results do not hold at all is said, not
compared). Other status changes (unsupported to ok, say) are shown and pass. By default only the figures that are
isolated between cases are gated (:data:`GATED_BY_DEFAULT`: exact tensor bytes, the allocator's peaks, NVML's peak
minus the case-start baseline); process RSS and NVML's device-wide or per-process peaks depend on what ran before in
the same process or on the device, so they are shown for information and never fail the gate unless chosen with
``--gate-figures``. Step times are shown but never gate (too noisy across runs); comparing step times measured with
different torch thread counts is warned."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .load import CASE_KEY, PEAK_COLUMNS, Results
from .tables import MIB, format_number, present, reason_text, status_label, to_markdown

__all__ = [
    "GATED_BY_DEFAULT",
    "CompareUsageError",
    "Comparison",
    "benchmark_action_entries",
    "compare_results",
    "format_comparison",
    "parse_gate_figures",
    "parse_threshold",
]

# Peak figures that do not depend on the cases run before (docs/measurement.md "Isolation"); the gate's default.
GATED_BY_DEFAULT = (
    "peak_tensor_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_minus_baseline_bytes",
)


class CompareUsageError(ValueError):
    """A bad ``--max-regression`` or ``--gate-figures`` value; one line naming the option and what is valid."""


def parse_threshold(text: str) -> float:
    """ "5%" → 0.05, "0.05" → 0.05. A bare number must be a fraction ≤ 1: "5" is refused (did you mean 5%?)."""
    raw = str(text).strip()
    option = f"--max-regression {text!r}"
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise CompareUsageError(f"{option} is not a fraction (0.05) or a percentage (5%)") from None
    if not math.isfinite(value) or value < 0:
        raise CompareUsageError(f"{option} must be a finite fraction >= 0 or a percentage such as 5%")
    if not raw.endswith("%") and value > 1:
        raise CompareUsageError(f"{option}: a bare number is a fraction <= 1; write '{raw}%' for {raw} percent")
    return value


def parse_gate_figures(text: str) -> tuple[str, ...]:
    """ "peak_tensor_bytes,peak_reserved_bytes" → the figures the gate fails on (each one of PEAK_COLUMNS)."""
    names = tuple(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in PEAK_COLUMNS]
    if unknown or not names:
        what = f"unknown figure(s) {', '.join(unknown)}" if unknown else "no figure given"
        raise CompareUsageError(f"--gate-figures: {what}; choose from {', '.join(PEAK_COLUMNS)}")
    return names


@dataclass
class Comparison:
    # one row per matched case: statuses, peak tensor MiB, the worst gated and ungated changes (fractions), the
    # step time change (fraction), the thread counts when they differ, and the verdict
    table: pd.DataFrame
    failures: list[str] = field(default_factory=list)  # one line per failing case
    only_base: list[str] = field(default_factory=list)  # cases not in the new results (missing or not compared)
    only_new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # base cases gone from a machine the new results hold
    not_compared: list[str] = field(default_factory=list)  # base machines the new results do not hold, one line each
    allowed: list[str] = field(default_factory=list)  # status changes and missing cases let pass by an --allow-*
    hints: list[str] = field(default_factory=list)  # which --allow-* would let a failing case pass, when one would
    threshold: float = 0.05
    gate_figures: tuple[str, ...] = GATED_BY_DEFAULT
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def overlaps(self) -> bool:
        return len(self.table) > 0


def _case_name(key: tuple) -> str:
    workload, method, batch, device, precision, checkpointing, trainable, world_size, parallel, machine = key
    defaults = ((precision, "fp32"), (checkpointing, "none"), (trainable, "full"))
    mode = "".join(f"/{part}" for part, default in defaults if part != default)
    ranks = f"/{parallel}{world_size}" if world_size > 1 else ""
    return f"{workload}/{method}/bs{batch}/{device}{mode}{ranks} [{machine}]"


_COLUMNS = [
    "case",
    "base status",
    "new status",
    "base peak MiB",
    "new peak MiB",
    "gated figure",
    "gated change",
    "ungated figure",
    "ungated change",
    "median step change",
    "torch threads",
    "verdict",
]


def _worst_change(base: pd.Series, new: pd.Series, figures: tuple[str, ...]) -> tuple[str | None, float]:
    """(figure, new/base − 1) of the figure that grew most among ``figures`` present on both ok sides."""
    worst: tuple[str | None, float] = (None, math.nan)
    if not base["status"] == new["status"] == "ok":
        return worst
    for figure in figures:
        if present(base[figure]) and present(new[figure]) and float(base[figure]) > 0:
            change = float(new[figure]) / float(base[figure]) - 1.0
            if worst[0] is None or change > worst[1]:
                worst = (figure, change)
    return worst


def _compare_case(
    name: str, b: pd.Series, n: pd.Series, threshold: float, gated: tuple[str, ...], allow_status_change: bool
) -> tuple[dict[str, Any], list[str], list[str]]:
    """(the table row, what fails the gate, what an --allow-* let pass): each a short text, with the new
    status's reason where a case broke."""
    row: dict[str, Any] = {"case": name, "base status": b["status"], "new status": n["status"]}
    row["base peak MiB"] = float(b["peak_tensor_bytes"]) / MIB if present(b["peak_tensor_bytes"]) else math.nan
    row["new peak MiB"] = float(n["peak_tensor_bytes"]) / MIB if present(n["peak_tensor_bytes"]) else math.nan
    row["gated figure"], row["gated change"] = _worst_change(b, n, gated)
    ungated = tuple(f for f in PEAK_COLUMNS if f not in gated)
    row["ungated figure"], row["ungated change"] = _worst_change(b, n, ungated)
    time_b, time_n = b["time_median_s"], n["time_median_s"]
    row["median step change"] = (
        float(time_n) / float(time_b) - 1.0 if present(time_b) and present(time_n) and float(time_b) > 0 else math.nan
    )
    threads = b["torch_threads"], n["torch_threads"]
    differ = all(present(t) for t in threads) and threads[0] != threads[1]
    row["torch threads"] = f"{int(threads[0])}→{int(threads[1])}" if differ else None
    problems, allowed, shown = [], [], []
    change = f"{status_label(b['status'])} → {status_label(n['status'])}"
    if b["status"] == "ok" and n["status"] == "oom":
        problems.append(change)
        shown.append(change)
    elif b["status"] == "ok" and n["status"] != "ok":
        broke = f"broke: {change}"
        reason = reason_text(n["reason"]) or "no reason recorded"
        (allowed if allow_status_change else problems).append(f"{broke} ({reason})")
        shown.append(f"{broke} (allowed)" if allow_status_change else broke)
    elif b["status"] != n["status"]:
        shown.append(f"changed: {change}")
    for figure in gated:
        growth = _worst_change(b, n, (figure,))[1]
        if present(growth) and growth > threshold:
            problems.append(f"{figure} +{growth:.1%} (over {threshold:.1%})")
            shown.append(problems[-1])
    row["verdict"] = "; ".join(shown) or "ok"
    if problems:
        row["verdict"] = "FAIL: " + row["verdict"]
    return row, problems, allowed


def compare_results(
    base: Results,
    new: Results,
    threshold: float,
    gate_figures: tuple[str, ...] = GATED_BY_DEFAULT,
    *,
    allow_status_change: bool = False,
    allow_missing: bool = False,
) -> Comparison:
    key = list(CASE_KEY)
    base_rows = {tuple(r[k] for k in key): r for _, r in base.cases.iterrows()}
    new_rows = {tuple(r[k] for k in key): r for _, r in new.cases.iterrows()}
    rows, failures, allowed, hints = [], [], [], []
    broke = False  # some case broke and failed the gate
    for case in sorted(set(base_rows) & set(new_rows), key=str):
        name = _case_name(case)
        row, problems, let_pass = _compare_case(
            name, base_rows[case], new_rows[case], threshold, gate_figures, allow_status_change
        )
        rows.append(row)
        failures += [f"{name}: {'; '.join(problems)}"] if problems else []
        broke = broke or any(p.startswith("broke: ") for p in problems)
        allowed += [f"{name}: {text} (--allow-status-change)" for text in let_pass]
    table = pd.DataFrame(rows, columns=_COLUMNS)
    only_base = sorted(set(base_rows) - set(new_rows), key=str)
    # The machine is the key's last part: a machine the new results hold lost these cases (crashed, killed, left
    # out of the matrix); one they do not hold at all was not run (an optional runner), and is said once.
    new_machines = {case[-1] for case in new_rows}
    missing = [case for case in only_base if case[-1] in new_machines]
    for case in missing:
        line = f"{_case_name(case)}: disappeared: {status_label(base_rows[case]['status'])} → missing"
        (allowed if allow_missing else failures).append(line + (" (--allow-missing)" if allow_missing else ""))
    if broke:
        hints.append("--allow-status-change lets a case that broke pass (shown)")
    if missing and not allow_missing:
        hints.append("--allow-missing lets a case missing from NEW pass (shown), e.g. when NEW ran fewer cases")
    absent = Counter(case[-1] for case in only_base if case[-1] not in new_machines)
    warnings = []
    differing = [r for r in rows if r["torch threads"] is not None]
    if differing:
        pairs = ", ".join(sorted({r["torch threads"] for r in differing}))
        warnings.append(
            f"{len(differing)} case(s) were timed with different torch thread counts (base→new: {pairs}); "
            "their step-time changes compare different settings"
        )
    return Comparison(
        table=table,
        failures=failures,
        only_base=[_case_name(c) for c in only_base],
        only_new=[_case_name(c) for c in sorted(set(new_rows) - set(base_rows), key=str)],
        missing=[_case_name(c) for c in missing],
        not_compared=[f"[{machine}]: {count} case(s) of the base" for machine, count in sorted(absent.items())],
        allowed=allowed,
        hints=hints,
        threshold=threshold,
        gate_figures=tuple(gate_figures),
        warnings=warnings,
    )


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as text: MiB to 2 decimals, changes as signed percentages beside their figure."""

    def change(figure: Any, value: Any) -> str:
        return f"{figure} {value:+.1%}" if present(figure) and present(value) else "n/a"

    return pd.DataFrame(
        {
            "case": table["case"],
            "base status": table["base status"],
            "new status": table["new status"],
            "base peak MiB": [format_number(round(v, 2)) for v in table["base peak MiB"]],
            "new peak MiB": [format_number(round(v, 2)) for v in table["new peak MiB"]],
            "worst gated change": [change(f, v) for f, v in zip(table["gated figure"], table["gated change"])],
            "not gated (information)": [change(f, v) for f, v in zip(table["ungated figure"], table["ungated change"])],
            "median step change": [f"{v:+.1%}" if present(v) else "n/a" for v in table["median step change"]],
            "torch threads": [t if present(t) else "" for t in table["torch threads"]],
            "verdict": table["verdict"],
        }
    )


def format_comparison(comparison: Comparison) -> str:
    ungated = [f for f in PEAK_COLUMNS if f not in comparison.gate_figures]
    lines = [
        f"Compared {len(comparison.table)} case(s); memory regression threshold {comparison.threshold:.1%} on "
        f"{', '.join(comparison.gate_figures)}"
        + (f"; not gated (shown for information): {', '.join(ungated)}." if ungated else "."),
        "",
    ]
    if len(comparison.table):
        lines.append(to_markdown(_display(comparison.table)))
    else:
        lines.append("No case is in both result sets (check the runner labels / GPU names match).")
    if comparison.missing:
        lines.append(f"Missing from new ({len(comparison.missing)}): " + ", ".join(comparison.missing))
    if comparison.not_compared:
        lines.append("Not compared, no case of the machine in the new results: " + "; ".join(comparison.not_compared))
    if comparison.only_new:
        lines.append(f"Only in new ({len(comparison.only_new)}): " + ", ".join(comparison.only_new))
    lines += [f"warning: {w}" for w in comparison.warnings]
    if comparison.allowed:
        lines.append(f"Allowed ({len(comparison.allowed)}), would fail without the option:")
        lines.extend(f"  {line}" for line in comparison.allowed)
    if comparison.failures:
        lines.append(f"REGRESSION in {len(comparison.failures)} case(s):")
        lines.extend(f"  {line}" for line in comparison.failures)
        lines += [f"hint: {hint}" for hint in comparison.hints]
    else:
        lines.append("No memory regression, no case broken or missing.")
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
