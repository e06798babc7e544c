"""The benchmark matrix: one pytest-benchmark case per workload × DP method × batch size × device × training mode
(precision × activation checkpointing).

`pytest bench/ --benchmark-json=out.json` times each fused DP step (pytest-benchmark's rounds), measures one
more step with every memory source (bench.trackers.memory), and stores the result record in ``extra_info`` and, at
once, in the JSON-lines file of ``--results``. Options and presets:
bench/config/options.py, bench/config/settings.py, docs/running.md.
"""

from __future__ import annotations

import pytest

from bench.case.spec import CaseSpec, new_record
from bench.trackers.timing import MIN_ROUND_S, benchmark_timer

# (workload, method, device, precision, checkpointing, world size, strategy) -> smallest batch size that ran
# out of memory in this session.
_OOM_AT: dict[tuple[str, str, str, str, str, int, str | None], int] = {}


# OOM and unsupported cases are never timed; they reach the JSON through the record_untimed fixture.
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
# Harmless library chatter: Opacus' hooks on models whose inputs need no grad, and CPU autocast in functorch mode.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.filterwarnings("ignore:In CPU autocast, but the target dtype is not supported:UserWarning")
def test_dp_step(
    dp_case: CaseSpec, case_params, benchmark, bench_cfg, run_dp_case, keep_result, record_untimed, pytestconfig
):
    mode = (dp_case.precision, dp_case.checkpointing)
    key = (dp_case.workload, dp_case.method, dp_case.device, *mode, dp_case.world_size, dp_case.parallel)
    if key in _OOM_AT and dp_case.batch_size > _OOM_AT[key]:
        # A larger batch of the same case cannot fit; recorded as OOM without spending minutes proving it.
        record = new_record(dp_case, bench_cfg)
        record.status = "oom"
        record.reason = f"not run: batch {_OOM_AT[key]} already ran out of memory"
    else:
        benchmark.params = case_params  # pytest-benchmark would write the parameter, one CaseSpec, as "params"
        min_round_s = max(MIN_ROUND_S, float(pytestconfig.getoption("benchmark_min_time")))
        # run here, or taken from the meta worker pool (--jobs; bench/conftest.py)
        record = run_dp_case(dp_case, benchmark_timer(benchmark, bench_cfg.measure.rounds, min_round_s))
        if record.status == "oom":
            _OOM_AT[key] = min(_OOM_AT.get(key, dp_case.batch_size), dp_case.batch_size)

    data = record.to_dict()  # once: the benchmark JSON (timed or not) and the results file share it
    benchmark.extra_info.update(data)
    if record.timing.rounds == 0 or dp_case.world_size > 1:  # many ranks time themselves, not pytest-benchmark
        record_untimed(dp_case.params(ranks=dp_case.world_size > 1), data)
    keep_result(record, dp_case.case_id, data)
