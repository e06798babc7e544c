"""Load result files into tidy DataFrames — the only code in the reports that knows the file formats.

Two formats, told apart by content (never by file name):

* pytest-benchmark JSON: one object with ``machine_info`` and ``benchmarks`` (the timed cases: each one's
  ``extra_info`` is a :class:`bench.record.CaseRecord` dict, ``stats`` its timing) and ``dpmem_untimed`` (OOM,
  unsupported and max-batch results, kept out of ``benchmarks`` so pytest-benchmark's own tools read the file);
* JSON lines: one :func:`bench.record.to_jsonl_line` object per line. A killed run or a full disk may leave a
  truncated line (the last one, or anywhere when later runs appended to the same file: the writer starts each
  record on a new line): it is skipped with a warning naming its line and every complete line is kept.

Each object is parsed once with :mod:`json` and turned into a record by :func:`bench.record.from_record_dict`,
which checks every field against the record's types and domains (statuses, training modes, ranks within the
world size; numbers finite, not negative, an int64 at most); nothing from the input is evaluated or unpickled. A
bad record is a one-line :class:`ReportInputError` naming the file, the line (JSON lines) or the benchmark list
and index (pytest-benchmark JSON), the case and the field; never a record silently left out.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from bench.messages import first_line
from bench.record import (
    CATEGORIES,
    CaseRecord,
    MaxBatchRecord,
    RecordError,
    Timing,
    combine_rank_records,
    from_record_dict,
)

from .tables import ONE_PROCESS, affine_fit_table, overhead_table

__all__ = [
    "CASE_KEY",
    "MEMORY_COLUMNS",
    "PEAK_COLUMNS",
    "LoadedCase",
    "ReportInputError",
    "Results",
    "is_predicted",
    "load_file",
    "load_results",
    "machine_label",
    "workload_family",
]

# Columns that identify one case on one machine; a result set has at most one row per key. The training mode
# (precision, checkpointing) is part of the case: records older than it read as fp32 without checkpointing.
# ``world_size`` and ``parallel`` (the strategy, ONE_PROCESS = "none" for one process) tell a case on many ranks
# from the one-process case.
CASE_KEY = (
    "workload",
    "method",
    "batch_size",
    "device",
    "precision",
    "checkpointing",
    "world_size",
    "parallel",
    "machine",
)

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

# Every peak figure of a case (the regression gate chooses which of them it gates: reports.compare).
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
_TIME_COLUMNS = tuple(f.name for f in dataclasses.fields(Timing))


class ReportInputError(ValueError):
    """A result file the reports cannot use; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class LoadedCase:
    """One case as loaded: the record as written, and the machine facts the loader completed it with.

    ``device_name`` and ``runner_label`` are the record's own, else (pytest-benchmark JSON) the file's
    ``machine_info``; ``timing`` was likewise completed from pytest-benchmark's ``stats`` where the record lacks
    it (files written before records carried their timing)."""

    record: CaseRecord
    device_name: str | None
    runner_label: str | None
    source: str

    @property
    def machine(self) -> str:
        return machine_label(self.runner_label, self.device_name, self.record.device)

    @property
    def key(self) -> tuple:
        """The case's CASE_KEY values."""
        r = self.record
        case = (r.workload, r.method, r.batch_size, r.device, r.precision, r.checkpointing)
        return *case, r.world_size, r.parallel or ONE_PROCESS, self.machine

    @property
    def timed(self) -> bool:
        return self.record.timing.time_median_s is not None

    def completed_record(self) -> CaseRecord:
        """The record with the machine facts filled in (what ``python -m reports merge`` writes)."""
        return dataclasses.replace(self.record, device_name=self.device_name, runner_label=self.runner_label)


