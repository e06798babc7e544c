"""The crash-safe results writer (bench/results/files.py): a cut last line stays alone, short writes are completed, a
record that could not be written whole is said (which, how much) and never counted as appended."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import bench.results.files as results_module
from bench.config.cli import pytest_bench_command
from bench.results.files import RecordNotWrittenError, ResultsWriter, ResultsWriterError
from bench.results.record import MaxBatchRecord, to_jsonl_line
from reports.load import load_results
from tests.reports.fakes import make_run

REPO = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _loaded(path: Path) -> tuple[set[tuple[str, int]], list[str]]:
    warnings: list[str] = []
    results = load_results([path], warn=warnings.append)
    return set(zip(results.cases["method"], results.cases["batch_size"])), warnings


def test_append_after_a_cut_last_line_starts_a_new_line_and_every_complete_record_loads(tmp_path):
    records = make_run("a100")[:5]
    path = tmp_path / "run.jsonl"
    first = ResultsWriter(path)
    for record in records[:3]:
        first.append(record)
    text = path.read_text()
    path.write_text(text[: len(text) - 200])  # the run was killed while writing its third record
    again = ResultsWriter(path)  # the next run appends to the same file
    for record in records[3:]:
        again.append(record)
    lines = _lines(path)
    assert len(lines) == 5 and lines[2] == to_jsonl_line(records[2])[:-199]  # the cut line, alone
    assert lines[3:] == [to_jsonl_line(r) for r in records[3:]]
    loaded, warnings = _loaded(path)
    assert loaded == {(r.method, r.batch_size) for i, r in enumerate(records) if i != 2}
    assert len(warnings) == 1 and f"{path}: line 3 is truncated" in warnings[0] and "kept 4 record(s)" in warnings[0]
    assert again.count == 2 and not again.lost


def test_short_writes_are_written_again_until_the_line_is_whole(tmp_path, monkeypatch):
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:100]))  # what a regular file may do; the rest is the caller's to write

    monkeypatch.setattr(results_module.os, "write", short_write)
    records = make_run("a100")[:3]
    writer = ResultsWriter(tmp_path / "run.jsonl")
    for record in records:
        writer.append(record)
    assert _lines(writer.path) == [to_jsonl_line(r) for r in records]
    assert writer.count == 3 and len(calls) > 3


def test_a_failed_write_says_what_was_lost_and_is_not_counted(tmp_path, monkeypatch):
    records = make_run("a100")[:4]
    writer = ResultsWriter(tmp_path / "run.jsonl")
    writer.append(records[0])
    real_write = os.write
    wrote = []

    def disk_full(fd, data):  # half the line fits, then the disk is full
        if wrote:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        wrote.append(real_write(fd, bytes(data[: len(data) // 2])))
        return wrote[0]

    monkeypatch.setattr(results_module.os, "write", disk_full)
    line = to_jsonl_line(records[1]) + "\n"
    with pytest.raises(RecordNotWrittenError) as info:
        writer.append(records[1])
    message = str(info.value)
    assert "\n" not in message and f"--results {writer.path}" in message
    assert f"case {records[1].workload}-{records[1].method}-bs{records[1].batch_size}-cuda:0" in message
    assert "No space left on device [ENOSPC]" in message and f"{len(line) // 2} of its {len(line)} bytes" in message
    with pytest.raises(RecordNotWrittenError, match=r"not written \(No space left on device \[ENOSPC\]\)$"):
        writer.append(records[2])  # nothing of it reached the file
    assert writer.count == 1 and [lost.record_name for lost in writer.lost] == [
        f"case {r.workload}-{r.method}-bs{r.batch_size}-cuda:0" for r in records[1:3]
    ]
    summary = writer.summary()
    assert summary[0] == f"1 result record(s) appended to {writer.path}"
    assert summary[1].startswith(f"2 result record(s) FAILED to write to {writer.path}: case ")
    monkeypatch.setattr(results_module.os, "write", real_write)  # room again: the next record lands whole
    writer.append(records[3])
    loaded, warnings = _loaded(writer.path)
    assert loaded == {(r.method, r.batch_size) for r in (records[0], records[3])}
    assert len(warnings) == 1 and "line 2 is truncated" in warnings[0]


def test_a_record_written_but_not_synced_is_not_counted(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path / "run.jsonl")

    def fsync_fails(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(results_module.os, "fsync", fsync_fails)
    with pytest.raises(RecordNotWrittenError, match=r"written but not synced to disk \(.* \[EIO\]\)"):
        writer.append(MaxBatchRecord("gpt-tiny", "bk", "cpu"))
    assert writer.count == 0 and writer.lost[0].record_name == "max-batch search gpt-tiny-bk-cpu"


_FILE_SIZE_LIMITED = """
import json, resource, signal, sys
from bench.results.files import RecordNotWrittenError, ResultsWriter
from tests.reports.fakes import make_run

