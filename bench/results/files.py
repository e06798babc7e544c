"""Result files, written and read: the only code that knows their formats.

Writing: crash-safe JSON lines, each finished case appended, flushed and fsynced at once. pytest-benchmark writes
its JSON only when the session ends; a run killed midway (OOM killer, CI timeout, Ctrl-C) keeps every case
already appended here. A write that stops partway (a killed run, a full disk, ``ulimit -f``) leaves a cut last
line. Every append first looks at the file's last byte and, when that line is not ended, starts on a new line:
the cut line stays alone, and the reader skips it with a warning naming its line while every complete record
loads. A record that could not be written whole raises :class:`RecordNotWrittenError` saying how much of it
reached the file; the writer counts only the records written whole and keeps the others in
:attr:`ResultsWriter.lost`.

Reading (:func:`read_result_file`; the reports and ``--calibrate`` read with it): two formats, told apart by
content (never by file name):

* pytest-benchmark JSON: one object with ``machine_info`` and ``benchmarks`` (the timed cases: each one's
  ``extra_info`` is a :class:`bench.results.record.CaseRecord` dict, ``stats`` its timing) and ``dpmem_untimed`` (OOM,
  unsupported and max-batch results, kept out of ``benchmarks`` so pytest-benchmark's own tools read the file);
* JSON lines: one :func:`bench.results.record.to_jsonl_line` object per line. A killed run or a full disk may leave a
  truncated line (the last one, or anywhere when later runs appended to the same file: the writer starts each
  record on a new line): it is skipped with a warning naming its line and every complete line is kept.

Each object is parsed once with :mod:`json` and turned into a record by :func:`bench.results.record.from_record_dict`,
which checks every field against the record's types and domains (statuses, training modes, ranks within the
world size; numbers finite, not negative, an int64 at most); nothing from the input is evaluated or unpickled. A
bad record is a one-line :class:`ResultFileError` naming the file, the line (JSON lines) or the benchmark list
and index (pytest-benchmark JSON), the case and the field; never a record silently left out.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.messages import first_line
from bench.results.record import CaseRecord, MaxBatchRecord, RecordError, from_record_dict, to_jsonl_line


class ResultsWriterError(ValueError):
    """The results file cannot be written; one line naming it (checked before the first case runs)."""


class RecordNotWrittenError(OSError):
    """One record is not (whole) in the results file; the message is one line saying which and how much is."""

    def __init__(self, record_name: str, message: str):
        super().__init__(message)
        self.record_name = record_name


class ResultsWriter:
    """Append records to ``path`` (created with its folder on the first write), one JSON object per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0  # records written whole
        self.lost: list[RecordNotWrittenError] = []  # records not (whole) in the file, in order
        _check_writable(self.path)

    def append(self, record: CaseRecord | MaxBatchRecord, data: dict[str, Any] | None = None) -> None:
        """Append ``record`` as one line (``data``: its ``to_dict()`` if made already, see :func:`to_jsonl_line`);
        raise :class:`RecordNotWrittenError` unless it is in the file whole."""
        line = (to_jsonl_line(record, data) + "\n").encode("utf-8")
        name = record_name(record)
        written = 0  # bytes of the line that reached the file
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: one write per line, so parallel writers (one process per GPU) never interleave a line.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                # A line cut by a killed run, a full disk or another writer's failed write is ended first, in the
                # same write, so this record starts a line of its own.
                prefix = b"" if _ends_a_line(fd) else b"\n"
                done, error = _write_all(fd, prefix + line)
                written = max(done - len(prefix), 0)
                if error is None:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if error is not None:
                raise error
        except OSError as exc:
            why = os_error_text(exc)
            if written >= len(line):
                what = f"written but not synced to disk ({why}): it may be missing after a crash"
            elif written > 0:
                what = f"not written ({why}): {written} of its {len(line)} bytes were, a cut line the reports skip"
            else:
                what = f"not written ({why})"
            lost = RecordNotWrittenError(name, f"--results {self.path}: {name}: {what}")
            self.lost.append(lost)
            raise lost from None
        self.count += 1

    def summary(self) -> list[str]:
        """The end-of-session lines: how many records were appended whole, and which ones failed (and why)."""
        lines = [f"{self.count} result record(s) appended to {self.path}"] if self.count else []
        if self.lost:
            shown = ", ".join(lost.record_name for lost in self.lost[:10])
            more = f" and {len(self.lost) - 10} more" if len(self.lost) > 10 else ""
            lines.append(f"{len(self.lost)} result record(s) FAILED to write to {self.path}: {shown}{more}")
            lines.append(f"first: {self.lost[0]}")
        return lines


