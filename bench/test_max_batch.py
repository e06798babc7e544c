"""Max-batch mode: `pytest bench/ --max-batch [--workloads ...] [--methods ...]` (see bench/plan/maxbatch.py).

One case per workload × method × device; each finished search is appended to the JSON-lines results file as
a ``max_batch`` record and kept in the benchmark JSON's ``dpmem_untimed`` list. On the meta device the search
answers every ``--memory-budget`` exactly under the overhead model (``maxbatch.search_budgets``); an out-of-memory
there is the host's (the batch is drawn on CPU), a ``host-oom`` probe that stops the search.
"""

from __future__ import annotations

import dataclasses

from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.sizes import size_text
from bench.plan import maxbatch
from bench.results.record import HOST_OOM, BatchProbe, CaseRecord, MaxBatchRecord


def test_max_batch(max_batch_case: CaseSpec, pytestconfig, bench_cfg, keep_result, record_untimed):
    cfg = bench_cfg
    workload, method, device = max_batch_case.workload, max_batch_case.method, max_batch_case.device
    precision, checkpointing = max_batch_case.precision, max_batch_case.checkpointing
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(message: str) -> None:  # progress on the terminal even while pytest captures output
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[max-batch {workload} {method} {device}] {message}")

    records: list[CaseRecord] = []
    probe = case_probe(max_batch_case, cfg, records)
    if device == "meta":
        result = meta_search(workload, method, cfg, probe, records, say)
    else:
        result = _device_search(workload, method, device, cfg, probe, records, say)
        predicted = ", ".join(f"{n} in {size_text(int(m))}" for m, n in result.predicted_max_batch.items())
        say(
            f"max batch measured {result.max_batch_measured}, first failing {result.first_failing_batch}; "
            f"predicted {predicted or 'nothing (no fit)'}"
        )
    result.reason = result.reason or next((r.reason for r in records if r.status in ("unsupported", "error")), "")
    result.device_name, result.runner_label = records[0].device_name, cfg.output.runner_label
    result.precision, result.checkpointing = precision, checkpointing
    result.trainable = max_batch_case.trainable

    params, data = {"workload": workload, "method": method, "device": device}, result.to_dict()
    record_untimed(
        {**params, "precision": precision, "checkpointing": checkpointing, "trainable": result.trainable},
        {"record_type": "max_batch", **data},
    )
    keep_result(result, f"max-batch {workload} {method} {device}", data)


def case_probe(spec: CaseSpec, cfg, records: list[CaseRecord]) -> maxbatch.Probe:
    """A probe running ``spec`` at the batch size asked (no timed rounds); every case's record goes to
    ``records``."""

    def probe(batch_size: int) -> BatchProbe:
        record = run_case(dataclasses.replace(spec, batch_size=batch_size), cfg, None)
        records.append(record)
        memory = record.memory
        return BatchProbe(
            batch_size, record.status, memory.peak_tensor_bytes, memory.peak_reserved_bytes, memory.peak_rss_bytes
        )

    return probe


def _device_search(workload, method, device, cfg, probe, records, say) -> MaxBatchRecord:
    """cpu / cuda: grow and bisect until out of memory; fit; predict for every size less what is not the
    allocator's (CUDA: the NVML reading at case start)."""
    max_ok, first_fail, probes = maxbatch.search(probe, cfg.capacity.max_batch_limit, say)
    cuda = device.startswith("cuda")
    non_allocator = maxbatch.non_allocator_bytes([r.memory.nvml_baseline_bytes for r in records]) if cuda else None
    result = maxbatch.build_record(
        workload,
        method,
        device,
        probes,
        max_ok,
        first_fail,
        fit_metric="peak_reserved_bytes" if cuda else "peak_tensor_bytes",
        memory_limit_bytes=cfg.measure.memory_cap_bytes if device == "cpu" else records[0].device_memory_bytes,
        predict_for=list(cfg.capacity.predict_memory_bytes),
        capacity=lambda size: size - (non_allocator or 0),
    )
    result.non_allocator_bytes = non_allocator
    return result


def meta_search(workload, method, cfg, probe, records, say) -> MaxBatchRecord:
    """meta: the exact largest batch per --memory-budget under the overhead model, then the fit as usual; a batch
    the host could not draw stops the search, and the record's reason says so."""

    def meta_probe(batch_size: int):
        result = probe(batch_size)
        if result.status == "oom":  # nothing runs out of memory on meta: the host could not draw the batch
            result.status = HOST_OOM
        return result, dict(records[-1].memory.breakdown)

    answers, probes = maxbatch.search_budgets(
        meta_probe, list(cfg.capacity.memory_budgets), cfg.capacity.overhead, cfg.capacity.max_batch_limit, say
    )
    ok = [p.batch_size for p in probes if p.status == "ok"]
    largest = max(ok, default=None)
    result = maxbatch.build_record(
        workload,
        method,
        "meta",
        probes,
        largest,
        min((a.first_failing_batch for a in answers if a.first_failing_batch), default=None),
        fit_metric="peak_tensor_bytes",
        memory_limit_bytes=None,
        predict_for=list(cfg.capacity.predict_memory_bytes),
        capacity=cfg.capacity.overhead.tensor_capacity,
    )
    result.measurement, result.attention, result.budgets = "predicted", cfg.step.attention, answers
    result.overhead_fixed_bytes, result.overhead_fraction = (
        cfg.capacity.overhead.fixed_bytes,
        cfg.capacity.overhead.fraction,
    )
    result.overhead_source = cfg.capacity.overhead.source
    host_oom = next((r for r in records if r.status == "oom"), None)
    if host_oom is not None:
        result.reason = f"host memory limit at batch {host_oom.batch_size}: {host_oom.reason}"
    say("max batch per budget: " + "; ".join(maxbatch.answer_text(a) for a in answers))
    return result
