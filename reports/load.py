"""Load result files into tidy DataFrames — the only code in the reports that knows the file formats.

Two formats, told apart by content (never by file name):

* pytest-benchmark JSON: one object with ``machine_info`` and ``benchmarks``; each benchmark's ``extra_info``
  is a :class:`bench.record.CaseRecord` dict, ``stats`` its timing (seconds, or null when not timed);
* JSON lines: one :func:`bench.record.to_jsonl_line` object per line. A killed run may leave a truncated
  *last* line: it is skipped with a warning and every complete line is kept.

Everything is parsed with :mod:`json` into the record classes; nothing from the input is evaluated or unpickled.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from bench.record import (
    CATEGORIES,
    SCHEMA_VERSION,
    CaseRecord,
    MaxBatchRecord,
    RecordError,
    from_jsonl_line,
    from_record_dict,
)

from .tables import affine_fit_table, overhead_table

__all__ = [
    "CASE_KEY",
    "MEMORY_COLUMNS",
    "PEAK_COLUMNS",
    "ReportInputError",
    "Results",
    "load_file",
    "load_results",
    "workload_family",
]

# Columns that identify one case on one machine; a result set has at most one row per key.
CASE_KEY = ("workload", "method", "batch_size", "device", "machine")

# Every byte figure of a CaseRecord that becomes a column (breakdown categories are added as breakdown_<cat>).
MEMORY_COLUMNS = (
    "peak_tensor_bytes",
    "baseline_tensor_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_used_bytes",
    "nvml_baseline_bytes",
    "nvml_peak_minus_baseline_bytes",
    "nvml_peak_reserved_bytes",
    "nvml_process_peak_bytes",
    "peak_rss_bytes",
    "baseline_rss_bytes",
)

# The peak figures a regression gate compares (any that both sides have).
PEAK_COLUMNS = (
    "peak_tensor_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_used_bytes",
    "nvml_peak_minus_baseline_bytes",
    "nvml_process_peak_bytes",
    "peak_rss_bytes",
)

_RECORD_FACTS = (
    "peak_phase",
    "nvml_samples",
    "nvml_interval_s",
    "noise_multiplier",
    "epsilon",
    "delta",
    "accountant",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "optimizer",
    "params_total",
    "params_trainable",
    "tokens_per_sample",
    "dtype",
    "device_memory_bytes",
    "snapshot_path",
)
_TIME_COLUMNS = ("time_median_s", "time_mean_s", "time_min_s", "time_max_s", "time_stddev_s", "rounds")


class ReportInputError(ValueError):
    """A result file the reports cannot use; the message is one line naming the file and the problem."""


@dataclass
class Results:
    """Loaded results: one row per case × machine in ``cases``, one per max-batch search in ``max_batches``.

    ``case_records[i]`` is the full record of the row whose ``record_index`` is ``i`` (phases, timeline and
    breakdown for the figures); ``max_batch_records`` likewise for ``max_batches``. ``overhead`` and ``fits`` are
    the two derived tables, built once on first use and shared by the report, the summary and the figures (treat
    them, like ``cases``, as read-only)."""

    cases: pd.DataFrame
    max_batches: pd.DataFrame
    case_records: list[CaseRecord] = field(default_factory=list)
    max_batch_records: list[MaxBatchRecord] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self, row: pd.Series | dict[str, Any]) -> CaseRecord:
        return self.case_records[int(row["record_index"])]

    @cached_property
    def overhead(self) -> pd.DataFrame:
        """:func:`reports.tables.overhead_table` of ``cases``."""
        return overhead_table(self.cases)

    @cached_property
    def fits(self) -> pd.DataFrame:
        """:func:`reports.tables.affine_fit_table` of ``cases`` and ``max_batches``."""
        return affine_fit_table(self.cases, self.max_batches)


def workload_family(name: str) -> str:
    """ "dit" or "gpt" from a workload name (built-in names start with their family), else "other"; used for
    records without a `family` field and for max-batch records."""
    lowered = name.lower()
    for family in ("dit", "gpt"):
        if lowered.startswith(family):
            return family
    return "other"


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    cases: list[tuple[CaseRecord, dict[str, Any]]]  # record, extra columns (timing stats, machine facts)
    max_batches: list[MaxBatchRecord]
    warnings: list[str]
    format: str  # "pytest-benchmark" or "jsonl"


def load_file(path: str | Path) -> _Loaded:
    """Parse one file of either format; raises :class:`ReportInputError` naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: cannot read: {exc}") from None
    if not text.strip():
        raise ReportInputError(f"{path}: empty file")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "benchmarks" in whole:
        return _load_pytest_benchmark(path, whole)
    if whole is not None and not (isinstance(whole, dict) and ("record_type" in whole or "workload" in whole)):
        kind = "object" if isinstance(whole, dict) else type(whole).__name__
        raise ReportInputError(
            f"{path}: foreign JSON (a JSON {kind} that is neither pytest-benchmark output nor dpmem JSON lines)"
        )
    return _load_jsonl(path, text)


