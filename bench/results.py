"""Crash-safe JSON-lines results: each finished case is appended, flushed and fsynced at once.

pytest-benchmark writes its JSON only when the session ends; a run killed midway (OOM killer, CI timeout,
Ctrl-C) keeps every case already appended here. The reports read both formats.

A write that stops partway (a killed run, a full disk, ``ulimit -f``) leaves a cut last line. Every append first
looks at the file's last byte and, when that line is not ended, starts on a new line: the cut line stays alone,
and the reports skip it with a warning naming its line while every complete record loads. A record that could
not be written whole raises :class:`RecordNotWrittenError` saying how much of it reached the file; the writer
counts only the records written whole and keeps the others in :attr:`ResultsWriter.lost`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from bench.record import CaseRecord, MaxBatchRecord, to_jsonl_line


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

    def append(self, record: CaseRecord | MaxBatchRecord) -> None:
        """Append ``record`` as one line; raise :class:`RecordNotWrittenError` unless it is in the file whole."""
        line = (to_jsonl_line(record) + "\n").encode("utf-8")
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
