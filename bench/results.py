"""Crash-safe JSON-lines results: each finished case is appended, flushed and fsynced at once.

pytest-benchmark writes its JSON only when the session ends; a run killed midway (OOM killer, CI timeout,
Ctrl-C) keeps every case already appended here. The reports read both formats.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.record import CaseRecord, MaxBatchRecord, to_jsonl_line


class ResultsWriterError(ValueError):
    """The results file cannot be written; one line naming it (checked before the first case runs)."""


class ResultsWriter:
    """Append records to ``path`` (created with its folder on the first write), one JSON object per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0
        _check_writable(self.path)

    def append(self, record: CaseRecord | MaxBatchRecord) -> None:
        line = to_jsonl_line(record) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: one write per line, so parallel writers (one process per GPU) never interleave a line.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.count += 1


def _check_writable(path: Path) -> None:
    """Raise :class:`ResultsWriterError` unless ``path`` can be appended to (without creating anything yet)."""
    where = f"--results {path}"
    if path.exists():
        if not path.is_file():
            raise ResultsWriterError(f"{where}: is a directory or not a regular file; give a .jsonl file path")
        if not os.access(path, os.W_OK):
            raise ResultsWriterError(f"{where}: file is not writable")
        return
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ResultsWriterError(f"{where}: cannot create it ({ancestor} is not a writable directory)")
