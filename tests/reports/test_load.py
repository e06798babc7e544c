"""Loading both result formats into one tidy table, and refusing bad input with one line naming file, case, key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.results.files
from bench.results.record import SCHEMA_VERSION, CaseRecord, MaxBatchRecord, from_jsonl_line, to_jsonl_line
from reports.load import ReportInputError, load_results, workload_family
from tests.reports.fakes import (
    BATCHES,
    GPUS,
    METHODS,
    ROOT,
    WORKLOADS,
    benchmark_json,
    make_case,
    make_ranked_case,
    make_run,
    run_cli,
    write_benchmark,
    write_jsonl,
    write_two_gpu_files,
)


@pytest.fixture
def two_gpu_files(tmp_path) -> tuple[Path, Path]:
    return write_two_gpu_files(tmp_path)


def test_load_both_formats_into_one_tidy_table(two_gpu_files):
    results = load_results(two_gpu_files)
    cases = results.cases
    assert len(cases) == 2 * len(WORKLOADS) * len(METHODS) * len(BATCHES)
    assert not cases.duplicated(["workload", "method", "batch_size", "device", "machine"]).any()
    assert set(cases["machine"]) == {"a100", "h100"}
    assert set(cases["device_name"]) == {GPUS["a100"][0], GPUS["h100"][0]}
    a100 = cases[cases["machine"] == "a100"]
    # time_max_s exists only in pytest-benchmark stats: filled for the JSON run's timed cases, not the JSONL one
    assert a100[a100["status"] == "ok"]["time_max_s"].notna().all()
    assert cases[cases["machine"] == "h100"]["time_max_s"].isna().all()
    oom = cases[cases["status"] == "oom"]
    assert len(oom) == 1 and oom.iloc[0]["method"] == "opacus-hooks" and oom.iloc[0]["batch_size"] == 64
    assert "out of memory" in oom.iloc[0]["reason"]
    for column in (
        "peak_tensor_bytes",
        "peak_reserved_bytes",
        "nvml_peak_used_bytes",
        "breakdown_per_sample",
        "time_median_s",
        "time_iqr_s",
        "torch_threads",
        "source",
        "family",
        "tokens_per_sample",
    ):
        assert column in cases.columns
    assert set(cases["family"]) == {"dit", "gpt"}
    row = cases.iloc[0]
    assert row["record"].workload == row["workload"]


def test_same_run_in_both_formats_gives_one_row_per_case_with_timing(tmp_path):
    records = make_run("a100")
    untimed = [CaseRecord.from_dict({**r.to_dict(), "time_median_s": None}) for r in records]
    jsonl = write_jsonl(tmp_path / "run.jsonl", untimed)  # the JSONL line is written before timing
    bench = write_benchmark(tmp_path / "run.json", records, "a100")
    warnings = []
    results = load_results([bench, jsonl], warn=warnings.append)
    assert len(results.cases) == len(records)
    ok = results.cases[results.cases["status"] == "ok"]
    assert ok["time_median_s"].notna().all()  # the timed row won over the later, untimed one
    assert warnings == []  # a run's .json + .jsonl pair is expected
    second = write_jsonl(tmp_path / "rerun.jsonl", untimed)  # the same machine's cases twice in one format
    results = load_results([bench, jsonl, second], warn=warnings.append)
    assert (
        len(results.cases) == len(records)
        and results.cases[results.cases["status"] == "ok"]["time_median_s"].notna().all()
    )
    assert len(warnings) == 1 and "appear more than once" in warnings[0]


def test_machine_facts_come_from_machine_info_when_the_record_lacks_them(tmp_path):
    records = [make_case("dit-s-2-cond", m, 8, "a100") for m in ("nondp", "bk")]
    for r in records:
        r.device_name, r.runner_label = None, None
    results = load_results([write_benchmark(tmp_path / "r.json", records, "a100")])
    assert set(results.cases["device_name"]) == {GPUS["a100"][0]}
    assert set(results.cases["machine"]) == {"a100"}
    # typed facts next to the record, which itself stays as written
    (case, *_) = results.loaded_cases
    assert (case.device_name, case.runner_label, case.machine) == (GPUS["a100"][0], "a100", "a100")
    assert case.record.device_name is None
    assert case.completed_record().device_name == GPUS["a100"][0]


def test_record_timing_is_completed_from_pytest_benchmark_stats(tmp_path):
    """Files written before records carried their timing: the stats fill the record's Timing (typed)."""
    record = make_case("dit-s-2-cond", "bk", 8, "a100")
    data = benchmark_json([record], "a100")
    for key in ("time_median_s", "time_iqr_s", "time_mean_s", "time_min_s", "time_stddev_s"):
        data["benchmarks"][0]["extra_info"][key] = None
    data["benchmarks"][0]["extra_info"]["rounds"] = 0
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    (case,) = load_results([path]).loaded_cases
    timing = case.record.timing
    assert timing.time_median_s == record.timing.time_median_s and timing.time_iqr_s == record.timing.time_iqr_s
    assert timing.rounds == record.timing.rounds and timing.time_max_s == pytest.approx(timing.time_median_s * 1.05)


