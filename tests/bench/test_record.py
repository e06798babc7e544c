"""The result record: JSON round trips, strictness on bad input."""

import json
import math

import pytest

from bench.record import (
    BatchProbe,
    CaseRecord,
    MaxBatchRecord,
    Phase,
    RecordError,
    StepMemory,
    Timeline,
    Timing,
    from_jsonl_line,
    to_jsonl_line,
)


def _record(**kw):
    base = dict(
        workload="gpt-tiny",
        method="bk",
        batch_size=4,
        device="cpu",
        memory=StepMemory(
            peak_tensor_bytes=123,
            breakdown={"parameters": 100, "per_sample": 23},
            phases=[Phase("forward", 0.0, 0.1)],
            timeline=Timeline(t_s=[0.0, 0.1], tensor_bytes=[100, 123]),
        ),
        timing=Timing(time_median_s=0.5, time_iqr_s=0.01, rounds=3, iterations=4, torch_threads=2),
        epsilon=math.inf,
        notes=["x"],
    )
    base.update(kw)
    return CaseRecord(**base)


def test_case_record_round_trips_through_strict_json():
    record = _record()
    line = to_jsonl_line(record)
    json.loads(line)  # strict JSON: inf written as a string
    assert '"inf"' in line
    assert from_jsonl_line(line) == record


def test_case_record_is_one_flat_json_object():
    """The composed parts (memory, timing) are written beside the case's own keys, as the files always were."""
    data = _record().to_dict()
    assert "memory" not in data and "timing" not in data
    assert data["peak_tensor_bytes"] == 123 and data["time_median_s"] == 0.5 and data["workload"] == "gpt-tiny"
    assert data["phases"] == [{"name": "forward", "start_s": 0.0, "end_s": 0.1}]


def test_max_batch_record_round_trips():
    rec = MaxBatchRecord(
        "w",
        "m",
        "cuda:0",
        probes=[BatchProbe(1, "ok", 10), BatchProbe(2, "oom")],
        predicted_max_batch={"80000000000": 12},
    )
    assert from_jsonl_line(to_jsonl_line(rec)) == rec


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"workload": "w"', "not JSON"),
        ("[1, 2]", "not an object"),
        ('{"record_type": "case", "workload": "w", "method": "m", "device": "cpu"}', "batch_size"),
        ('{"record_type": "pickle", "workload": "w"}', "unknown record_type"),
        ('{"workload": "w", "method": "m", "batch_size": 1, "device": "cpu", "status": "great"}', "status"),
        ('{"workload": "w", "method": "m", "batch_size": 1, "device": "cpu", "schema_version": 99}', "newer"),
        ('{"workload": "w", "method": "m", "batch_size": "1", "device": "cpu"}', "batch_size"),
        ('{"workload": "w", "method": "m", "batch_size": 1, "device": "cpu", "schema_version": "1"}', "not an integer"),
    ],
)
def test_bad_lines_raise_one_line_record_error(line, message):
    with pytest.raises(RecordError, match=message) as info:
        from_jsonl_line(line)
    assert "\n" not in str(info.value)


def test_unknown_keys_from_newer_minor_version_are_ignored():
    data = _record().to_dict()
    data["some_future_field"] = 1
    assert CaseRecord.from_dict(data) == _record()
