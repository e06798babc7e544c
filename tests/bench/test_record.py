"""The result record: JSON round trips, strictness on bad input."""

import dataclasses
import json
import math

import pytest

from bench.results.record import (
    BatchProbe,
    BudgetAnswer,
    CaseRecord,
    MaxBatchRecord,
    OpGroup,
    Phase,
    RankFigures,
    RecordError,
    StepMemory,
    StepWork,
    TimeEstimate,
    Timeline,
    Timing,
    from_jsonl_line,
    from_record_dict,
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


def _flat_keys(cls) -> list[str]:
    """Every key of a record type's JSON object (a CaseRecord's parts are written flat beside its own keys)."""
    keys = []
    for f in dataclasses.fields(cls):
        parts = {"memory": StepMemory, "timing": Timing, "work": StepWork, "estimate": TimeEstimate}
        keys += _flat_keys(parts[f.name]) if f.name in parts else [f.name]
    return keys


def _ranked_record() -> CaseRecord:
    return _record(
        device="cpu",
        world_size=2,
        parallel="ddp",
        ranks=[RankFigures(0, peak_tensor_bytes=5), RankFigures(1, peak_tensor_bytes=6)],
        peak_rank=1,
        work=StepWork(flops=10, flops_by_class={"matmul": 10}, op_groups=[OpGroup("matmul", "float32", 10, 4, 1)]),
    )


def _search() -> MaxBatchRecord:
    return MaxBatchRecord(
        "w", "m", "meta", probes=[BatchProbe(1, "ok", 10)], budgets=[BudgetAnswer(2**30, 8, 9, breakdown={"other": 1})]
    )


# (record, where in its JSON object a nested record type sits: a path of keys and indices)
NESTED = {
    "case": (_ranked_record, ()),
    "phase": (_ranked_record, ("phases", 0)),
    "timeline": (_ranked_record, ("timeline",)),
    "rank": (_ranked_record, ("ranks", 0)),
    "op_group": (_ranked_record, ("op_groups", 0)),
    "max_batch": (_search, ()),
    "probe": (_search, ("probes", 0)),
    "budget": (_search, ("budgets", 0)),
}
NESTED_TYPES = {"case": CaseRecord, "phase": Phase, "timeline": Timeline, "rank": RankFigures, "op_group": OpGroup}
NESTED_TYPES |= {"max_batch": MaxBatchRecord, "probe": BatchProbe, "budget": BudgetAnswer}


@pytest.mark.parametrize("part", sorted(NESTED))
def test_every_field_of_every_record_type_is_checked_against_its_type(part):
    """No field is left unchecked: a value no annotated type accepts ([[]]) is refused in each one, by name."""
    make, where = NESTED[part]
    keys = [k for k in _flat_keys(NESTED_TYPES[part]) if k != "schema_version"]  # read before the record
    assert keys
    for key in keys:
        data = make().to_dict()
        target = data
        for step in where:
            target = target[step]
        target[key] = [[]]
        path = ".".join(str(s) for s in where).replace(".0", "[0]")
        name = f"{path}.{key}" if path else key
        with pytest.raises(RecordError) as info:
            from_record_dict({"record_type": "max_batch" if make is _search else "case", **data})
        assert str(info.value).startswith(name + " ") or str(info.value).startswith(f"{name}[0] "), key


def test_nested_records_round_trip_and_unknown_nested_keys_are_ignored():
    for record in (_ranked_record(), _search()):
        line = to_jsonl_line(record)
        assert from_jsonl_line(line) == record
    data = _ranked_record().to_dict()
    data["ranks"][0]["some_future_field"] = 1
    assert CaseRecord.from_dict(data) == _ranked_record()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("time_median_s", "nan", "time_median_s is nan"),  # to_dict writes a non-finite float as a string
        ("time_iqr_s", "inf", "time_iqr_s is inf"),
        ("peak_tensor_bytes", 2**64, "peak_tensor_bytes 20-digit number is out of range"),
        ("peak_tensor_bytes", True, "peak_tensor_bytes True is not a number"),
        ("rounds", 1.5, "rounds 1.5 is not an integer"),
        ("peak_rank", -1, "peak_rank -1 is negative"),
        ("measurement", "guessed", "measurement 'guessed' is not one of measured, predicted"),
        ("rank_max", {"speed": 1}, "rank_max key 'speed' is not one of"),
        ("attention_kernels", [1], "attention_kernels[0] 1 is not a string"),
    ],
)
def test_hostile_values_are_refused_naming_the_field(key, value, words):
    data = _ranked_record().to_dict()
    data[key] = value
    with pytest.raises(RecordError) as info:
        CaseRecord.from_dict(data)
    assert str(info.value) == words or str(info.value).startswith(words)


def test_values_a_fit_or_a_noise_free_step_may_take_are_accepted():
    """ε of nondp is infinite; a least-squares intercept, slope or overhead model may be negative."""
    record = _record(epsilon=math.inf, noise_multiplier=0.0)
    assert CaseRecord.from_dict(record.to_dict()).epsilon == math.inf
    search = dataclasses.replace(_search(), fit_fixed_bytes=-3.0e6, overhead_fixed_bytes=-5, overhead_fraction=-0.2)
    assert MaxBatchRecord.from_dict(search.to_dict()) == search


def test_a_true_or_false_field_reads_back_and_refuses_anything_else():
    """``Timing.time_reliable`` (bool | None): true and false round-trip; a number or a string is refused by name."""
    record = _record()
    for verdict in (True, False, None):
        timed = dataclasses.replace(record, timing=dataclasses.replace(record.timing, time_reliable=verdict))
        assert from_jsonl_line(to_jsonl_line(timed)).timing.time_reliable is verdict
    for bad in (1, "yes"):
        data = {"record_type": "case", **record.to_dict(), "time_reliable": bad}
        with pytest.raises(RecordError, match=r"^time_reliable .* is not true or false"):
            from_record_dict(data)