signals = []
signal.signal(signal.SIGXFSZ, lambda *_: signals.append(1))  # Python ignores it by default; count it instead
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
writer, errors = ResultsWriter(sys.argv[1]), []
for record in make_run("a100")[:4]:
    try:
        writer.append(record)
    except RecordNotWrittenError as exc:
        errors.append(str(exc))
print(json.dumps({"count": writer.count, "errors": errors, "signals": len(signals)}))
"""


def test_the_file_size_limit_cuts_a_record_and_the_error_says_so(tmp_path):
    """A real short write: under RLIMIT_FSIZE (``ulimit -f``) the kernel writes what fits, then refuses with
    EFBIG and SIGXFSZ."""
    records = make_run("a100")[:4]
    lines = [to_jsonl_line(r) + "\n" for r in records]
    limit = len(lines[0]) + len(lines[1]) // 2
    path = tmp_path / "run.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMITED, str(path), str(limit)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr  # not killed by SIGXFSZ
    outcome = json.loads(proc.stdout)
    assert outcome["count"] == 1 and outcome["signals"] >= 1 and len(outcome["errors"]) == 3
    cut, *nothing = outcome["errors"]
    assert "File too large [EFBIG]" in cut and f"{limit - len(lines[0])} of its {len(lines[1])} bytes" in cut
    assert all(e.endswith("not written (File too large [EFBIG])") for e in nothing)
    assert path.stat().st_size == limit
    loaded, warnings = _loaded(path)
    assert loaded == {(records[0].method, records[0].batch_size)} and "line 2 is truncated" in warnings[0]


@pytest.mark.slow
def test_a_bench_run_that_cannot_write_its_results_fails_and_says_so(tmp_path):
    """End to end: a results file ending in a cut line, and a file-size limit that lets the next record in only
    partway. Both cases fail naming what was lost, nothing says "appended", and the file still loads."""
    path = tmp_path / "run.jsonl"
    complete, cut = (to_jsonl_line(r) for r in make_run("a100")[:2])
    path.write_text(complete + "\n" + cut[:300])  # a run killed while writing
    limit = path.stat().st_size + 1500

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = pytest_bench_command("--rounds", "1")
    cmd += ["--workloads", "gpt-tiny", "--methods", "nondp", "--batch-sizes", "1,2", "--precision", "fp32"]
    cmd += ["--checkpointing", "none", "--devices", "cpu", f"--results={path}"]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    out = proc.stdout
    assert proc.returncode == 1 and proc.returncode != -signal.SIGXFSZ, out[-3000:] + proc.stderr[-3000:]
    assert "2 failed" in out and "appended" not in out
    assert f"dpmem: 2 result record(s) FAILED to write to {path}: case gpt-tiny-nondp-bs1-cpu, " in out
    assert "case gpt-tiny-nondp-bs1-cpu: not written (File too large [EFBIG]): 1499 of its" in out  # "\n" first
    assert "case gpt-tiny-nondp-bs2-cpu: not written (File too large [EFBIG])" in out
    loaded, warnings = _loaded(path)
    assert len(loaded) == 1 and "lines 2, 3 are truncated" in warnings[0]


def test_an_unreadable_results_file_is_refused_before_any_case(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "run.jsonl"
    path.write_text("")
    path.chmod(0o200)
    with pytest.raises(ResultsWriterError, match="not readable and writable"):
        ResultsWriter(path)
