"""`pytest bench/ --world-sizes 2 ...` end to end, as a user runs it: one case launched by torchrun on 2 gloo ranks."""

from __future__ import annotations

import json

from bench.record import CaseRecord
from reports.load import load_results
from tests.bench.test_matrix import RECORD_KEYS, _bench, _records


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