def record_name(record: CaseRecord | MaxBatchRecord) -> str:
    """ "case dit-tiny-cond-bk-bs4-cpu-amp-bf16" or "max-batch search gpt-tiny-nondp-cpu": which record."""
    parts = [record.workload, record.method]
    if isinstance(record, CaseRecord):
        parts.append(f"bs{record.batch_size}")
    parts.append(record.device)
    parts += [mode for mode, default in ((record.precision, "fp32"), (record.checkpointing, "none")) if mode != default]
    if isinstance(record, CaseRecord) and record.world_size > 1:
        parts.append(f"{record.parallel}{record.world_size}")
    return ("case " if isinstance(record, CaseRecord) else "max-batch search ") + "-".join(parts)


def os_error_text(exc: OSError) -> str:
    """ "No space left on device [ENOSPC]": the system's words and the error's name."""
    code = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" [{code}]" if code else "")


def _ends_a_line(fd: int) -> bool:
    """Whether the file is empty or its last byte ends a line."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """(bytes written, the error that stopped it or None): ``data`` written again after a short write. A regular
    file writes short only when it cannot take more (a full disk, the file-size limit); the next write says why."""
    view, written = memoryview(data), 0
    while written < len(data):
        try:
            count = os.write(fd, view[written:])
        except OSError as exc:
            return written, exc
        if count == 0:  # never for a regular file with room: do not spin
            return written, OSError(errno.EIO, "the write took no byte")
        written += count
    return written, None


def _check_writable(path: Path) -> None:
    """Raise :class:`ResultsWriterError` unless ``path`` can be appended to (without creating anything yet)."""
    where = f"--results {path}"
    if path.exists():
        if not path.is_file():
            raise ResultsWriterError(f"{where}: is a directory or not a regular file; give a .jsonl file path")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ResultsWriterError(f"{where}: file is not readable and writable (each append reads its last byte)")
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ResultsWriterError(f"{where}: cannot create it ({ancestor} is not a writable directory)")


# ---------------------------------------------------------------------------------------------------------------
# Reading: both formats
# ---------------------------------------------------------------------------------------------------------------
class ResultFileError(ValueError):
    """A result file that cannot be read; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class LoadedCase:
    """One case as read: the record as written, and the machine facts the reader completed it with.

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
    def timed(self) -> bool:
        return self.record.timing.time_median_s is not None

    def completed_record(self) -> CaseRecord:
        """The record with the machine facts filled in (what ``python -m reports merge`` writes)."""
        return dataclasses.replace(self.record, device_name=self.device_name, runner_label=self.runner_label)


def machine_label(runner_label: str | None, device_name: str | None, device: str) -> str:
    """The machine a row was measured on: the CI runner label if set, else the device's name, else the device."""
    return runner_label or device_name or device


def _checked_record(data: dict[str, Any], stats: Any = None) -> CaseRecord | MaxBatchRecord:
    """The record of one parsed JSON object, its timing completed from pytest-benchmark ``stats`` where given;
    every field is checked by the record type (:mod:`bench.results.record`), RecordError naming the first bad one."""
    return from_record_dict(_with_stats(data, stats) if stats is not None else data)


def _case_name(data: Any) -> str:
    """ "workload/method/bsN/device" of a raw record object, as far as it has those keys (for messages)."""
    if not isinstance(data, dict):
        return "?"
    parts = [data.get("workload"), data.get("method"), data.get("batch_size"), data.get("device")]
    if parts[2] is not None:
        parts[2] = f"bs{parts[2]}"
    return "/".join(f"{p}"[:60] for p in parts if p is not None) or "?"


@dataclass
class ResultFile:
    """What one result file holds: its cases, its max-batch searches, the warnings reading it gave (lines cut
    by a killed run) and its format."""

    cases: list[LoadedCase]
    max_batches: list[MaxBatchRecord]
    warnings: list[str]
    format: str  # "pytest-benchmark" or "jsonl"