def _load_pytest_benchmark(path: Path, data: dict[str, Any]) -> _Loaded:
    """Timed cases from ``benchmarks``; untimed ones (OOM, unsupported, max-batch searches) from
    ``dpmem_untimed``, where the bench keeps them so pytest-benchmark's own tools can read ``benchmarks``."""
    benchmarks, untimed = data.get("benchmarks"), data.get("dpmem_untimed", [])
    if not isinstance(benchmarks, list) or not isinstance(untimed, list):
        raise ReportInputError(f"{path}: pytest-benchmark JSON whose 'benchmarks' or 'dpmem_untimed' is not a list")
    if not benchmarks and not untimed:
        raise ReportInputError(f"{path}: pytest-benchmark JSON with no benchmarks")
    machine_info = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
    dpmem_info = machine_info.get("dpmem") if isinstance(machine_info.get("dpmem"), dict) else {}
    cases, max_batches = [], []
    for position, bench in enumerate([*benchmarks, *untimed]):
        name = bench.get("name", f"#{position}") if isinstance(bench, dict) else f"#{position}"
        extra = bench.get("extra_info") if isinstance(bench, dict) else None
        if not isinstance(extra, dict) or "workload" not in extra:
            raise ReportInputError(f"{path}: benchmark {name!r} has no dpmem extra_info (not a dpmem result file?)")
        try:
            record = from_record_dict(extra)
        except RecordError as exc:
            raise ReportInputError(f"{path}: benchmark {name!r}: {exc}") from None
        if isinstance(record, MaxBatchRecord):
            max_batches.append(record)
            continue
        extras = _stats_columns(bench.get("stats"))
        extras.update(_machine_columns(record, dpmem_info, machine_info))
        cases.append((record, extras))
    return _Loaded(cases, max_batches, [], "pytest-benchmark")


def _stats_columns(stats: Any) -> dict[str, Any]:
    if not isinstance(stats, dict):
        return {}
    mapping = {
        "median": "time_median_s",
        "mean": "time_mean_s",
        "min": "time_min_s",
        "max": "time_max_s",
        "stddev": "time_stddev_s",
        "rounds": "rounds",
    }
    return {column: stats[key] for key, column in mapping.items() if isinstance(stats.get(key), (int, float))}


def _machine_columns(record: CaseRecord, dpmem_info: dict[str, Any], machine_info: dict[str, Any]) -> dict[str, Any]:
    """Fill device name / runner label from the file's machine_info where the record itself lacks them."""
    columns: dict[str, Any] = {}
    gpus = dpmem_info.get("gpus") if isinstance(dpmem_info.get("gpus"), list) else []
    if record.device_name is None:
        if record.device.startswith("cuda") and gpus and isinstance(gpus[0], dict):
            index = _cuda_index(record.device)
            gpu = gpus[index] if index < len(gpus) and isinstance(gpus[index], dict) else gpus[0]
            columns["device_name"] = gpu.get("name")
        elif record.device == "cpu":
            generic_cpu = machine_info.get("cpu") if isinstance(machine_info.get("cpu"), dict) else {}
            columns["device_name"] = dpmem_info.get("cpu") or generic_cpu.get("brand_raw")
    if record.runner_label is None and dpmem_info.get("runner_label"):
        columns["runner_label"] = dpmem_info["runner_label"]
    return columns


