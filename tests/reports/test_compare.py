"""The regression gate (``python -m reports compare``), its options, and the export/merge subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reports.__main__ import main
from reports.compare import GATED_BY_DEFAULT
from reports.load import PEAK_COLUMNS, load_results
from tests.reports.fakes import (
    MIB,
    copy_record,
    make_case,
    make_run,
    run_cli,
    write_benchmark,
    write_jsonl,
    write_two_gpu_files,
)


@pytest.fixture
def two_gpu_files(tmp_path) -> tuple[Path, Path]:
    return write_two_gpu_files(tmp_path)


def _grown(records, case: tuple, **figures: float):
    """Copies of ``records`` with the given memory figures of one (workload, method, batch) multiplied."""
    grown = [copy_record(r) for r in records]
    target = next(r for r in grown if (r.workload, r.method, r.batch_size) == case)
    for figure, factor in figures.items():
        setattr(target.memory, figure, int(getattr(target.memory, figure) * factor))
    return grown


def test_compare_identical_passes_and_exports_benchmark_action(tmp_path, two_gpu_files, capsys):
    bench, _ = two_gpu_files
    export = tmp_path / "bench-action.json"
    assert (
        main(["compare", str(bench), str(bench), "--max-regression", "5%", "--export-benchmark-action", str(export)])
        == 0
    )
    assert "No memory regression" in capsys.readouterr().out
    entries = json.loads(export.read_text())
    assert entries and all(set(e) == {"name", "unit", "value"} and e["unit"] == "MiB" for e in entries)
    assert len({e["name"] for e in entries}) == len(entries)
    nondp = next(e for e in entries if e["name"] == "dit-s-2-cond/nondp/bs8/cuda:0 [a100] peak_reserved_bytes")
    assert nondp["value"] == pytest.approx(
        make_case("dit-s-2-cond", "nondp", 8, "a100").memory.peak_reserved_bytes / MIB, abs=1e-3
    )
    assert main(["export", str(bench), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text()) == entries


def test_compare_fails_on_a_memory_regression_beyond_the_threshold(tmp_path, capsys):
    records = make_run("a100")
    base = write_benchmark(tmp_path / "base.json", records, "a100")
    # one gated figure of one case grows 10 %
    new = write_jsonl(tmp_path / "new.jsonl", _grown(records, ("dit-s-2-cond", "bk", 16), peak_reserved_bytes=1.10))
    assert main(["compare", str(base), str(new), "--max-regression", "5%"]) == 1
    out = capsys.readouterr().out
    assert "dit-s-2-cond/bk/bs16/cuda:0 [a100]: peak_reserved_bytes +10.0%" in out
    assert out.count("FAIL") == 1
    assert main(["compare", str(base), str(new), "--max-regression", "0.15"]) == 0


def test_figures_not_isolated_between_cases_are_shown_but_not_gated_by_default(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    # what a larger case run before leaves behind: process RSS and device-wide NVML up, the case's own bytes equal
    grown = _grown(records, ("dit-s-2-cond", "bk", 16), peak_rss_bytes=1.20, nvml_peak_used_bytes=1.30)
    new = write_jsonl(tmp_path / "new.jsonl", grown)
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "No memory regression" in out
    assert "nvml_peak_used_bytes +30.0%" in out  # shown, for information
    assert "not gated (shown for information): nvml_peak_used_bytes, nvml_process_peak_bytes, peak_rss_bytes" in out
    # chosen explicitly, they gate
    assert main(["compare", str(base), str(new), "--gate-figures", "peak_tensor_bytes,peak_rss_bytes"]) == 1
    out = capsys.readouterr().out
    assert (
        "dit-s-2-cond/bk/bs16/cuda:0 [a100]: peak_rss_bytes +20.0%" in out
        and "nvml_peak_used" not in out.split("REGRESSION")[1]
    )
    # a gated figure that is not in the default set of this call still gates when named alone
    assert main(["compare", str(base), str(new), "--gate-figures", "peak_reserved_bytes"]) == 0
    assert set(GATED_BY_DEFAULT) < set(PEAK_COLUMNS)


def test_gate_figures_option_is_validated_in_one_line(two_gpu_files):
    bench, _ = two_gpu_files
    proc = run_cli("compare", bench, bench, "--gate-figures", "peak_tensor_bytes,peak_rss")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "peak_rss" in proc.stderr and all(name in proc.stderr for name in PEAK_COLUMNS)


def test_compare_fails_when_a_case_goes_from_ok_to_oom(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    changed = [copy_record(r) for r in records]
    victim = next(r for r in changed if (r.workload, r.method, r.batch_size) == ("gpt-proxy-256", "opacus-hooks", 32))
    changed[changed.index(victim)] = make_case("gpt-proxy-256", "opacus-hooks", 32, "a100", status="oom")
    new = write_jsonl(tmp_path / "new.jsonl", changed)
    assert main(["compare", str(base), str(new), "--max-regression", "50%"]) == 1
    assert "gpt-proxy-256/opacus-hooks/bs32/cuda:0 [a100]: ok → OOM" in capsys.readouterr().out
    assert main(["compare", str(new), str(base), "--max-regression", "5%"]) == 0  # oom → ok is an improvement


def test_compare_matches_by_machine_and_no_overlap_is_not_a_silent_pass(two_gpu_files, capsys):
    a100, h100 = two_gpu_files
    assert main(["compare", str(a100), str(h100)]) == 2  # nothing in common: nothing was checked
    captured = capsys.readouterr()
    assert "No case is in both result sets" in captured.out
    assert captured.err.strip().count("\n") == 0 and "--allow-no-overlap" in captured.err
    assert main(["compare", str(a100), str(h100), "--allow-no-overlap"]) == 0


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("five", "is not a fraction (0.05) or a percentage (5%)"),
        ("5", "write '5%' for 5 percent"),
        ("1.5", "write '1.5%' for 1.5 percent"),
        ("-5%", "finite fraction"),
        ("nan", "finite fraction"),
        ("%", "is not a fraction"),
        ("inf", "finite fraction"),
    ],
)
def test_bad_threshold_is_exit_2_with_one_line(two_gpu_files, capsys, value, words):
    a100, _ = two_gpu_files
    assert main(["compare", str(a100), str(a100), f"--max-regression={value}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and f"--max-regression {value!r}" in err and words in err


def test_thresholds_as_fraction_or_percentage(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    new = write_jsonl(tmp_path / "new.jsonl", _grown(records, ("dit-s-2-cond", "bk", 16), peak_tensor_bytes=1.5))
    assert main(["compare", str(base), str(new), "--max-regression", "1"]) == 0  # a fraction: 100 %
    assert main(["compare", str(base), str(new), "--max-regression", "60%"]) == 0
    assert main(["compare", str(base), str(new), "--max-regression", "0.4"]) == 1
    assert main(["compare", str(base), str(new), "--max-regression", "40%"]) == 1


def test_different_torch_thread_counts_are_warned(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    changed = [copy_record(r) for r in records]
    for r in changed[:3]:
        r.timing.torch_threads = 2
    new = write_jsonl(tmp_path / "new.jsonl", changed)
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert "warning: 3 case(s) were timed with different torch thread counts (base→new: 8→2)" in out
    assert main(["compare", str(base), str(base)]) == 0
    assert "warning:" not in capsys.readouterr().out


@pytest.mark.parametrize("value", ["Infinity", "1" + "0" * 400, "NaN", "-1"])
def test_a_bad_figure_in_compare_is_exit_2_not_a_regression(tmp_path, capsys, value):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    text = "".join(
        json.dumps({"record_type": "case", **r.to_dict(), **({"peak_tensor_bytes": "@"} if i == 5 else {})}) + "\n"
        for i, r in enumerate(records)
    )
    new = tmp_path / "new.jsonl"
    new.write_text(text.replace('"@"', value))
    assert main(["compare", str(base), str(new)]) == 2  # in-process: an uncaught exception would fail the test
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and str(new) in err and "peak_tensor_bytes" in err


def test_unwritable_export_is_exit_2_before_comparing(tmp_path, two_gpu_files, capsys):
    a100, _ = two_gpu_files
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for target in (blocker / "export.json", tmp_path):  # under a regular file; an existing directory
        assert main(["compare", str(a100), str(a100), "--export-benchmark-action", str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().count("\n") == 0 and "--export-benchmark-action" in captured.err
        assert captured.out == ""  # refused before loading or comparing anything
    assert main(["export", str(a100), "--out", str(blocker / "e.json")]) == 2
    assert main(["merge", str(a100), "--out", str(tmp_path)]) == 2


def test_merge_writes_one_jsonl_that_loads_back_with_the_machine_facts(tmp_path, two_gpu_files):
    bench, jsonl = two_gpu_files
    # the A100 records lack their machine facts: the loader fills them from machine_info, merge keeps them
    data = json.loads(bench.read_text())
    for entry in [*data["benchmarks"], *data["dpmem_untimed"]]:
        entry["extra_info"]["device_name"] = entry["extra_info"]["runner_label"] = None
    bench.write_text(json.dumps(data))
    merged = tmp_path / "baseline.json"  # a JSON-lines file under the CI's baseline name: detected by content
    assert main(["merge", str(bench), str(jsonl), "--out", str(merged)]) == 0
    again = load_results([merged])
    before = load_results([bench, jsonl])
    assert len(again.cases) == len(before.cases)
    assert sorted(again.cases["machine"]) == sorted(before.cases["machine"])
    assert {c.record.runner_label for c in again.loaded_cases} == {"a100", "h100"}  # written into the records
    timed = again.cases[again.cases["status"] == "ok"]
    assert timed["time_max_s"].notna().sum() == before.cases["time_max_s"].notna().sum()  # stats kept as timing
    assert main(["compare", str(merged), str(bench), str(jsonl)]) == 0


def _with_status(records, case: tuple, status: str, reason: str = ""):
    """Copies of ``records`` with one (workload, method, batch) case recorded as ``status`` with ``reason``."""
    changed = [copy_record(r) for r in records]
    target = next(r for r in changed if (r.workload, r.method, r.batch_size) == case)
    target.status, target.reason = status, reason
    return changed


BK16 = ("dit-s-2-cond", "bk", 16)
BK16_NAME = "dit-s-2-cond/bk/bs16/cuda:0 [a100]"


@pytest.mark.parametrize("status", ["error", "unsupported"])
def test_a_case_that_broke_fails_the_gate_with_its_reason_unless_allowed(tmp_path, capsys, status):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    new = write_jsonl(tmp_path / "new.jsonl", _with_status(records, BK16, status, "bk: RuntimeError: boom\nTraceback"))
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION in 1 case(s):\n  {BK16_NAME}: broke: ok → {status} (bk: RuntimeError: boom)" in out
    assert f"FAIL: broke: ok → {status} |" in out  # the table's verdict
    assert "hint: --allow-status-change lets a case that broke pass" in out
    assert main(["compare", str(base), str(new), "--allow-status-change"]) == 0
    out = capsys.readouterr().out
    assert f"{BK16_NAME}: broke: ok → {status} (bk: RuntimeError: boom) (--allow-status-change)" in out
    assert f"| broke: ok → {status} (allowed) |" in out and "REGRESSION" not in out


def test_ok_to_oom_is_a_memory_regression_that_allow_status_change_does_not_pass(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    new = write_jsonl(tmp_path / "new.jsonl", _with_status(records, BK16, "oom", "CUDA out of memory"))
    assert main(["compare", str(base), str(new), "--allow-status-change"]) == 1
    assert f"{BK16_NAME}: ok → OOM" in capsys.readouterr().out


@pytest.mark.parametrize(("before", "after"), [("unsupported", "ok"), ("error", "ok"), ("unsupported", "error")])
def test_other_status_changes_are_shown_and_pass(tmp_path, capsys, before, after):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", _with_status(records, BK16, before, "bk: why"))
    new = write_jsonl(tmp_path / "new.jsonl", _with_status(records, BK16, after, "bk: why" if after != "ok" else ""))
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert f"| changed: {before} → {after} |" in out and "REGRESSION" not in out


@pytest.mark.parametrize("status", ["ok", "unsupported"])
def test_a_case_that_disappeared_fails_the_gate_unless_allowed(tmp_path, capsys, status):
    records = _with_status(make_run("a100"), BK16, status, "bk: why" if status != "ok" else "")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    new = write_jsonl(tmp_path / "new.jsonl", [r for r in records if (r.workload, r.method, r.batch_size) != BK16])
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert f"Missing from new (1): {BK16_NAME}" in out
    assert f"REGRESSION in 1 case(s):\n  {BK16_NAME}: disappeared: {status} → missing" in out
    assert "hint: --allow-missing lets a case missing from NEW pass" in out
    assert main(["compare", str(base), str(new), "--allow-missing"]) == 0
    out = capsys.readouterr().out
    assert f"{BK16_NAME}: disappeared: {status} → missing (--allow-missing)" in out and "REGRESSION" not in out


def test_a_machine_the_new_results_do_not_hold_is_said_not_failed(tmp_path, capsys):
    """An optional runner (the many-rank job) that did not run: its baseline cases are not compared."""
    a100, h100 = make_run("a100"), make_run("h100")
    base = write_jsonl(tmp_path / "base.jsonl", [*a100, *h100])
    new = write_jsonl(tmp_path / "new.jsonl", a100)
    assert main(["compare", str(base), str(new)]) == 0
    out = capsys.readouterr().out
    assert f"Not compared, no case of the machine in the new results: [h100]: {len(h100)} case(s) of the base" in out
    assert "Missing from new" not in out


def test_a_huge_reason_is_cut_in_the_gate_verdict(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    new = write_jsonl(tmp_path / "new.jsonl", _with_status(records, BK16, "error", "bk: " + "x" * 10_000_000))
    assert main(["compare", str(base), str(new)]) == 1
    out = capsys.readouterr().out
    assert len(out) < 100_000 and "full text in the record" in out