@dataclass
class Results:
    """Loaded results: one row per case × machine in ``cases``, one per max-batch search in ``max_batches``.

    ``loaded_cases[i]`` is the typed case of the row whose ``record_index`` is ``i`` (phases, timeline and
    breakdown for the figures, the completed record for ``merge``); ``max_batch_records`` likewise for
    ``max_batches``. ``overhead`` and ``fits`` are the two derived tables, built once on first use and shared by
    the report, the summary and the figures (treat them, like ``cases``, as read-only)."""

    cases: pd.DataFrame
    max_batches: pd.DataFrame
    loaded_cases: list[LoadedCase] = field(default_factory=list)
    max_batch_records: list[MaxBatchRecord] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self, row: pd.Series | dict[str, Any]) -> CaseRecord:
        return self.loaded_cases[int(row["record_index"])].record

    @cached_property
    def overhead(self) -> pd.DataFrame:
        """:func:`reports.tables.overhead_table` of ``cases``."""
        return overhead_table(self.cases)

    @cached_property
    def fits(self) -> pd.DataFrame:
        """:func:`reports.tables.affine_fit_table` of ``cases`` and ``max_batches``."""
        return affine_fit_table(self.cases, self.max_batches)


def workload_family(name: str) -> str:
    """ "dit", "dit-plain" or "gpt" from a workload name or spec (built-in names start with their family; the
    plain DiTs have a ``plain`` part: ``dit-xl-2-plain``, ``dit-tiny-plain:depth=4``), else "other"; used for
    records without a `family` field and for max-batch records."""
    base = name.split(":", 1)[0].lower()
    if base.startswith("dit"):
        return "dit-plain" if "plain" in base.split("-") else "dit"
    return "gpt" if base.startswith("gpt") else "other"


def is_predicted(row: pd.Series | dict[str, Any] | CaseRecord | MaxBatchRecord) -> bool:
    """True when a row's figures are *predicted* (exact tensor bytes computed on the meta device, nothing
    allocated or timed), False when they were measured. Every report, table and figure asks this one function:
    the record's ``measurement`` field where the row has it, else (a row built from a device name alone) whether
    the device is ``meta``."""
    if isinstance(row, (dict, pd.Series)):
        measurement, device = row.get("measurement"), row.get("device")
    else:
        measurement, device = row.measurement, row.device
    if isinstance(measurement, str):
        return measurement == "predicted"
    return str(device) == "meta"


def machine_label(runner_label: str | None, device_name: str | None, device: str) -> str:
    """The machine a row was measured on: the CI runner label if set, else the device's name, else the device."""
    return runner_label or device_name or device


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _checked_record(data: dict[str, Any], stats: Any = None) -> CaseRecord | MaxBatchRecord:
    """The record of one parsed JSON object, its timing completed from pytest-benchmark ``stats`` where given;
    every field is checked by the record type (:mod:`bench.record`), RecordError naming the first bad one."""
    return from_record_dict(_with_stats(data, stats) if stats is not None else data)


def _case_name(data: Any) -> str:
    """ "workload/method/bsN/device" of a raw record object, as far as it has those keys (for messages)."""
    if not isinstance(data, dict):
        return "?"
    parts = [data.get("workload"), data.get("method"), data.get("batch_size"), data.get("device")]
    if parts[2] is not None:
        parts[2] = f"bs{parts[2]}"
    return "/".join(f"{p}"[:60] for p in parts if p is not None) or "?"


# ---------------------------------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    cases: list[LoadedCase]
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
        whole = None  # not one JSON document: JSON lines, or broken (said line by line below)
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit, nesting past the stack
        raise ReportInputError(f"{path}: unreadable JSON: {first_line(exc) or 'nested too deeply'}") from None
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
    machine_info = _dict(data.get("machine_info"))
    cases, max_batches = [], []
    entries = [("benchmarks", i, b) for i, b in enumerate(benchmarks)]
    for list_name, index, bench in [*entries, *(("dpmem_untimed", i, b) for i, b in enumerate(untimed))]:
        bench = _dict(bench)
        name = bench.get("name")
        where = f"{list_name}[{index}]" + (f" {name!r:.120}" if isinstance(name, str) else "")
        extra = bench.get("extra_info")
        if not isinstance(extra, dict) or "workload" not in extra:
            raise ReportInputError(f"{path}: {where} has no dpmem extra_info (not a dpmem result file?)")
        try:
            record = _checked_record(extra, bench.get("stats"))
        except RecordError as exc:
            raise ReportInputError(f"{path}: {where}: {_case_name(extra)}: {exc}") from None
        if isinstance(record, MaxBatchRecord):
            max_batches.append(record)
            continue
        device_name, runner_label = _machine_facts(record, machine_info)
        cases.append(LoadedCase(record, device_name, runner_label, str(path)))
    return _Loaded(cases, max_batches, [], "pytest-benchmark")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# pytest-benchmark's stats key -> the Timing field it fills where the record has none