def _cuda_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _load_jsonl(path: Path, text: str) -> _Loaded:
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    last_number = numbered[-1][0]
    cases: list[tuple[CaseRecord, dict[str, Any]]] = []
    max_batches: list[MaxBatchRecord] = []
    warnings: list[str] = []
    for number, line in numbered:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last_number and (cases or max_batches):
                kept = len(cases) + len(max_batches)
                warnings.append(
                    f"{path}: last line {number} is truncated (killed run?); skipped it, kept {kept} record(s)"
                )
                continue
            what = "not JSON" if number == 1 else f"line {number} is not JSON"
            raise ReportInputError(f"{path}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        if not isinstance(data, dict) or not ("record_type" in data or "workload" in data):
            kind = type(data).__name__ if not isinstance(data, dict) else "object without record_type/workload"
            raise ReportInputError(f"{path}: line {number}: JSON {kind} is not a dpmem record (foreign JSON?)")
        try:
            record = from_jsonl_line(line)
        except RecordError as exc:
            raise ReportInputError(f"{path}: line {number}: {exc}") from None
        if record.schema_version > SCHEMA_VERSION:
            # MaxBatchRecord.from_dict does not check it; a newer schema must fail the same way for both.
            raise ReportInputError(
                f"{path}: line {number}: record schema_version {record.schema_version} is newer than this suite's "
                f"({SCHEMA_VERSION}); update dpmem to read it"
            )
        if isinstance(record, CaseRecord):
            cases.append((record, {}))
        else:
            max_batches.append(record)
    return _Loaded(cases, max_batches, warnings, "jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Many files → one tidy table
# ---------------------------------------------------------------------------------------------------------------
def load_results(
    paths: Iterable[str | Path],
    *,
    skip_bad: bool = False,
    warn: Callable[[str], None] = _warn_stderr,
) -> Results:
    """Load every file into one :class:`Results`.

    A bad file raises :class:`ReportInputError`, or with ``skip_bad`` is reported through ``warn`` and left out.
    When the same case × machine appears more than once (e.g. both the .json and the .jsonl of one run), the row
    with timing wins, then the one loaded last."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportInputError("no result files given")
    rows: list[dict[str, Any]] = []
    case_records: list[CaseRecord] = []
    mb_rows: list[dict[str, Any]] = []
    mb_records: list[MaxBatchRecord] = []
    warnings: list[str] = []
    sources: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    for path in paths:
        try:
            loaded = load_file(path)
        except ReportInputError as exc:
            if not skip_bad:
                raise
            note(f"skipped {exc}")
            continue
        sources.append(str(path))
        for message in loaded.warnings:
            note(message)
        for record, extras in loaded.cases:
            rows.append({**_case_row(record, extras, str(path), len(case_records)), "_format": loaded.format})
            case_records.append(record)
        for record in loaded.max_batches:
            mb_rows.append(_max_batch_row(record, str(path), len(mb_records)))
            mb_records.append(record)
    if not sources:
        raise ReportInputError("no usable result file (every input was skipped)")

    cases = pd.DataFrame(rows, columns=[*_case_columns(), "_format"])
    if not cases.empty:
        cases["_order"] = range(len(cases))
        cases["_timed"] = cases["time_median_s"].notna()
        # A run's .json and .jsonl hold the same cases: expected, silent. The same case twice in one format
        # (two runs of one machine) is a real conflict: said.
        conflicts = int(cases.duplicated([*CASE_KEY, "_format"]).sum())
        cases = cases.sort_values(["_timed", "_order"]).drop_duplicates(list(CASE_KEY), keep="last")
        if conflicts:
            note(f"{conflicts} case row(s) appear more than once (same case and machine); kept the timed, latest one")
        cases = (
            cases.sort_values(["machine", "device", "workload", "method", "batch_size"])
            .drop(columns=["_order", "_timed", "_format"])
            .reset_index(drop=True)
        )
        cases["batch_size"] = cases["batch_size"].astype(int)
    max_batches = pd.DataFrame(mb_rows, columns=_max_batch_columns())
    return Results(cases, max_batches, case_records, mb_records, sources, warnings)


def _case_columns() -> list[str]:
    return [
        "workload",
        "method",
        "batch_size",
        "device",
        "status",
        "reason",
        "family",
        *MEMORY_COLUMNS,
        *(f"breakdown_{c}" for c in CATEGORIES),
        *_RECORD_FACTS,
        *_TIME_COLUMNS,
        "device_name",
        "runner_label",
        "machine",
        "source",
        "record_index",
    ]


def _case_row(record: CaseRecord, extras: dict[str, Any], source: str, index: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "workload": record.workload,
        "method": record.method,
        "batch_size": record.batch_size,
        "device": record.device,
        "status": record.status,
        "reason": record.reason,
        "family": record.family or workload_family(record.workload),  # older records lack the field
    }
    for name in (*MEMORY_COLUMNS, *_RECORD_FACTS):
        row[name] = getattr(record.memory if hasattr(record.memory, name) else record, name)
    for category in CATEGORIES:
        row[f"breakdown_{category}"] = record.memory.breakdown.get(category)
    # The record carries timing from the timed rounds; the benchmark's own stats fill what it lacks.
    timing = record.timing
    row["time_median_s"] = timing.time_median_s
    row["time_mean_s"] = timing.time_mean_s
    row["time_min_s"] = timing.time_min_s
    row["time_max_s"] = timing.time_max_s
    row["time_stddev_s"] = timing.time_stddev_s
    row["rounds"] = timing.rounds or None
    row["device_name"] = record.device_name
    row["runner_label"] = record.runner_label
    for key, value in extras.items():
        if row.get(key) is None:
            row[key] = value
    row["machine"] = machine_label(row["runner_label"], row["device_name"], record.device)
    row["source"] = source
    row["record_index"] = index
    return row


def machine_label(runner_label: str | None, device_name: str | None, device: str) -> str:
    """The machine a row was measured on: the CI runner label if set, else the device's name, else the device."""
    return runner_label or device_name or device


def _max_batch_columns() -> list[str]:
    return [
        "workload",
        "method",
        "device",
        "status",
        "reason",
        "family",
        "memory_limit_bytes",
        "max_batch_measured",
        "first_failing_batch",
        "fit_metric",
        "fit_fixed_bytes",
        "fit_per_sample_bytes",
        "predicted_max_batch",
        "device_name",
        "runner_label",
        "machine",
        "source",
        "record_index",
    ]


def _max_batch_row(record: MaxBatchRecord, source: str, index: int) -> dict[str, Any]:
    predicted = None
    if record.predicted_max_batch:
        # The prediction for the memory the search ran under; else the largest memory size given.
        key = str(record.memory_limit_bytes)
        if key not in record.predicted_max_batch:
            key = max(record.predicted_max_batch, key=lambda k: float(k) if _is_number(k) else -1.0)
        predicted = record.predicted_max_batch[key]
    return {
        "workload": record.workload,
        "method": record.method,
        "device": record.device,
        "status": record.status,
        "reason": record.reason,
        "family": workload_family(record.workload),
        "memory_limit_bytes": record.memory_limit_bytes,
        "max_batch_measured": record.max_batch_measured,
        "first_failing_batch": record.first_failing_batch,
        "fit_metric": record.fit_metric,
        "fit_fixed_bytes": record.fit_fixed_bytes,
        "fit_per_sample_bytes": record.fit_per_sample_bytes,
        "predicted_max_batch": predicted,
        "device_name": record.device_name,
        "runner_label": record.runner_label,
        "machine": machine_label(record.runner_label, record.device_name, record.device),
        "source": source,
        "record_index": index,
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