def read_result_file(path: str | Path) -> ResultFile:
    """Parse one file of either format; raises :class:`ResultFileError` naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: cannot read: {exc}") from None
    if not text.strip():
        raise ResultFileError(f"{path}: empty file")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # not one JSON document: JSON lines, or broken (said line by line below)
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit, nesting past the stack
        raise ResultFileError(f"{path}: unreadable JSON: {first_line(exc) or 'nested too deeply'}") from None
    if isinstance(whole, dict) and "benchmarks" in whole:
        return _load_pytest_benchmark(path, whole)
    if whole is not None and not (isinstance(whole, dict) and ("record_type" in whole or "workload" in whole)):
        kind = "object" if isinstance(whole, dict) else type(whole).__name__
        raise ResultFileError(
            f"{path}: foreign JSON (a JSON {kind} that is neither pytest-benchmark output nor dpmem JSON lines)"
        )
    return _load_jsonl(path, text)


def _load_pytest_benchmark(path: Path, data: dict[str, Any]) -> ResultFile:
    """Timed cases from ``benchmarks``; untimed ones (OOM, unsupported, max-batch searches) from
    ``dpmem_untimed``, where the bench keeps them so pytest-benchmark's own tools can read ``benchmarks``."""
    benchmarks, untimed = data.get("benchmarks"), data.get("dpmem_untimed", [])
    if not isinstance(benchmarks, list) or not isinstance(untimed, list):
        raise ResultFileError(f"{path}: pytest-benchmark JSON whose 'benchmarks' or 'dpmem_untimed' is not a list")
    if not benchmarks and not untimed:
        raise ResultFileError(f"{path}: pytest-benchmark JSON with no benchmarks")
    machine_info = _dict(data.get("machine_info"))
    cases, max_batches = [], []
    entries = [("benchmarks", i, b) for i, b in enumerate(benchmarks)]
    for list_name, index, bench in [*entries, *(("dpmem_untimed", i, b) for i, b in enumerate(untimed))]:
        bench = _dict(bench)
        name = bench.get("name")
        where = f"{list_name}[{index}]" + (f" {name!r:.120}" if isinstance(name, str) else "")
        extra = bench.get("extra_info")
        if not isinstance(extra, dict) or "workload" not in extra:
            raise ResultFileError(f"{path}: {where} has no dpmem extra_info (not a dpmem result file?)")
        try:
            record = _checked_record(extra, bench.get("stats"))
        except RecordError as exc:
            raise ResultFileError(f"{path}: {where}: {_case_name(extra)}: {exc}") from None
        if isinstance(record, MaxBatchRecord):
            max_batches.append(record)
            continue
        device_name, runner_label = _machine_facts(record, machine_info)
        cases.append(LoadedCase(record, device_name, runner_label, str(path)))
    return ResultFile(cases, max_batches, [], "pytest-benchmark")


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


def _load_jsonl(path: Path, text: str) -> ResultFile:
    lines = text.splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    cases: list[LoadedCase] = []
    max_batches: list[MaxBatchRecord] = []
    warnings: list[str] = []
    cut: list[tuple[int, ResultFileError]] = []  # (line number, the error if the file holds nothing else)
    for number, line in numbered:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            what = "not JSON" if number == 1 else f"line {number} is not JSON"
            error = ResultFileError(f"{path}: {what} ({exc.msg} at line {exc.lineno} column {exc.colno})")
            if not _is_cut_record(line, exc):
                raise error from None
            cut.append((number, error))
            continue
        except (ValueError, RecursionError) as exc:
            raise ResultFileError(f"{path}: line {number}: unreadable JSON: {first_line(exc)}") from None
        if not isinstance(data, dict) or not ("record_type" in data or "workload" in data):
            kind = type(data).__name__ if not isinstance(data, dict) else "object without record_type/workload"
            raise ResultFileError(f"{path}: line {number}: JSON {kind} is not a dpmem record (foreign JSON?)")
        try:
            record = _checked_record(data)
        except RecordError as exc:
            raise ResultFileError(f"{path}: line {number}: {_case_name(data)}: {exc}") from None
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
    return ResultFile(cases, max_batches, warnings, "jsonl")


def _is_cut_record(line: str, exc: json.JSONDecodeError) -> bool:
    """Whether a line that is not JSON is the start of a record whose write stopped partway: it opens an object
    and either does not end it or ends where the parser ran out of text. :class:`ResultsWriter` starts every
    record on a new line, so a cut record stays alone on its line, wherever it is in the file; anything else that
    is not JSON (two records glued together, foreign text) is an error."""
    text = line.rstrip()
    return text.startswith("{") and (exc.pos >= len(text) or not text.endswith("}"))