_STATS_TIMING = {
    "median": "time_median_s",
    "mean": "time_mean_s",
    "min": "time_min_s",
    "max": "time_max_s",
    "stddev": "time_stddev_s",
    "iqr": "time_iqr_s",
    "rounds": "rounds",
    "iterations": "iterations",
}


def _with_stats(data: dict[str, Any], stats: Any) -> dict[str, Any]:
    """A case's JSON object completed from pytest-benchmark's ``stats`` (then read like the record's own values): all
    of the timing for a record written before records carried it, else only the keys the record lacks."""
    from_stats = {name: value for key, name in _STATS_TIMING.items() if (value := _dict(stats).get(key)) is not None}
    if data.get("time_median_s") is not None:
        from_stats = {name: value for name, value in from_stats.items() if data.get(name) is None}
    return {**data, **from_stats}


def _machine_facts(record: CaseRecord, machine_info: dict[str, Any]) -> tuple[str | None, str | None]:
    """(device name, runner label): the record's own, else from the file's machine_info."""
    dpmem_info = _dict(machine_info.get("dpmem"))
    device_name = record.device_name
    if device_name is None:
        gpus = [_dict(g) for g in dpmem_info.get("gpus", [])] if isinstance(dpmem_info.get("gpus"), list) else []
        if record.device.startswith("cuda") and gpus:
            index = _cuda_index(record.device)
            device_name = (gpus[index] if index < len(gpus) else gpus[0]).get("name")
        elif record.device == "cpu":
            device_name = dpmem_info.get("cpu") or _dict(machine_info.get("cpu")).get("brand_raw")
    runner_label = record.runner_label or dpmem_info.get("runner_label")
    return _text_or_none(device_name), _text_or_none(runner_label)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _cuda_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _load_jsonl(path: Path, text: str) -> _Loaded:
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    cases: list[LoadedCase] = []
    max_batches: list[MaxBatchRecord] = []
    warnings: list[str] = []
    cut: list[tuple[int, ReportInputError]] = []  # (line number, the error if the file holds nothing else)
    for number, line in numbered:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            what = "not JSON" if number == 1 else f"line {number} is not JSON"
            error = ReportInputError(f"{path}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})")
            if not _is_cut_record(line, exc):
                raise error from None
            cut.append((number, error))
            continue
        except (ValueError, RecursionError) as exc:
            raise ReportInputError(f"{path}: line {number}: unreadable JSON: {first_line(exc)}") from None
        if not isinstance(data, dict) or not ("record_type" in data or "workload" in data):
            kind = type(data).__name__ if not isinstance(data, dict) else "object without record_type/workload"
            raise ReportInputError(f"{path}: line {number}: JSON {kind} is not a dpmem record (foreign JSON?)")
        try:
            record = _checked_record(data)
        except RecordError as exc:
            raise ReportInputError(f"{path}: line {number}: {_case_name(data)}: {exc}") from None
        if isinstance(record, CaseRecord):
            cases.append(LoadedCase(record, record.device_name, record.runner_label, str(path)))
        else:
            max_batches.append(record)
    kept = len(cases) + len(max_batches)
    if cut and not kept:
        raise cut[0][1] from None
    if cut:
        which = f"line {cut[0][0]} is" if len(cut) == 1 else f"lines {', '.join(str(n) for n, _ in cut)} are"
        warnings.append(
            f"{path}: {which} truncated (a record cut by a killed run or a full disk); skipped, kept {kept} record(s)"
        )
    return _Loaded(cases, max_batches, warnings, "jsonl")


