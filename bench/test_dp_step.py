"""The benchmark matrix: one pytest-benchmark case per workload × DP method × batch size × device.

`pytest bench/ --benchmark-json=out.json` times each fused DP step (pytest-benchmark's rounds), measures one
more step with every memory source (bench.memory), and stores the result record in ``extra_info`` and, at
once, in the JSON-lines file of ``--results``. Options and presets: root conftest.py and README.
"""

from __future__ import annotations

import pytest

from bench.case import CaseSpec, new_record, run_case
from bench.keys import UNTIMED_RECORDS
from bench.record import CaseRecord

# (workload, method, device) -> smallest batch size that ran out of memory in this session.
_OOM_AT: dict[tuple[str, str, str], int] = {}


@pytest.fixture
def dp_case(workload, method, batch_size, device) -> CaseSpec:
    return CaseSpec(workload, method, batch_size, device)


def _benchmark_timer(benchmark, rounds: int):
    def timer(fn) -> dict:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        meta = getattr(benchmark, "stats", None)
        stats = getattr(meta, "stats", None)
        if stats is None:  # --benchmark-disable: the function ran once, untimed
            return {"median": None, "mean": None, "min": None, "stddev": None, "rounds": 0}
        return {
            "median": stats.median,
            "mean": stats.mean,
            "min": stats.min,
            "stddev": stats.stddev,
            "rounds": stats.rounds,
        }

    return timer


# OOM and unsupported cases are never timed; they are added to the JSON by conftest's update_json hook.
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
# Harmless library chatter: Opacus' hooks on models whose inputs need no grad, and CPU autocast in functorch mode.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported:UserWarning")
def test_dp_step(dp_case: CaseSpec, benchmark, bench_cfg, results_writer, request):
    privacy = bench_cfg.privacy
    key = (dp_case.workload, dp_case.method, dp_case.device)
    if key in _OOM_AT and dp_case.batch_size > _OOM_AT[key]:
        # A larger batch of the same case cannot fit; recorded as OOM without spending minutes proving it.
        record = new_record(dp_case, bench_cfg, privacy)
        record.status = "oom"
        record.reason = f"not run: batch {_OOM_AT[key]} already ran out of memory"
    else:
        record = run_case(dp_case, bench_cfg, privacy, _benchmark_timer(benchmark, bench_cfg.rounds))
        if record.status == "oom":
            _OOM_AT[key] = min(_OOM_AT.get(key, dp_case.batch_size), dp_case.batch_size)

    record.machine = {"runner_label": bench_cfg.runner_label}
    benchmark.extra_info.update(record.to_dict())
    results_writer.append(record)
    if record.rounds == 0:
        request.config.stash[UNTIMED_RECORDS].append(_untimed_entry(request.node, dp_case, record))
    if record.status == "error":
        pytest.fail(f"{dp_case.case_id}: {record.reason}", pytrace=False)


def _untimed_entry(item, spec: CaseSpec, record: CaseRecord) -> dict:
    """A pytest-benchmark-shaped entry for a case that was never timed (OOM, unsupported)."""
    return {
        "group": None,
        "name": item.name,
        "fullname": item.nodeid,
        "params": {
            "workload": spec.workload,
            "method": spec.method,
            "batch_size": spec.batch_size,
            "device": spec.device,
        },
        "param": spec.case_id,
        "extra_info": record.to_dict(),
        "options": {},
        "stats": None,
    }
