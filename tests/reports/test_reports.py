"""Tests of the reports package: loading both result formats, tables, figures, report, compare gate, CI workflow.

Synthetic results are built with the real record classes (bench.record) and written in both formats the
bench produces; the overhead ratios are re-derived here from the raw JSON with the json module, not the loader.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.record import (
    SCHEMA_VERSION,
    BatchProbe,
    CaseRecord,
    MaxBatchRecord,
    Phase,
    Timeline,
    to_jsonl_line,
)

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
GIB = 2**30

# Realistic-looking per-method memory model: peak = fixed + per_sample · B (bytes), ms per sample.
METHODS = {
    "nondp": (1.20 * GIB, 60 * MIB, 1.00),
    "bk": (1.21 * GIB, 62 * MIB, 1.18),
    "opacus-ghost": (1.25 * GIB, 66 * MIB, 1.60),
    "opacus-hooks": (1.30 * GIB, 700 * MIB, 1.35),
}
BATCHES = (8, 16, 32, 64)
GPUS = {"a100": ("NVIDIA A100-SXM4-40GB", 40 * GIB, 1.0), "h100": ("NVIDIA H100 80GB HBM3", 80 * GIB, 0.55)}
WORKLOADS = {"dit-s-2-cond": ("dit", 256, 1.0), "gpt-proxy-256": ("gpt", 256, 0.8)}


def make_case(
    workload: str, method: str, batch: int, gpu: str, *, scale: float = 1.0, status: str | None = None
) -> CaseRecord:
    """One CUDA case with every figure a GPU run fills; OOM where the modelled peak exceeds the GPU's memory."""
    fixed, per_sample, time_factor = METHODS[method]
    _family, tokens, size = WORKLOADS[workload]
    gpu_name, gpu_memory, speed = GPUS[gpu]
    peak_tensor = int((fixed + per_sample * batch) * size * scale)
    oom = peak_tensor * 1.1 > gpu_memory
    status = status or ("oom" if oom else "ok")
    record = CaseRecord(
        workload=workload,
        method=method,
        batch_size=batch,
        device="cuda:0",
        status=status,
        device_name=gpu_name,
        device_memory_bytes=gpu_memory,
        runner_label=gpu,
        tokens_per_sample=tokens,
        params_total=32_963_360,
        params_trainable=32_897_824,
    )
    if status == "oom":
        record.reason = f"CUDA out of memory. Tried to allocate {per_sample // MIB} MiB"
        return record
    baseline = int(fixed * size * 0.6)
    record.memory.peak_tensor_bytes = peak_tensor
    record.memory.baseline_tensor_bytes = baseline
    record.memory.peak_allocated_bytes = int(peak_tensor * 1.02)
    record.memory.peak_reserved_bytes = int(peak_tensor * 1.10)
    record.memory.nvml_baseline_bytes = 520 * MIB
    record.memory.nvml_peak_used_bytes = record.memory.peak_reserved_bytes + record.memory.nvml_baseline_bytes
    record.memory.nvml_peak_minus_baseline_bytes = record.memory.peak_reserved_bytes
    record.memory.nvml_samples = 40
    share = (peak_tensor - baseline) // 3
    record.memory.breakdown = {
        "parameters": baseline // 4,
        "gradients": baseline // 4,
        "optimizer_state": baseline // 2,
        "activations": share * (1 if method == "opacus-hooks" else 3),
        "per_sample": 2 * share if method == "opacus-hooks" else 0,
        "other": 0,
    }
    record.memory.peak_phase = "backward"
    step = batch * time_factor * speed * size * 2e-3
    record.memory.phases = [
        Phase("forward", 0.0, 0.3 * step),
        Phase("backward", 0.3 * step, 0.8 * step),
        Phase("clip", 0.8 * step, 0.85 * step),
        Phase("noise", 0.85 * step, 0.9 * step),
        Phase("optimizer", 0.9 * step, step),
    ]
    t = [step * i / 20 for i in range(21)]
    shape = [baseline + (peak_tensor - baseline) * min(i, 20 - i) / 10 for i in range(21)]
    record.memory.timeline = Timeline(
        t_s=t,
        tensor_bytes=[int(v) for v in shape],
        allocated_bytes=[int(v * 1.02) for v in shape],
        nvml_used_bytes=[int(v * 1.1) + 520 * MIB for v in shape],
    )
    record.timing.time_median_s, record.timing.time_mean_s, record.timing.time_min_s, record.timing.time_stddev_s = (
        step,
        step * 1.01,
        step * 0.98,
        step * 0.01,
    )
    record.timing.rounds = 5
    record.noise_multiplier, record.max_grad_norm, record.optimizer = 1.0, 1.0, "adamw"
    return record