def test_each_json_line_is_parsed_once(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "run.jsonl", make_run("h100")[:5])
    calls = []
    real_loads = json.loads

    def counting_loads(text, *args, **kwargs):
        calls.append(len(text))
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(bench.results.files.json, "loads", counting_loads)
    assert len(load_results([path]).cases) == 5
    assert len(calls) == 1 + 5  # the whole-file probe (fails: JSON lines), then each line once


def test_truncated_last_jsonl_line_keeps_every_complete_case(tmp_path):
    records = make_run("h100")[:6]
    text = "".join(to_jsonl_line(r) + "\n" for r in records)
    path = tmp_path / "killed.jsonl"
    path.write_text(text[: len(text) - len(to_jsonl_line(records[-1])) // 2 - 1])  # cut mid last line
    warnings = []
    results = load_results([path], warn=warnings.append)
    assert len(results.cases) == 5
    assert {(r.method, r.batch_size) for r in records[:5]} == set(
        zip(results.cases["method"], results.cases["batch_size"])
    )
    assert len(warnings) == 1 and "killed.jsonl" in warnings[0] and "truncated" in warnings[0]


def test_a_cut_line_in_the_middle_is_skipped_with_a_warning_naming_it(tmp_path):
    """A killed run's cut record, then a later run's records appended to the same file (each on a new line)."""
    records = make_run("h100")[:4]
    lines = [to_jsonl_line(r) for r in records]
    lines[1] = lines[1][:40]
    lines[2] = lines[2][:-1]  # cut just before its last "}"
    path = tmp_path / "resumed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    warnings = []
    results = load_results([path], warn=warnings.append)
    assert list(results.cases["batch_size"]) == [records[0].batch_size, records[3].batch_size]
    assert warnings == [
        f"{path}: lines 2, 3 are truncated (a record cut by a killed run or a full disk); skipped, kept 2 record(s)"
    ]


@pytest.mark.parametrize(
    "broken",
    [
        lambda line: line[:40] + line,  # a cut record with the next one glued on (an older writer)
        lambda line: "this is not json",
        lambda line: line.replace(": ", ": :", 1),  # broken inside, not cut
    ],
)
def test_a_broken_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path, broken):
    lines = [to_jsonl_line(r) for r in make_run("h100")[:3]]
    lines[1] = broken(lines[1])
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportInputError, match=r"broken\.jsonl: line 2 is not JSON"):
        load_results([path])


