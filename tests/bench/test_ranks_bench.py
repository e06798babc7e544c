"""`pytest bench/ --world-sizes 2 ...` end to end, as a user runs it: one case launched by torchrun on 2 gloo ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config.cli import pytest_bench_command
from bench.ranks.lifeline import LAUNCHER_ENV, running
from bench.results.record import CaseRecord
from reports.load import load_results
from tests.bench.test_matrix import FP32_ONLY, RECORD_KEYS, REPO, _bench, _env, _records


def test_a_case_on_two_ranks_is_one_entry_with_per_rank_figures(tmp_path):
    args = ["--workloads", "dit-tiny-cond", "--methods", "opacus-ghost", "--batch-sizes", "3,4", "--devices", "cpu"]
    proc, out_json, out_jsonl = _bench(tmp_path, *args, "--world-sizes", "2", "--parallel", "fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())  # written although pytest-benchmark timed nothing: the ranks timed
    assert data["benchmarks"] == []
    entries = {e["param"]: e for e in data["dpmem_untimed"]}
    assert set(entries) == {"dit-tiny-cond-opacus-ghost-bs3-cpu-fsdp2", "dit-tiny-cond-opacus-ghost-bs4-cpu-fsdp2"}
    ran = entries["dit-tiny-cond-opacus-ghost-bs4-cpu-fsdp2"]
    assert ran["params"] == {
        "workload": "dit-tiny-cond",
        "method": "opacus-ghost",
        "batch_size": 4,
        "device": "cpu",
        "precision": "fp32",  # the training mode's keys: always (bench/conftest.py)
        "checkpointing": "none",
        "trainable": "full",
        "world_size": 2,
        "parallel": "fsdp",
    }
    assert set(ran["extra_info"]) >= RECORD_KEYS | {"ranks", "rank_max", "rank_mean", "peak_rank"}
    record = CaseRecord.from_dict(ran["extra_info"])
    assert record.status == "ok", record.reason
    assert [r.rank for r in record.ranks] == [0, 1] and all(r.status == "ok" for r in record.ranks)
    peaks = [r.peak_tensor_bytes for r in record.ranks]
    assert record.rank_max["peak_tensor_bytes"] == max(peaks) == record.memory.peak_tensor_bytes
    assert record.rank_mean["peak_tensor_bytes"] == sum(peaks) / 2
    assert record.ranks[record.peak_rank].peak_tensor_bytes == max(peaks)
    assert sum(record.memory.breakdown.values()) == record.memory.peak_tensor_bytes
    assert all(r.time_median_s > 0 and r.peak_rss_bytes > 0 for r in record.ranks)  # each rank timed itself
    assert record.timing.rounds == 1 and record.timing.time_median_s > 0
    odd = CaseRecord.from_dict(entries["dit-tiny-cond-opacus-ghost-bs3-cpu-fsdp2"]["extra_info"])
    assert odd.status == "unsupported" and "does not split evenly over 2 ranks" in odd.reason
    # the crash-safe file holds the same two records, and the reports key them by world size and strategy
    assert [(r.batch_size, r.status) for r in _records(out_jsonl)] == [(3, "unsupported"), (4, "ok")]
    cases = load_results([out_json], warn=lambda message: None).cases
    assert list(cases["world_size"]) == [2, 2] and list(cases["parallel"]) == ["fsdp", "fsdp"]


def _launch_processes(launcher: int) -> list[int]:
    """The live processes started by the many-rank launch of pytest ``launcher`` (torchrun and its ranks)."""
    tag = f"{LAUNCHER_ENV}={launcher}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")  # empty for a zombie: it has exited
            except OSError:
                continue
            if tag in environ and running(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lifeline is Linux's PR_SET_PDEATHSIG")
def test_killing_pytest_with_sigkill_takes_torchrun_and_its_ranks_with_it(tmp_path):
    args = ["--workloads", "dit-tiny-cond", "--methods", "nondp", "--batch-sizes", "2,4,6,8", "--devices", "cpu"]
    cmd = pytest_bench_command("--rounds", "1", *FP32_ONLY)
    cmd += [f"--results={tmp_path / 'run.jsonl'}", *args, "--world-sizes", "2", "--parallel", "ddp"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # how long start-up takes (pytest, collection, torchrun, two interpreters) depends on the machine's load;
        # the loop ends as soon as the ranks are there
        deadline = time.monotonic() + 180
        while len(_launch_processes(proc.pid)) < 3 and time.monotonic() < deadline:  # torchrun and both ranks
            assert proc.poll() is None, "pytest ended before its ranks were seen"
            time.sleep(0.05)
        assert len(_launch_processes(proc.pid)) >= 3, "the ranks never started"
        time.sleep(1)  # a rank killed before its interpreter came up exits on its own, after that start-up
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 8
    while _launch_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _launch_processes(proc.pid)
    for pid in left:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the launch outlived pytest: {left}"