def make_run(gpu: str, *, scale: float = 1.0) -> list[CaseRecord]:
    return [make_case(w, m, b, gpu, scale=scale) for w in WORKLOADS for m in METHODS for b in BATCHES]


def benchmark_json(records: list[CaseRecord], gpu: str | None) -> dict:
    """What pytest-benchmark writes with the dpmem hooks: timed cases in benchmarks, the rest in dpmem_untimed."""
    benchmarks, untimed = [], []
    for r in records:
        stats = None
        if r.timing.time_median_s is not None:
            stats = {
                "median": r.timing.time_median_s,
                "mean": r.timing.time_mean_s,
                "min": r.timing.time_min_s,
                "max": r.timing.time_median_s * 1.05,
                "stddev": r.timing.time_stddev_s,
                "rounds": r.timing.rounds,
            }
        entry = {
            "name": f"test_dp_step[{r.workload}-{r.method}-{r.batch_size}-{r.device}]",
            "params": {"workload": r.workload, "method": r.method, "batch_size": r.batch_size, "device": r.device},
            "extra_info": r.to_dict(),
        }
        if stats is None:
            untimed.append(entry)
        else:
            benchmarks.append({**entry, "stats": stats})
    gpus = (
        [
            {
                "name": GPUS[gpu][0],
                "memory_total_bytes": GPUS[gpu][1],
                "driver_version": "550.54",
                "cuda_version": "12.4",
                "mig_mode": None,
            }
        ]
        if gpu
        else []
    )
    return {
        "machine_info": {
            "node": "runner",
            "dpmem": {
                "gpus": gpus,
                "runner_label": gpu,
                "torch": "2.13.0",
                "opacus": "1.6.0",
                "nvidia_ml_py": "12.560",
                "cpu": "x86_64",
            },
        },
        "commit_info": {"id": "0" * 40},
        "benchmarks": benchmarks,
        "dpmem_untimed": untimed,
        "datetime": "2025-01-01T00:00:00",
        "version": "5.3.0",
    }