def _is_cut_record(line: str, exc: json.JSONDecodeError) -> bool:
    """Whether a line that is not JSON is the start of a record whose write stopped partway: it opens an object
    and either does not end it or ends where the parser ran out of text. The bench's writer starts every record
    on a new line (bench.results), so a cut record stays alone on its line, wherever it is in the file; anything
    else that is not JSON (two records glued together, foreign text) is an error."""
    text = line.rstrip()
    return text.startswith("{") and (exc.pos >= len(text) or not text.endswith("}"))


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
    When the same case × machine appears more than once (e.g. both the .json and the .jsonl of one run), the
    timed one wins, then the one loaded last — except a many-rank case's records that hold different ranks (one
    file per node): they are combined into one record of every rank (:func:`bench.record.combine_rank_records`)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportInputError("no result files given")
    chosen: dict[tuple, LoadedCase] = {}
    per_format: Counter[tuple] = Counter()
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
        for case in loaded.cases:
            previous = chosen.get(case.key)
            if previous is not None and _other_ranks(previous, case):  # another node's ranks of the same case
                combined = combine_rank_records([previous.record, case.record])
                chosen[case.key] = dataclasses.replace(previous, record=combined, source=f"{previous.source}+")
                continue
            per_format[(case.key, loaded.format)] += 1
            if previous is None or case.timed or not previous.timed:
                chosen[case.key] = case
        mb_records += loaded.max_batches
    if not sources:
        raise ReportInputError("no usable result file (every input was skipped)")
    # A run's .json and .jsonl hold the same cases: expected, silent. The same case twice in one format (two runs
    # of one machine) is a real conflict: said.
    conflicts = sum(count - 1 for count in per_format.values())
    if conflicts:
        note(f"{conflicts} case row(s) appear more than once (same case and machine); kept the timed, latest one")
    loaded_cases = sorted(chosen.values(), key=lambda c: (c.machine, c.record.device, *c.key[:3]))
    rows = [_case_row(case, index) for index, case in enumerate(loaded_cases)]
    cases = pd.DataFrame(rows, columns=_case_columns())
    cases["batch_size"] = cases["batch_size"].astype(int)
    max_batches = pd.DataFrame(
        [_max_batch_row(r, i) for i, r in enumerate(mb_records)], columns=list(_MAX_BATCH_COLUMNS)
    )
    return Results(cases, max_batches, loaded_cases, mb_records, sources, warnings)


def _other_ranks(previous: LoadedCase, case: LoadedCase) -> bool:
    """Whether two records of one many-rank case hold disjoint ranks (two nodes' shares)."""
    mine = {r.rank for r in previous.record.ranks}
    theirs = {r.rank for r in case.record.ranks}
    return previous.record.world_size > 1 and bool(mine) and bool(theirs) and not mine & theirs


def _case_columns() -> list[str]:
    return [
        *(key for key in CASE_KEY if key != "machine"),
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


def _case_row(case: LoadedCase, index: int) -> dict[str, Any]:
    record = case.record
    row: dict[str, Any] = {
        "workload": record.workload,
        "method": record.method,
        "batch_size": record.batch_size,
        "device": record.device,
        "precision": record.precision,
        "checkpointing": record.checkpointing,
        "world_size": record.world_size,
        "parallel": record.parallel or ONE_PROCESS,
        "status": record.status,
        "reason": record.reason,
        "family": record.family or workload_family(record.workload),  # older records lack the field
    }
    for name in MEMORY_COLUMNS:
        row[name] = getattr(record.memory, name)
    for name in _RECORD_FACTS:
        row[name] = getattr(record.memory if hasattr(record.memory, name) else record, name)
    for category in CATEGORIES:
        row[f"breakdown_{category}"] = record.memory.breakdown.get(category)
    row.update(dataclasses.asdict(record.timing))
    row["rounds"] = record.timing.rounds or None  # 0 rounds: not timed
    row["device_name"], row["runner_label"], row["machine"] = case.device_name, case.runner_label, case.machine
    row["source"] = case.source
    row["record_index"] = index
    return row


_MAX_BATCH_COLUMNS = (
    "workload",
    "method",
    "device",
    "precision",
    "checkpointing",
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
    "budgets",
    "device_name",
    "runner_label",
    "machine",
    "record_index",
)


def _max_batch_row(record: MaxBatchRecord, index: int) -> dict[str, Any]:
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
        "precision": record.precision,
        "checkpointing": record.checkpointing,
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
        "budgets": list(record.budgets),  # meta: the exact answer per memory budget (BudgetAnswer)
        "device_name": record.device_name,
        "runner_label": record.runner_label,
        "machine": machine_label(record.runner_label, record.device_name, record.device),
        "record_index": index,
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