def test_a_file_of_only_a_cut_line_is_an_error(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(to_jsonl_line(make_run("h100")[0])[:100])
    with pytest.raises(ReportInputError, match=r"cut\.jsonl: not JSON"):
        load_results([path])


def test_newer_schema_fails_clearly(tmp_path):
    case = make_case("dit-s-2-cond", "bk", 8, "a100").to_dict()
    case["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "future.jsonl"
    path.write_text(json.dumps({"record_type": "case", **case}) + "\n")
    with pytest.raises(ReportInputError, match=r"future\.jsonl: line 1: .*schema_version .* newer"):
        load_results([path])
    data = benchmark_json([make_case("dit-s-2-cond", "bk", 8, "a100")], "a100")
    data["benchmarks"][0]["extra_info"]["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "future.json").write_text(json.dumps(data))
    with pytest.raises(ReportInputError, match=r"future\.json: benchmarks\[0\] .*schema_version .* newer"):
        load_results([tmp_path / "future.json"])
    mb = MaxBatchRecord("dit-s-2-cond", "bk", "cuda:0", schema_version=SCHEMA_VERSION + 1)
    path.write_text(to_jsonl_line(mb) + "\n")
    with pytest.raises(ReportInputError, match="newer"):
        load_results([path])


BAD_FILES = {
    "empty.json": ("", "empty file"),
    "truncated.json": (None, "not JSON"),  # a pytest-benchmark JSON cut in half (killed while writing)
    "foreign.json": (json.dumps({"hello": [1, 2, 3]}, indent=2), "foreign JSON"),
    "list.json": (json.dumps([1, 2]), "foreign JSON"),
    "text.txt": ("this is not json\n", "not JSON"),
    "no_extra.json": (None, "no dpmem extra_info"),
}


def write_bad(tmp_path: Path, name: str) -> Path:
    text, _ = BAD_FILES[name]
    if name == "truncated.json":
        full = json.dumps(benchmark_json(make_run("a100")[:4], "a100"), indent=4)
        text = full[: len(full) // 2]
    elif name == "no_extra.json":
        data = benchmark_json(make_run("a100")[:2], "a100")
        for bench in data["benchmarks"]:
            bench["extra_info"] = {}
        text = json.dumps(data)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_one_line_error_naming_the_file(tmp_path, name):
    path = write_bad(tmp_path, name)
    with pytest.raises(ReportInputError) as info:
        load_results([path])
    message = str(info.value)
    assert "\n" not in message and str(path) in message and BAD_FILES[name][1] in message


# (raw JSON text of the value, key it is written to, words of the error). Written into the raw file text, since
# json.dumps would refuse some of them.
BAD_NUMBERS = {
    "nan": ("NaN", "peak_tensor_bytes", "is nan"),
    "infinity": ("Infinity", "peak_reserved_bytes", "is inf"),
    "huge": ("1" + "0" * 400, "nvml_peak_used_bytes", "401-digit number is out of range"),
    "negative": ("-5", "peak_rss_bytes", "-5 is negative"),
    "text": ('"12"', "peak_allocated_bytes", "'12' is not a number"),
    "negative_time": ("-0.5", "time_median_s", "-0.5 is negative"),
}


@pytest.mark.parametrize("name", sorted(BAD_NUMBERS))
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_a_bad_measured_number_is_bad_input_naming_file_case_and_key(tmp_path, name, fmt):
    raw, key, words = BAD_NUMBERS[name]
    records = [make_case("dit-s-2-cond", m, 16, "a100") for m in ("nondp", "bk")]
    if fmt == "json":
        data = benchmark_json(records, "a100")
        data["benchmarks"][1]["extra_info"][key] = "__RAW__"
        text = json.dumps(data)
    else:
        text = "\n".join(
            json.dumps({"record_type": "case", **({**r.to_dict(), key: "__RAW__"} if i == 1 else r.to_dict())})
            for i, r in enumerate(records)
        )
    path = tmp_path / f"bad.{fmt}"
    path.write_text(text.replace('"__RAW__"', raw))
    with pytest.raises(ReportInputError) as info:
        load_results([path])
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert str(path) in message and "dit-s-2-cond/bk/bs16/cuda:0" in message and f"{key} {words}" in message


def test_bad_numbers_deep_in_a_record_and_in_max_batch_records_are_found(tmp_path):
    record = make_case("dit-s-2-cond", "bk", 16, "a100")
    data = record.to_dict()
    data["breakdown"]["activations"] = -1
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(ReportInputError, match=r"line 1: dit-s-2-cond/bk/bs16/cuda:0: breakdown.activations -1"):
        load_results([path])
    data = record.to_dict()
    data["timeline"]["tensor_bytes"][3] = "x"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(ReportInputError, match=r"timeline.tensor_bytes\[3\] 'x' is not a number"):
        load_results([path])
    search = MaxBatchRecord("dit-s-2-cond", "bk", "cuda:0", max_batch_measured=600, fit_fixed_bytes=-3.0e6)
    text = to_jsonl_line(search).replace('"max_batch_measured": 600', '"max_batch_measured": Infinity')
    path.write_text(text + "\n")
    with pytest.raises(ReportInputError, match=r"max_batch_measured is inf"):
        load_results([path])
    path.write_text(to_jsonl_line(search) + "\n")  # a negative least-squares intercept is a valid fit
    assert len(load_results([path]).max_batches) == 1


def test_epsilon_infinity_of_a_nondp_case_is_not_bad_input(tmp_path):
    record = make_case("dit-s-2-cond", "nondp", 16, "a100")
    record.epsilon = float("inf")  # no noise: no privacy; written as "inf" by the record
    assert load_results([write_jsonl(tmp_path / "r.jsonl", [record])]).cases["epsilon"].iloc[0] == float("inf")


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("dit-xl-2-cond", "dit"),
        ("dit-s-2-uncond-512", "dit"),
        ("dit-xl-2-plain", "dit-plain"),
        ("dit-tiny-plain", "dit-plain"),
        ("dit-b-4-plain-512", "dit-plain"),
        ("dit-tiny-plain:depth=4", "dit-plain"),
        ("dit-tiny-cond:learnable_pos_embed=True", "dit"),
        ("gpt2-large:seq_len=128", "gpt"),
        ("gpt-tiny-untied", "gpt"),
        ("diffusers-dit-tiny", "other"),
    ],
)
def test_workload_family_of_names_and_specs(name, family):
    assert workload_family(name) == family


def test_max_batch_record_family_comes_from_the_name(tmp_path):
    search = MaxBatchRecord("dit-xl-2-plain:depth=2", "bk", "cuda:0", max_batch_measured=8, first_failing_batch=9)
    results = load_results([write_jsonl(tmp_path / "mb.jsonl", [search])])
    assert results.max_batches["family"].tolist() == ["dit-plain"]


def test_json_that_python_cannot_read_is_one_line_bad_input(tmp_path):
    record = make_case("dit-s-2-cond", "bk", 16, "a100")
    text = json.dumps(benchmark_json([record], "a100")).replace(
        f'"peak_tensor_bytes": {record.memory.peak_tensor_bytes}', '"peak_tensor_bytes": ' + "9" * 5000
    )
    for name, content in (("digits.json", text), ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ReportInputError) as info:
            load_results([path])
        assert "\n" not in str(info.value) and str(path) in str(info.value) and "unreadable JSON" in str(info.value)


# Hostile records (item: nothing silently dropped, no traceback): (change to one record's JSON object, the words of
# the error after the case name). Each breaks the second of two records unless it says "every".
def _set(key, value):
    return lambda data: data.update({key: value})


def _set_rank(key, value):
    return lambda data: data["ranks"][0].update({key: value})


HOSTILE_RECORDS = {
    "precision null": (_set("precision", None), "precision null is not a string"),
    "precision null on every record": (_set("precision", None), "precision null is not a string"),
    "checkpointing list": (_set("checkpointing", ["a"]), "checkpointing ['a'] is not a string"),
    "precision number": (_set("precision", 123), "precision 123 is not a string"),
    "precision unknown mode": (_set("precision", "fp64"), "precision 'fp64' is not one of fp32, amp-bf16"),
    "unknown status": (_set("status", "great"), "status 'great' is not one of ok, oom, unsupported, error"),
    "negative batch": (_set("batch_size", -4), "batch_size -4 is negative"),
    "batch zero": (_set("batch_size", 0), "batch_size 0 is not 1 or more"),
    "batch float": (_set("batch_size", 4.5), "batch_size 4.5 is not an integer"),
    "missing key": (lambda data: data.pop("method"), "record lacks key(s) ['method']"),
    "world size text": (_set("world_size", "2"), "world_size '2' is not a number"),
    "notes not a list": (_set("notes", "x"), "notes 'x' is not a list"),
    "phase not an object": (_set("phases", [7]), "phases[0] 7 is not an object"),
    "unknown breakdown category": (_set("breakdown", {"weights": 1}), "breakdown key 'weights' is not one of"),
    "timeline trace of text": (lambda data: data["timeline"].update(t_s="0.1"), "timeline.t_s '0.1' is not a list"),
    "rank text": (_set_rank("rank", "one"), "ranks[0].rank 'one' is not a number"),
    "rank beyond world size": (_set_rank("rank", 2), "ranks[0].rank 2 is not below world_size 2"),
    "rank status unknown": (_set_rank("status", "fine"), "ranks[0].status 'fine' is not one of"),
    "rank not an object": (_set("ranks", [0]), "ranks[0] 0 is not an object"),
    "rank twice": (lambda data: data["ranks"].append(dict(data["ranks"][0])), "rank 0 appears more than once"),
    "strategy of one process": (_set("world_size", 1), "parallel 'ddp' with world_size 1: needs no parallel"),
    "many ranks without strategy": (_set("parallel", None), "parallel null with world_size 2: needs one of ddp"),
}
RANKED_HOSTILE = {name for name in HOSTILE_RECORDS if "rank" in name or "strateg" in name}


def _hostile_records(name: str) -> list[dict]:
    if name in RANKED_HOSTILE:
        records = [make_ranked_case(m, 2, "ddp", mib, batch=16) for m, mib in (("nondp", 100), ("bk", 110))]
    else:
        records = [make_case("dit-s-2-cond", m, 16, "a100") for m in ("nondp", "bk")]
    change, _ = HOSTILE_RECORDS[name]
    data = [r.to_dict() for r in records]
    for d in data if "every record" in name else data[1:]:
        change(d)
    return data


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("name", sorted(HOSTILE_RECORDS))
def test_a_bad_record_is_one_line_naming_file_place_and_field(tmp_path, name, fmt):
    data = _hostile_records(name)
    path = tmp_path / f"hostile.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"record_type": "case", **d}) + "\n" for d in data))
        where = "line 1" if "every record" in name else "line 2"
    else:
        bench = benchmark_json([make_case("dit-s-2-cond", "nondp", 16, "a100")] * len(data), "a100")
        for entry, d in zip(bench["benchmarks"], data):
            entry["extra_info"] = d
        path.write_text(json.dumps(bench))
        where = "benchmarks[0]" if "every record" in name else "benchmarks[1]"
    with pytest.raises(ReportInputError) as info:
        load_results([path])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: {where}") and HOSTILE_RECORDS[name][1] in message


def test_node_files_with_a_bad_rank_are_refused_naming_the_file(tmp_path):
    """Two nodes' shares of one case, the second's rank not a number: refused at load, never combined."""
    node0 = make_ranked_case("bk", 2, "ddp", 100, ranks=[0])
    node1 = make_ranked_case("bk", 2, "ddp", 100, ranks=[1]).to_dict()
    node1["ranks"][0]["rank"] = "one"
    first = write_jsonl(tmp_path / "node0.jsonl", [node0])
    second = tmp_path / "node1.jsonl"
    second.write_text(json.dumps({"record_type": "case", **node1}) + "\n")
    with pytest.raises(ReportInputError, match=r"node1\.jsonl: line 1: .*ranks\[0\]\.rank 'one' is not a number"):
        load_results([first, second])


_SEARCH = '{"record_type": "max_batch", "workload": "w", "method": "m", "device": "cpu"'


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("[1, 2]", "line 2: JSON list is not a dpmem record"),
        ('"text"', "line 2: JSON str is not a dpmem record"),
        (_SEARCH + ', "probes": [{"batch_size": 1}]}', "line 2: w/m/cpu: probes[0] lacks key(s) ['status']"),
        (_SEARCH + ', "budgets": {"a": 1}}', "line 2: w/m/cpu: budgets {'a': 1} is not a list"),
        (_SEARCH + ', "status": "done"}', "line 2: w/m/cpu: status 'done' is not one of"),
    ],
)
def test_a_line_that_is_not_a_record_object_is_refused(tmp_path, line, words):
    path = tmp_path / "r.jsonl"
    path.write_text(to_jsonl_line(make_case("dit-s-2-cond", "bk", 16, "a100")) + "\n" + line + "\n")
    with pytest.raises(ReportInputError) as info:
        load_results([path])
    assert str(info.value).startswith(f"{path}: {words}")