def write_benchmark(path: Path, records: list[CaseRecord], gpu: str | None) -> Path:
    path.write_text(json.dumps(benchmark_json(records, gpu), indent=4))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(to_jsonl_line(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------
from reports.__main__ import build_parsers, main  # noqa: E402
from reports.figures import FIGURES  # noqa: E402
from reports.load import ReportInputError, load_results  # noqa: E402
from reports.tables import affine_fit_table, overhead_table  # noqa: E402


@pytest.fixture
def two_gpu_files(tmp_path) -> tuple[Path, Path]:
    """An A100 run as pytest-benchmark JSON and an H100 run as JSON lines."""
    return (
        write_benchmark(tmp_path / "a100.json", make_run("a100"), "a100"),
        write_jsonl(tmp_path / "h100.jsonl", make_run("h100")),
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reports", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def independent_ratios(benchmark_path: Path) -> dict[tuple, dict[str, object]]:
    """Overhead cells recomputed from the raw pytest-benchmark JSON with the json module only."""
    data = json.loads(benchmark_path.read_text())
    label = data["machine_info"]["dpmem"]["runner_label"]
    by_case = {}
    for bench in [*data["benchmarks"], *data["dpmem_untimed"]]:
        e = bench["extra_info"]
        median = bench["stats"]["median"] if "stats" in bench else None
        by_case[(e["workload"], e["batch_size"], e["method"])] = (e, median)
    out = {}
    for (workload, batch, method), (e, median) in by_case.items():
        if method == "nondp":
            continue
        base, base_median = by_case[(workload, batch, "nondp")]
        if e["status"] != "ok":
            out[(label, workload, batch, method)] = {"tensor": "OOM", "reserved": "OOM", "time": "OOM"}
        else:
            out[(label, workload, batch, method)] = {
                "tensor": e["peak_tensor_bytes"] / base["peak_tensor_bytes"],
                "reserved": e["peak_reserved_bytes"] / base["peak_reserved_bytes"],
                "time": median / base_median,
            }
    return out


def check_overhead_csv(csv_path: Path, expected: dict[tuple, dict[str, object]]) -> int:
    import csv

    rows = {
        (r["machine"], r["workload"], int(r["batch_size"]), r["method"]): r for r in csv.DictReader(csv_path.open())
    }
    for key, want in expected.items():
        got = rows[key]
        for column, name in (
            ("peak tensor ×nondp", "tensor"),
            ("peak reserved ×nondp", "reserved"),
            ("median step ×nondp", "time"),
        ):
            if isinstance(want[name], str):
                assert got[column] == want[name], (key, column)
            else:
                assert float(got[column]) == pytest.approx(want[name], abs=6e-4), (key, column)
    return len(expected)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
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
        "source",
        "family",
        "tokens_per_sample",
    ):
        assert column in cases.columns
    assert set(cases["family"]) == {"dit", "gpt"}
    row = cases.iloc[0]
    assert results.record(row).workload == row["workload"]


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


def test_a_broken_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    lines = [to_jsonl_line(r) for r in make_run("h100")[:3]]
    lines[1] = lines[1][:40]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportInputError, match=r"broken\.jsonl: line 2 is not JSON"):
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
    with pytest.raises(ReportInputError, match=r"future\.json: benchmark .*schema_version .* newer"):
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


def _write_bad(tmp_path: Path, name: str) -> Path:
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
    path = _write_bad(tmp_path, name)
    with pytest.raises(ReportInputError) as info:
        load_results([path])
    message = str(info.value)
    assert "\n" not in message and str(path) in message and BAD_FILES[name][1] in message


def test_cli_bad_input_exits_2_and_skip_bad_goes_on(tmp_path, two_gpu_files):
    bad = [_write_bad(tmp_path, n) for n in ("empty.json", "truncated.json", "foreign.json")]
    for path in bad:
        proc = run_cli(path, "--out", tmp_path / "r")
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and str(path) in proc.stderr
    # --skip-bad: warnings on stderr, the good files still make a report
    code = main([*map(str, bad), str(two_gpu_files[0]), "--skip-bad", "--out", str(tmp_path / "r")])
    assert code == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert all(str(p) in report for p in bad)  # the report lists what it skipped
    # --skip-bad with nothing usable left is still an error
    assert main([*map(str, bad), "--skip-bad", "--out", str(tmp_path / "r2")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Tables, figures, report
# ---------------------------------------------------------------------------------------------------------------
def test_overhead_table_matches_ratios_recomputed_from_raw_json(tmp_path, two_gpu_files):
    bench_path, jsonl_path = two_gpu_files
    assert main([str(bench_path), str(jsonl_path), "--out", str(tmp_path / "r")]) == 0
    checked = check_overhead_csv(tmp_path / "r" / "overhead.csv", independent_ratios(bench_path))
    assert checked == len(WORKLOADS) * (len(METHODS) - 1) * len(BATCHES)
    md = (tmp_path / "r" / "overhead.md").read_text()
    assert "| OOM |" in md and "peak reserved" in md and "peak live tensor bytes" in md


def test_overhead_cells_name_the_reason_not_blank(two_gpu_files):
    cases = load_results(two_gpu_files).cases.copy()
    cpu = cases[
        (cases["machine"] == "a100") & (cases["batch_size"] == 8) & (cases["workload"] == "dit-s-2-cond")
    ].copy()
    cpu["device"], cpu["machine"] = "cpu", "laptop"
    cpu["peak_reserved_bytes"] = cpu["peak_allocated_bytes"] = None
    cpu.loc[cpu["method"] == "opacus-ghost", "status"] = "unsupported"
    table = overhead_table(cpu)
    by_method = table.set_index("method")
    assert by_method.loc["opacus-ghost", "peak tensor ×nondp"] == "unsupported"
    assert by_method.loc["bk", "peak reserved ×nondp"] == "n/a"  # no allocator on CPU
    assert isinstance(by_method.loc["bk", "peak tensor ×nondp"], float)
    cpu.loc[cpu["method"] == "nondp", "status"] = "oom"
    assert overhead_table(cpu).set_index("method").loc["bk", "peak tensor ×nondp"] == "nondp OOM"
    no_base = overhead_table(cpu[cpu["method"] != "nondp"]).set_index("method")
    assert no_base.loc["bk", "median step ×nondp"] == "no nondp"
    assert not table.isna().any().any()


def test_affine_fit_recovers_the_memory_model(two_gpu_files):
    results = load_results(two_gpu_files)
    fits = affine_fit_table(results.cases, results.max_batches).set_index(["machine", "workload", "method"])
    fixed, per_sample, _ = METHODS["bk"]
    row = fits.loc[("h100", "dit-s-2-cond", "bk")]
    assert row["fit metric"] == "peak_reserved_bytes"
    # reserved = 1.10 × tensor in the synthetic records; int() truncation only
    assert row["fixed_bytes"] == pytest.approx(1.10 * fixed, rel=1e-6)
    assert row["per_sample_bytes"] == pytest.approx(1.10 * per_sample, rel=1e-6)
    assert row["predicted max batch"] == int((80 * GIB - 1.10 * fixed) // (1.10 * per_sample))
    hooks = fits.loc[("a100", "dit-s-2-cond", "opacus-hooks")]
    assert hooks["measured max batch"] == 32 and hooks["first failing batch"] == 64
    assert fits.loc[("a100", "dit-s-2-cond", "bk"), "measured max batch"] == "≥64"


def test_max_batch_records_take_precedence_over_the_case_fit(tmp_path, two_gpu_files):
    search = MaxBatchRecord(
        "dit-s-2-cond",
        "bk",
        "cuda:0",
        memory_limit_bytes=40 * GIB,
        max_batch_measured=600,
        first_failing_batch=601,
        fit_metric="peak_reserved_bytes",
        fit_fixed_bytes=1.3 * GIB,
        fit_per_sample_bytes=64 * MIB,
        predicted_max_batch={str(40 * GIB): 619, str(80 * GIB): 1259},
        probes=[BatchProbe(600, "ok", peak_reserved_bytes=39 * GIB), BatchProbe(601, "oom")],
        device_name=GPUS["a100"][0],
        runner_label="a100",
    )
    path = write_jsonl(tmp_path / "maxbatch.jsonl", [search])
    results = load_results([*two_gpu_files, path])
    assert len(results.max_batches) == 1
    fits = affine_fit_table(results.cases, results.max_batches).set_index(["machine", "workload", "method"])
    row = fits.loc[("a100", "dit-s-2-cond", "bk")]
    assert (row["source"], row["measured max batch"], row["predicted max batch"]) == ("max-batch search", 600, 619)
    assert fits.loc[("h100", "dit-s-2-cond", "bk"), "source"] == "fit to cases"


def test_render_writes_every_figure_table_and_a_self_contained_report(tmp_path, two_gpu_files):
    out = tmp_path / "report"
    assert main([*map(str, two_gpu_files), "--out", str(out)]) == 0
    for name in FIGURES:
        for suffix in (".png", ".svg"):
            path = out / "figures" / f"{name}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for name in ("overhead.md", "overhead.csv", "memory_fit.md", "memory_fit.csv", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing outside the file
    assert "<table>" in html and "Figures not produced" not in html
    md = (out / "report.md").read_text()
    assert "bk costs 1.02× non-DP memory" in md  # A100, dit-s-2-cond, batch 32 (largest batch where all are ok)
    assert "opacus-hooks runs out of memory above batch 32 on dit-s-2-cond" in md
    assert "NVIDIA H100 80GB HBM3 (h100)" in md


def test_figures_without_data_are_skipped_with_the_reason(tmp_path):
    only_dit = [r for r in make_run("a100") if r.workload == "dit-s-2-cond"]
    for r in only_dit:
        r.memory.breakdown = {}
    path = write_jsonl(tmp_path / "dit.jsonl", only_dit)
    out = tmp_path / "r"
    assert main([str(path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    skipped = md.split("## Figures not produced", 1)[1]
    assert "GPU comparison: results come from one machine only (a100)" in skipped
    assert "Proxy validity (GPT vs DiT): the data lack the GPT proxy family" in skipped
    assert "Breakdown at the peak: no breakdown at peak recorded" in skipped
    assert not (out / "figures" / "gpu_comparison.png").exists()
    assert (out / "figures" / "peak_vs_batch.png").stat().st_size > 0


def test_chosen_workload_and_batch_drive_breakdown_and_timeline(tmp_path, two_gpu_files):
    out = tmp_path / "r"
    assert main([*map(str, two_gpu_files), "--out", str(out), "--workload", "gpt-proxy-256", "--batch-size", "8"]) == 0
    assert "gpt-proxy-256, batch 8" in (out / "report.md").read_text()
    assert main([*map(str, two_gpu_files), "--out", str(out), "--workload", "nope"]) == 0
    assert "workload 'nope' is not in the results" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Compare gate and github-action-benchmark export
# ---------------------------------------------------------------------------------------------------------------
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
    grown = [CaseRecord.from_dict(r.to_dict()) for r in records]
    target = next(r for r in grown if (r.workload, r.method, r.batch_size) == ("dit-s-2-cond", "bk", 16))
    target.memory.peak_reserved_bytes = int(
        target.memory.peak_reserved_bytes * 1.10
    )  # one figure of one case grows 10 %
    new = write_jsonl(tmp_path / "new.jsonl", grown)
    assert main(["compare", str(base), str(new), "--max-regression", "5%"]) == 1
    out = capsys.readouterr().out
    assert "dit-s-2-cond/bk/bs16/cuda:0 [a100]: peak_reserved_bytes +10.0%" in out
    assert out.count("FAIL") == 1
    assert main(["compare", str(base), str(new), "--max-regression", "0.15"]) == 0


def test_compare_fails_when_a_case_goes_from_ok_to_oom(tmp_path, capsys):
    records = make_run("a100")
    base = write_jsonl(tmp_path / "base.jsonl", records)
    changed = [CaseRecord.from_dict(r.to_dict()) for r in records]
    victim = next(r for r in changed if (r.workload, r.method, r.batch_size) == ("gpt-proxy-256", "opacus-hooks", 32))
    changed[changed.index(victim)] = make_case("gpt-proxy-256", "opacus-hooks", 32, "a100", status="oom")
    new = write_jsonl(tmp_path / "new.jsonl", changed)
    assert main(["compare", str(base), str(new), "--max-regression", "50%"]) == 1
    assert "gpt-proxy-256/opacus-hooks/bs32/cuda:0 [a100]: ok → OOM" in capsys.readouterr().out
    assert main(["compare", str(new), str(base), "--max-regression", "5%"]) == 0  # oom → ok is an improvement


def test_compare_matches_by_machine_and_bad_threshold_is_exit_2(tmp_path, two_gpu_files, capsys):
    a100, h100 = two_gpu_files
    assert main(["compare", str(a100), str(h100)]) == 0  # nothing in common: said, not failed
    assert "No case is in both result sets" in capsys.readouterr().out
    proc = run_cli("compare", a100, a100, "--max-regression", "five")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--max-regression 'five'" in proc.stderr
    for bad in ("-5%", "nan", "%", "inf"):
        assert main(["compare", str(a100), str(a100), f"--max-regression={bad}"]) == 2
        assert "--max-regression" in capsys.readouterr().err
    proc = run_cli("compare", a100)  # a usage error is one line too
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_merge_writes_one_jsonl_that_loads_back(tmp_path, two_gpu_files):
    merged = tmp_path / "baseline.json"  # a JSON-lines file under the CI's baseline name: detected by content
    assert main(["merge", *map(str, two_gpu_files), "--out", str(merged)]) == 0
    again = load_results([merged]).cases
    before = load_results(two_gpu_files).cases
    assert len(again) == len(before)
    assert sorted(again["machine"]) == sorted(before["machine"])
    assert main(["compare", str(merged), *map(str, two_gpu_files)]) == 0


# ---------------------------------------------------------------------------------------------------------------
# CI workflow
# ---------------------------------------------------------------------------------------------------------------
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-bench.yml"


def _workflow_commands() -> list[list[str]]:
    """Every `python -m X ...` / `pytest ...` command of every run step, as tokens (line continuations joined)."""
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    commands = []
    for job in data["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "").replace("\\\n", " ").replace("${{ matrix.gpu }}", "a100")
            for line in script.splitlines():
                tokens = shlex.split(line, comments=True)
                for i, token in enumerate(tokens):
                    if token == "pytest" or (token.endswith("python") and tokens[i + 1 : i + 2] == ["-m"]):
                        commands.append(tokens[i:])
                        break
    return commands


def test_workflow_is_yaml_with_a_gpu_matrix_of_runner_labels():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(WORKFLOW.read_text())
    bench = data["jobs"]["bench"]
    include = bench["strategy"]["matrix"]["include"]
    assert {e["gpu"]: e["runner"] for e in include} == {
        "a100": ["self-hosted", "a100"],
        "h100": ["self-hosted", "h100"],
    }
    assert bench["runs-on"] == "${{ matrix.runner }}"
    steps = {s.get("name", s.get("uses")): s for s in bench["steps"]}
    assert steps["Benchmark"]["env"]["DPMEM_RUNNER_LABEL"] == "${{ matrix.gpu }}"
    assert "pip install -e ." in steps["Install (keeping the runner's CUDA torch)"]["run"]
    uploads = [s for s in bench["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["if"] == "always()"
    report = data["jobs"]["report"]
    assert report["needs"] == "bench"
    assert any(str(s.get("uses", "")).startswith("actions/download-artifact") for s in report["steps"])
    compare_step = next(s for s in report["steps"] if s.get("name") == "Compare with the baseline")
    assert "if [ -f baseline/gpu-bench.json ]" in compare_step["run"]  # skips cleanly without a baseline


def test_workflow_reports_commands_use_real_subcommands_and_options():
    parsers = build_parsers()
    seen = set()
    for tokens in _workflow_commands():
        if tokens[0] == "pytest" or tokens[2] != "reports":
            continue
        args = tokens[3:]
        command = args.pop(0) if args and args[0] in parsers else "render"
        seen.add(command)
        known = {o for action in parsers[command]._actions for o in action.option_strings}
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in known, f"workflow passes unknown option {arg} to reports {command}"
        parsed = parsers[command].parse_args(args)  # every command also parses as a whole
        if command == "compare":
            assert parsed.base == "baseline/gpu-bench.json" and parsed.max_regression == "5%"
    assert seen == {"render", "compare", "export", "merge"}


def test_workflow_pytest_command_names_real_paths_and_options():
    commands = [t for t in _workflow_commands() if t[0] == "pytest"]
    assert len(commands) == 1
    tokens = commands[0]
    paths = [
        t
        for prev, t in itertools.pairwise(tokens)
        if not t.startswith("-") and not (prev.startswith("--") and "=" not in prev)
    ]
    assert paths == ["bench/"] and (ROOT / "bench" / "test_dp_step.py").is_file()
    if not (ROOT / "conftest.py").exists():
        pytest.skip("root conftest.py (the bench options) does not exist yet; cannot cross-check --preset/--results")
    help_text = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--help", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    for token in tokens[1:]:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, f"workflow passes unknown pytest option {token}"
    from bench.config import PRESETS

    assert tokens[tokens.index("--preset") + 1] in PRESETS


# ---------------------------------------------------------------------------------------------------------------
# A real (tiny) bench run rendered end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_bench(tmp_path_factory) -> tuple[Path, Path]:
    if not (ROOT / "conftest.py").exists() or not (ROOT / "bench" / "test_dp_step.py").exists():
        pytest.skip("the bench (bench/test_dp_step.py + root conftest.py) is not in the tree yet")
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "bench/",
        "--preset",
        "cpu-smoke",
        "--workloads",
        "gpt-tiny",
        "--methods",
        "nondp,bk,opacus-hooks",
        "--batch-sizes",
        "2,4",
        f"--benchmark-json={out / 'out.json'}",
        f"--results={out / 'out.jsonl'}",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "out.json", out / "out.jsonl"


def test_real_bench_renders_and_ratios_match_raw_json(tmp_path, real_bench):
    bench_json, bench_jsonl = real_bench
    out = tmp_path / "report"
    assert main([str(bench_json), str(bench_jsonl), "--out", str(out)]) == 0
    for name in ("peak_vs_batch", "breakdown", "timeline"):  # the figures a one-machine GPT-only CPU run supports
        for suffix in (".png", ".svg"):
            assert (out / "figures" / f"{name}{suffix}").stat().st_size > 0
    for name in ("overhead.csv", "overhead.md", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "Proxy validity (GPT vs DiT): the data lack the DiT family" in md
    # the overhead ratios, recomputed from the raw pytest-benchmark JSON with the json module
    import csv

    data = json.loads(bench_json.read_text())
    cases = {(b["extra_info"]["method"], b["extra_info"]["batch_size"]): b for b in data["benchmarks"]}
    assert {m for m, _ in cases} == {"nondp", "bk", "opacus-hooks"} and {b for _, b in cases} == {2, 4}
    rows = {(r["method"], int(r["batch_size"])): r for r in csv.DictReader((out / "overhead.csv").open())}
    assert len(rows) == 4
    for (method, batch), row in rows.items():
        e, base = cases[(method, batch)]["extra_info"], cases[("nondp", batch)]["extra_info"]
        assert e["device"] == "cpu" and row["peak reserved ×nondp"] == "n/a"
        if e["status"] != "ok":
            assert row["peak tensor ×nondp"] == {"oom": "OOM", "unsupported": "unsupported"}.get(
                e["status"], e["status"]
            )
            continue
        assert float(row["peak tensor ×nondp"]) == pytest.approx(
            e["peak_tensor_bytes"] / base["peak_tensor_bytes"], abs=6e-4
        )
        timed, timed_base = cases[(method, batch)]["stats"], cases[("nondp", batch)]["stats"]
        if timed and timed_base:
            assert float(row["median step ×nondp"]) == pytest.approx(timed["median"] / timed_base["median"], abs=6e-4)
    # opacus-hooks instantiates per-sample gradients: more peak memory than non-DP on a real run
    hooks = rows[("opacus-hooks", 4)]
    if hooks["status"] == "ok":
        assert float(hooks["peak tensor ×nondp"]) > 1.0


def test_real_bench_compare_gate(tmp_path, real_bench):
    bench_json, _ = real_bench
    assert main(["compare", str(bench_json), str(bench_json), "--max-regression", "5%"]) == 0
    data = json.loads(bench_json.read_text())
    grown = next(
        b for b in data["benchmarks"] if b["extra_info"]["status"] == "ok" and b["extra_info"]["method"] == "bk"
    )
    grown["extra_info"]["peak_tensor_bytes"] = int(grown["extra_info"]["peak_tensor_bytes"] * 1.10)
    regressed = tmp_path / "regressed.json"
    regressed.write_text(json.dumps(data))
    assert main(["compare", str(bench_json), str(regressed), "--max-regression", "5%"]) == 1
    grown["extra_info"].update(status="oom", reason="CUDA out of memory (injected)")
    regressed.write_text(json.dumps(data))
    assert main(["compare", str(bench_json), str(regressed), "--max-regression", "50%"]) == 1
