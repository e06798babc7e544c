"""Load result files into tidy DataFrames: one row per case × machine, one per max-batch search.

The files are read by :func:`bench.results.files.read_result_file`, the one place that knows their formats; a file it
cannot read is a :class:`ReportInputError` with its one-line message. Here the cases of many files become one
table: a case × machine seen twice keeps its timed, latest record, and one many-rank case's nodes are combined.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from bench.results.files import LoadedCase, ResultFileError, machine_label, read_result_file
from bench.results.record import (
    CATEGORIES,
    CaseRecord,
    MaxBatchRecord,
    StepMemory,
    StepWork,
    TimeEstimate,
    Timing,
    cell_fields,
    combine_rank_records,
)

from .tables import ONE_PROCESS, affine_fit_table, overhead_table

__all__ = [
    "CASE_KEY",
    "MEMORY_COLUMNS",
    "PEAK_COLUMNS",
    "WORK_COLUMNS",
    "ReportInputError",
    "Results",
    "case_key",
    "is_predicted",
    "load_results",
    "workload_family",
]

# Columns that identify one case on one machine; a result set has at most one row per key. The training mode
# (precision, checkpointing, trainable) is part of the case: records older than it read as fp32 without
# checkpointing, full training.
# ``world_size`` and ``parallel`` (the strategy, ONE_PROCESS = "none" for one process) tell a case on many ranks
# from the one-process case.
CASE_KEY = (
    "workload",
    "method",
    "batch_size",
    "device",
    "precision",
    "checkpointing",
    "trainable",
    "world_size",
    "parallel",
    "machine",
)

# The byte figures of a step (StepMemory's ``*_bytes`` cells; its breakdown is added as breakdown_<category>).
MEMORY_COLUMNS = tuple(name for name in cell_fields(StepMemory) if name.endswith("_bytes"))

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


# A step's work totals and estimated time: numbers in the frame, NaN where a record has none (not counted, not
# estimated, or older than the fields).
WORK_COLUMNS = (*cell_fields(StepWork), "estimated_step_s")


class ReportInputError(ValueError):
    """A result file the reports cannot use; the message is one line naming the file and the problem."""


def case_key(case: LoadedCase) -> tuple:
    """The case's :data:`CASE_KEY` values."""
    r = case.record
    mode = (r.workload, r.method, r.batch_size, r.device, r.precision, r.checkpointing, r.trainable)
    return *mode, r.world_size, r.parallel or ONE_PROCESS, case.machine


@dataclass
class Results:
    """Loaded results: one row per case × machine in ``cases``, one per max-batch search in ``max_batches``.

    Each row's ``record`` column holds the record the loader decoded (phases, timeline and breakdown for the
    figures); ``loaded_cases`` are the typed cases in row order (the completed record for ``merge``),
    ``max_batch_records`` likewise for ``max_batches``. ``overhead`` and ``fits`` are the two derived tables,
    built once on first use and shared by the report, the summary and the figures (treat them, like ``cases``, as
    read-only)."""

    cases: pd.DataFrame
    max_batches: pd.DataFrame
    loaded_cases: list[LoadedCase] = field(default_factory=list)
    max_batch_records: list[MaxBatchRecord] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
    the device is ``meta``. A JAX case ("xla-compiled": XLA's buffer assignment) is predicted on meta (lowered with
    stand-ins, nothing run) and measured on a real device (timed, its RSS sampled)."""
    if isinstance(row, (dict, pd.Series)):
        measurement, device = row.get("measurement"), row.get("device")
    else:
        measurement, device = row.measurement, row.device
    if measurement == "xla-compiled":
        return str(device) == "meta"
    if isinstance(measurement, str):
        return measurement == "predicted"
    return str(device) == "meta"


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    file per node): combined into one record of every rank (:func:`~bench.results.record.combine_rank_records`)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReportInputError("no result files given")
    chosen = _ChosenCases()
    mb_records: list[MaxBatchRecord] = []
    warnings: list[str] = []
    sources: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        warn(message)

    for path in paths:
        try:
            loaded = read_result_file(path)
        except ResultFileError as exc:
            if not skip_bad:
                raise ReportInputError(str(exc)) from None
            note(f"skipped {exc}")
            continue
        sources.append(str(path))
        for message in loaded.warnings:
            note(message)
        for case in loaded.cases:
            chosen.add(case, loaded.format)
        mb_records += loaded.max_batches
    if not sources:
        raise ReportInputError("no usable result file (every input was skipped)")
    if chosen.conflicts:
        note(
            f"{chosen.conflicts} case row(s) appear more than once (same case and machine); kept the timed, latest one"
        )
    loaded_cases = sorted(chosen.by_key.values(), key=lambda c: (c.machine, c.record.device, *case_key(c)[:3]))
    rows = [_case_row(case) for case in loaded_cases]
    cases = pd.DataFrame(rows, columns=list(_CASE_COLUMNS))
    cases["batch_size"] = cases["batch_size"].astype(int)
    cases[list(WORK_COLUMNS)] = cases[list(WORK_COLUMNS)].astype(float)  # None (not counted, older record) -> NaN
    max_batches = pd.DataFrame([_max_batch_row(r) for r in mb_records], columns=list(_MAX_BATCH_COLUMNS))
    return Results(cases, max_batches, loaded_cases, mb_records, sources, warnings)


@dataclass
class _ChosenCases:
    """One case per :data:`CASE_KEY` from every file read: the timed one, then the one read last; one many-rank
    case's records that hold different ranks (one file per node) combined."""

    by_key: dict[tuple, LoadedCase] = field(default_factory=dict)
    per_format: Counter[tuple] = field(default_factory=Counter)  # (key, file format) -> cases read

    def add(self, case: LoadedCase, file_format: str) -> None:
        key = case_key(case)
        previous = self.by_key.get(key)
        if previous is not None and _other_ranks(previous, case):  # another node's ranks of the same case
            combined = combine_rank_records([previous.record, case.record])
            self.by_key[key] = dataclasses.replace(previous, record=combined, source=f"{previous.source}+")
            return
        self.per_format[(key, file_format)] += 1
        if previous is None or case.timed or not previous.timed:
            self.by_key[key] = case

    @property
    def conflicts(self) -> int:
        """Cases read more than once in one format (two runs of one machine: a real conflict, said). A run's .json
        and .jsonl hold the same cases: expected, silent."""
        return sum(count - 1 for count in self.per_format.values())