@pytest.mark.parametrize("command", ["render", "compare", "merge", "export"])
def test_every_command_refuses_a_bad_record_with_exit_2_and_one_line(tmp_path, command):
    good = write_jsonl(tmp_path / "good.jsonl", make_run("a100")[:4])
    data = [r.to_dict() for r in make_run("a100")[:4]]
    data[2]["precision"] = None  # before: the case vanished from every table and escaped the gate, exit 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(d) + "\n" for d in data))
    args = {
        "render": [bad, "--out", tmp_path / "report"],
        "compare": ["compare", good, bad],
        "merge": ["merge", bad, "--out", tmp_path / "merged.jsonl"],
        "export": ["export", bad, "--out", tmp_path / "export.json"],
    }[command]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {bad}: line 3: dit-s-2-cond/nondp/bs32/cuda:0: precision null is not a string\n"
    assert not (tmp_path / "merged.jsonl").exists() and not (tmp_path / "export.json").exists()


def test_the_ci_baseline_loads_with_every_value_as_written():
    """baseline/meta-gate.jsonl (an older bench's records): each record reads back with the values of its line."""
    path = ROOT / "baseline" / "meta-gate.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert len(load_results([path]).cases) == len(lines)
    for line in lines:
        written = json.loads(line)
        read = json.loads(to_jsonl_line(from_jsonl_line(line)))
        assert {key: read[key] for key in written} == written
