"""How a ``pytest bench/`` session looks on the terminal: pytest-benchmark's table narrowed to the columns that
matter for a DP step, known third-party warnings kept out of the way, and a short summary at the very end — what
ran (ok / oom / unsupported / error), why the table counts fewer cases than pytest, where the results are and how
to make the report from them.

Used by bench/conftest.py; :class:`SessionSummary` is a plugin of its own, so its lines stay apart from the
conftest's other end-of-session lines.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from bench.results.record import STATUSES, CaseRecord, RecordError, from_jsonl_line

# pytest-benchmark's table: its default has ten columns (~240 characters a row). One DP step is timed a few
# rounds of one iteration, so min/max/mean/stddev/outliers/ops/iterations say nothing the median, its IQR and
# the round count do not; rows sorted by case id keep a workload's methods together.
TABLE_DEFAULTS = {"benchmark_columns": ["median", "iqr", "rounds"], "benchmark_sort": "name"}


def set_table_defaults(config: pytest.Config) -> None:
    """Use :data:`TABLE_DEFAULTS` for every option the command line (or ``addopts``) does not set itself. Runs
    before pytest-benchmark reads its options (its ``pytest_configure`` is ``trylast``)."""
    given = [*config.invocation_params.args, *config.getini("addopts"), *os.environ.get("PYTEST_ADDOPTS", "").split()]
    for dest, value in TABLE_DEFAULTS.items():
        flag = "--" + dest.replace("_", "-")
        if not any(arg == flag or arg.startswith(flag + "=") for arg in map(str, given)):
            setattr(config.option, dest, value)


# Third-party warnings that every case of a kind repeats and that say nothing the results do not; each with why.
# dpmem's own warnings are never filtered.
KNOWN_WARNINGS = (
    # torch.func.vmap has no batching rule for CPU's flash-attention kernel (forward and backward) and runs it
    # sample by sample: three copies for every torch-func case (36 in cpu-smoke). That slowness is part of what
    # the torch-func step costs, and its measured time shows it.
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning",
)


def quiet_known_warnings(config: pytest.Config) -> None:
    """Add :data:`KNOWN_WARNINGS` to the session's ``filterwarnings`` (every bench test: matrix and max-batch)."""
    for spec in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", spec)


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (what a user types), else as given."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return str(path)


class SessionSummary:
    """The last lines of a bench session, from the records this session appended to the results file (read back
    from where the file ended when the session started) and the number of cases pytest-benchmark did not time."""

    def __init__(self, results_path: Path, untimed: list, benchmark_json: str | None):
        self.results_path = Path(results_path)
        self.untimed = untimed  # the conftest's list of untimed JSON entries, filled while the cases run
        self.benchmark_json = Path(benchmark_json) if benchmark_json else None
        self.start = self.results_path.stat().st_size if self.results_path.is_file() else 0

    def records(self) -> tuple[list, int]:
        """(the records appended this session, the number of lines that could not be read back)."""
        if not self.results_path.is_file():
            return [], 0
        with self.results_path.open("rb") as file:
            file.seek(self.start)
            lines = file.read().decode("utf-8", errors="replace").splitlines()
        records, unreadable = [], 0
        for line in filter(str.strip, lines):
            try:
                records.append(from_jsonl_line(line))
            except RecordError:
                unreadable += 1
        return records, unreadable

    def lines(self) -> list[str]:
        records, unreadable = self.records()
        if not records and not unreadable:
            return []
        cases = [r for r in records if isinstance(r, CaseRecord)]
        searches = len(records) - len(cases)
        counts = Counter(r.status for r in cases)
        what = [f"{len(cases)} cases: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)] if cases else []
        what += [f"{searches} max-batch searches"] if searches else []
        what += [f"{unreadable} unreadable line(s) in the results file"] if unreadable else []
        out = ["dpmem: " + "; ".join(what)]
        untimed = Counter(
            _untimed_kind(e["extra_info"]) for e in self.untimed if e["extra_info"].get("record_type") != "max_batch"
        )
        if cases and untimed:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(untimed.items()))
            out.append(
                f"dpmem: the benchmark table lists the {len(cases) - untimed.total()} timed cases; "
                f"{untimed.total()} untimed ({kinds}) are results too, in both files"
            )
        files = [shown(self.results_path), *([shown(self.benchmark_json)] if self.benchmark_json else [])]
        source = files[-1]
        out.append(f"dpmem: results: {', '.join(files)} · report: python -m reports {source} --out report")
        return out

    @pytest.hookimpl(trylast=True)  # after pytest-benchmark's table and the conftest's lines: the last word
    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines():
            terminalreporter.write_line(line)


def _untimed_kind(info: dict) -> str:
    """Why a case has no timed rounds: its status, or for an ok one how it ran (predicted on meta: no kernel ran;
    on many ranks: each rank times itself)."""
    if info.get("status") != "ok":
        return info["status"]
    return "ok predicted on meta" if info.get("measurement") == "predicted" else "ok on many ranks"
