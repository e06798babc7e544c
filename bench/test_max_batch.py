"""Max-batch mode: `pytest bench/ --max-batch [--workloads ...] [--methods ...]` (see bench/maxbatch.py).

One case per workload × method × device; each finished search is appended to the JSON-lines results file as
a ``max_batch`` record and kept in the benchmark JSON's ``dpmem_untimed`` list.
"""

from __future__ import annotations

import pytest

from bench import maxbatch
from bench.case import CaseSpec, run_case
from bench.record import BatchProbe


def test_max_batch(max_batch_case, max_batch_mode, pytestconfig, bench_cfg, results_writer, record_untimed):
    cfg = bench_cfg
    workload, method, device = max_batch_case
    precision, checkpointing = max_batch_mode
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(message: str) -> None:  # progress on the terminal even while pytest captures output
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[max-batch {workload} {method} {device}] {message}")

    fit_metric = "peak_reserved_bytes" if device.startswith("cuda") else "peak_tensor_bytes"
    records = []

    def probe(batch_size: int) -> BatchProbe:
        record = run_case(CaseSpec(workload, method, batch_size, device, precision, checkpointing), cfg, timer=None)
        records.append(record)
        memory = record.memory
        return BatchProbe(
            batch_size, record.status, memory.peak_tensor_bytes, memory.peak_reserved_bytes, memory.peak_rss_bytes
        )

    max_ok, first_fail, probes = maxbatch.search(probe, cfg.max_batch_limit, say)
    limit = cfg.memory_cap_bytes if device == "cpu" else records[0].device_memory_bytes
    result = maxbatch.build_record(
        workload,
        method,
        device,
        probes,
        max_ok,
        first_fail,
        fit_metric=fit_metric,
        memory_limit_bytes=limit,
        predict_for=list(cfg.predict_memory_bytes),
    )
    result.reason = next((r.reason for r in records if r.status in ("unsupported", "error")), "")
    result.device_name, result.runner_label = records[0].device_name, cfg.runner_label
    result.precision, result.checkpointing = precision, checkpointing
    say(f"max batch measured {max_ok}, first failing {first_fail}; predicted {result.predicted_max_batch}")

    results_writer.append(result)
    params = {"workload": workload, "method": method, "device": device}
    record_untimed(
        {**params, "precision": precision, "checkpointing": checkpointing},
        {"record_type": "max_batch", **result.to_dict()},
    )
    if result.status == "error":
        pytest.fail(f"max-batch {workload} {method} {device}: {result.reason}", pytrace=False)
