"""Meta cases on worker processes (``--jobs``, bench/case/pool.py): the same records as one process, every case
its pytest item in collection order, a dying worker failing only its own case, and the option's rules."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import dp
from bench.case.pool import MetaCasePool
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config import options
from bench.config.cli import pytest_bench_command
from bench.config.settings import MIN_CASES_PER_WORKER, BenchConfig, BenchUsageError, _check_jobs, meta_workers
from tests.bench.test_matrix import REPO, _bench, _env

# Wall-clock fields: when each phase began and ended, and the timeline sampled on a time grid. Two runs of the
# same case differ in them, in one process or two; everything else must be equal.
TIME_FIELDS = ("phases", "timeline")


def _without_times(data: dict) -> dict:
    kept = {key: value for key, value in data.items() if key not in TIME_FIELDS}
    return {**kept, "phase_names": [phase["name"] for phase in data["phases"]]}


def _meta_config(**overrides) -> BenchConfig:
    return BenchConfig.from_fields(preset="test", rounds=1, privacy=dp.resolve_privacy(1.0), **overrides)


def test_jobs_option_takes_auto_or_a_count():
    assert options.jobs("auto") is None and options.jobs(" 3 ") == 3
    for bad, message in (("0", "must be >= 1, got 0"), ("two", "'two' is not an integer")):
        with pytest.raises(options.BadValue, match=f"{message} \\(a number of processes, or auto\\)"):
            options.jobs(bad)


def test_auto_uses_the_cores_only_for_a_meta_run_long_enough_to_pay_for_the_workers():
    meta = ("meta",)
    assert meta_workers(None, 731, meta, cores=2) == 2
    assert meta_workers(None, 731, meta, cores=None) == 1  # unknown core count: one process
    assert meta_workers(None, 2 * MIN_CASES_PER_WORKER - 1, meta, cores=16) == 1
    assert meta_workers(None, 18, meta, cores=2) == 1  # the CI meta gate: cheaper in one process
    assert meta_workers(None, 731, ("meta", "cpu"), cores=16) == 1  # a measured case must have its cores
    assert meta_workers(3, 731, meta, cores=2) == 3  # asked for: as asked
    assert meta_workers(8, 2, meta, cores=2) == 2  # never more workers than cases


def test_jobs_above_one_is_refused_where_cases_are_measured_or_searched():
    _check_jobs(None, ("cpu",), max_batch=False)
    _check_jobs(1, ("cuda:0", "meta"), max_batch=True)
    with pytest.raises(BenchUsageError, match=r"^--jobs 2: cuda:0 cases are measured one at a time .* --devices meta$"):
        _check_jobs(2, ("meta", "cuda:0"), max_batch=False)
    with pytest.raises(BenchUsageError, match=r"^--jobs 2: --max-batch searches in one process"):
        _check_jobs(2, ("meta",), max_batch=True)


def test_jobs_with_a_measured_device_is_a_one_line_usage_error():
    cmd = pytest_bench_command("--devices", "cpu", "--workloads", "gpt-tiny", "--jobs", "2")
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "ERROR: --jobs 2: cpu cases are measured one at a time (concurrent cases would disturb each other's memory "
        "and time); --jobs above 1 needs --devices meta"
    ]


def test_two_workers_give_the_one_process_run_in_both_files_in_collection_order(tmp_path):
    matrix = ("--devices", "meta", "--workloads", "gpt-tiny,dit-tiny-cond", "--methods", "nondp,bk,opacus-functorch")
    one = _bench(tmp_path, *matrix, "--batch-sizes", "2", "--jobs", "1", name="one")
    two = _bench(tmp_path, *matrix, "--batch-sizes", "2", "--jobs", "2", name="two")
    for proc, _, _ in (one, two):
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "6 passed" in proc.stdout  # every case is its own pytest item, with its outcome
    lines = [[json.loads(line) for line in jsonl.read_text().splitlines()] for _, _, jsonl in (one, two)]
    assert [(r["workload"], r["method"]) for r in lines[1]] == [
        (w, m) for w in ("gpt-tiny", "dit-tiny-cond") for m in ("nondp", "bk", "opacus-functorch")
    ]
    assert [r["status"] for r in lines[1]] == ["ok"] * 6  # opacus-functorch too: its autocast region is emulated
    assert [_without_times(r) for r in lines[1]] == [_without_times(r) for r in lines[0]]
    untimed = [json.loads(out_json.read_text())["dpmem_untimed"] for _, out_json, _ in (one, two)]
    assert [e["name"] for e in untimed[1]] == [e["name"] for e in untimed[0]] and len(untimed[1]) == 6
    infos = [[_without_times(entry["extra_info"]) for entry in entries] for entries in untimed]
    assert infos[1] == infos[0]


def test_a_worker_that_dies_fails_only_the_case_it_ran_and_warnings_come_back():
    config = _meta_config(workload_modules=("tests.bench.pool_workloads",))
    specs = [CaseSpec("gpt-tiny", "nondp", 2, "meta"), CaseSpec("pool-crash", "nondp", 2, "meta")]
    specs.append(CaseSpec("gpt-tiny", "bk", 2, "meta"))  # queued behind the crash on the same worker
    specs.append(CaseSpec("pool-warns", "nondp", 2, "meta"))
    pool = MetaCasePool(config, specs, workers=1)
    try:
        records = [pool.record(spec) for spec in specs[:3]]
        with pytest.warns(UserWarning, match="^pool-warns: forward ran in a worker$"):
            records.append(pool.record(specs[3]))
    finally:
        pool.close()
    assert [r.status for r in records] == ["ok", "error", "ok", "ok"]
    assert "exited with code 3 before it sent a record" in records[1].reason
    for spec, record in zip(specs[::2], records[::2]):  # as this process would have measured them
        assert _without_times(record.to_dict()) == _without_times(run_case(spec, config, None).to_dict())