def _other_ranks(previous: LoadedCase, case: LoadedCase) -> bool:
    """Whether two records of one many-rank case hold disjoint ranks (two nodes' shares)."""
    mine = {r.rank for r in previous.record.ranks}
    theirs = {r.rank for r in case.record.ranks}
    return previous.record.world_size > 1 and bool(mine) and bool(theirs) and not mine & theirs


# A case row: the record's cells, its memory's cells and breakdown, all of its timing (the per-round lists too: the
# noise rule reads them), its work totals (flops, bytes_accessed, op_count) and its time estimate (estimated_step_s,
# estimate_gpu, ...; NaN / None in a record older than them), then where it was read, and the record itself.
_CASE_COLUMNS = (
    *cell_fields(CaseRecord),
    *cell_fields(StepMemory),
    *(f"breakdown_{c}" for c in CATEGORIES),
    *(f.name for f in dataclasses.fields(Timing)),
    *cell_fields(StepWork),
    *cell_fields(TimeEstimate),
    "machine",
    "source",
    "record",
)


def _case_row(case: LoadedCase) -> dict[str, Any]:
    record = case.record
    row: dict[str, Any] = {name: getattr(record, name) for name in cell_fields(CaseRecord)}
    row |= {name: getattr(record.memory, name) for name in cell_fields(StepMemory)}
    row |= {f"breakdown_{category}": record.memory.breakdown.get(category) for category in CATEGORIES}
    row |= dataclasses.asdict(record.timing)
    row |= {name: getattr(record.work, name) for name in cell_fields(StepWork)}
    row |= {name: getattr(record.estimate, name) for name in cell_fields(TimeEstimate)}
    return row | {
        "parallel": record.parallel or ONE_PROCESS,
        "family": record.family or workload_family(record.workload),  # older records lack the field
        "rounds": record.timing.rounds or None,  # 0 rounds: not timed
        "device_name": case.device_name,
        "runner_label": case.runner_label,
        "machine": case.machine,
        "source": case.source,
        "record": record,
    }


# A max-batch row: the record's cells, then what the reports derive from it, and the record itself.
_MAX_BATCH_COLUMNS = (
    *cell_fields(MaxBatchRecord),
    "family",
    "predicted_max_batch",
    "budgets",
    "machine",
    "record",
)


def _max_batch_row(record: MaxBatchRecord) -> dict[str, Any]:
    row: dict[str, Any] = {name: getattr(record, name) for name in cell_fields(MaxBatchRecord)}
    return row | {
        "family": workload_family(record.workload),
        "predicted_max_batch": _predicted_max_batch(record),
        "budgets": list(record.budgets),  # meta: the exact answer per memory budget (BudgetAnswer)
        "machine": machine_label(record.runner_label, record.device_name, record.device),
        "record": record,
    }


def _predicted_max_batch(record: MaxBatchRecord) -> int | None:
    """The fit's prediction for the memory the search ran under; else for the largest memory size given."""
    if not record.predicted_max_batch:
        return None
    key = str(record.memory_limit_bytes)
    if key not in record.predicted_max_batch:
        key = max(record.predicted_max_batch, key=lambda k: float(k) if _is_number(k) else -1.0)
    return record.predicted_max_batch[key]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
