"""What ``pytest bench/`` leaves on the terminal (bench/results/terminal.py): pytest-benchmark's table with the columns
that matter, no flood of known third-party warnings, and a closing summary of what ran and where it is."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bench.config.cli import pytest_bench_command

REPO = Path(__file__).resolve().parents[2]
# gpt-tiny under a 40 MiB cap: nondp and torch-func run at batch 2 and run out of memory at 1024; ghost clipping
# refuses the tied embedding at both. torch-func's vmap is what makes torch warn about SDPA batching rules.
CASES = ["--workloads", "gpt-tiny", "--methods", "nondp,opacus-ghost,torch-func", "--batch-sizes", "2,1024"]


def _bench(tmp_path: Path, *args: str) -> list[str]:
    cmd = pytest_bench_command("--rounds", "1")
    cmd += ["--precision", "fp32", "--checkpointing", "none", "--memory-cap", "40MiB", *CASES]
    cmd += [f"--benchmark-json={tmp_path / 'b.json'}", f"--results={tmp_path / 'b.jsonl'}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_bench_ends_with_a_readable_table_no_warning_flood_and_a_summary(tmp_path):
    lines = _bench(tmp_path)
    text = "\n".join(lines)
    assert "warnings summary" not in text and "performance drop" not in text
    header = next(i for i, line in enumerate(lines) if line.startswith("Name (time in"))
    assert lines[header].split()[4:] == ["Median", "IQR", "Rounds"]
    rows = [line.split()[0] for line in lines[header + 2 : header + 4]]
    assert rows == ["test_dp_step[gpt-tiny-nondp-bs2-cpu]", "test_dp_step[gpt-tiny-torch-func-bs2-cpu]"]  # by name
    summary = [line for line in lines if line.startswith("dpmem: ") and "appended" not in line]
    assert summary == [
        "dpmem: 6 cases: 2 ok, 2 oom, 2 unsupported, 0 error",
        "dpmem: the benchmark table lists the 2 timed cases; 4 untimed (2 oom, 2 unsupported) are results too, "
        "in both files",
        f"dpmem: results: {tmp_path / 'b.jsonl'}, {tmp_path / 'b.json'} · report: python -m reports "
        f"{tmp_path / 'b.json'} --out report",
    ]
    # the last word before pytest's own closing line, after the table
    assert lines.index(summary[0]) > header and lines[-1].startswith("6 passed")
    assert lines[-2] == summary[-1]


def test_a_table_option_given_on_the_command_line_is_kept(tmp_path):
    lines = _bench(tmp_path, "--benchmark-columns=min,max", "--benchmark-sort=mean")
    header = next(line for line in lines if line.startswith("Name (time in"))
    assert header.split()[4:] == ["Min", "Max"]


def test_the_summary_says_why_an_ok_case_is_untimed():
    from bench.results.terminal import _untimed_kind

    assert _untimed_kind({"status": "ok", "measurement": "predicted"}) == "ok predicted on meta"
    assert _untimed_kind({"status": "ok", "measurement": "measured", "world_size": 4}) == "ok on many ranks"
    assert _untimed_kind({"status": "oom", "measurement": "measured"}) == "oom"
