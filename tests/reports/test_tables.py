"""The overhead and fit tables: typed cells (numbers, NaN and status columns), their text form, the noise rule."""

from __future__ import annotations

import csv
import math

import pandas as pd
import pytest

from bench.results.record import BatchProbe, MaxBatchRecord
from reports.grid import compact, frame_grid, write_table
from reports.load import load_results
from reports.tables import (
    OVERHEAD_NOTES,
    affine_fit_table,
    fit_display,
    overhead_display,
    overhead_table,
    overhead_warnings,
)
from tests.reports.fakes import (
    BATCHES,
    GIB,
    GPUS,
    METHODS,
    MIB,
    RELATIVE_IQR,
    WORKLOADS,
    independent_ratios,
    write_jsonl,
    write_two_gpu_files,
)

RATIOS = {"tensor": "peak tensor ×nondp", "reserved": "peak reserved ×nondp", "time": "median step ×nondp"}


@pytest.fixture(scope="module")
def two_gpu(tmp_path_factory):
    files = write_two_gpu_files(tmp_path_factory.mktemp("two_gpu"))
    return files, load_results(files)


def test_overhead_csv_holds_numbers_and_statuses_matching_ratios_recomputed_from_raw_json(tmp_path, two_gpu):
    (bench_path, _), results = two_gpu
    grid = compact(frame_grid(overhead_display(results.overhead), results.overhead, "overhead", "every case"))
    write_table(grid, tmp_path, "overhead", OVERHEAD_NOTES, results.overhead)
    expected = independent_ratios(bench_path)
    rows = {
        (r["machine"], r["workload"], int(r["batch_size"]), r["method"]): r
        for r in csv.DictReader((tmp_path / "overhead.csv").open())
    }
    for key, want in expected.items():
        got = rows[key]
        assert got["status"] == want["status"], key
        for name, column in RATIOS.items():
            if want["status"] != "ok":
                assert got[column] == "", (key, column)  # no number; the status column says why
            else:
                assert float(got[column]) == pytest.approx(want[name], abs=6e-4), (key, column)
    assert len(expected) == len(WORKLOADS) * (len(METHODS) - 1) * len(BATCHES)
    md = (tmp_path / "overhead.md").read_text()
    assert "| OOM |" in md and "peak reserved" in md and "peak live tensor bytes" in md


def test_overhead_cells_are_numbers_and_their_text_names_the_reason(two_gpu):
    _, results = two_gpu
    cases = results.cases
    cpu = cases[
        (cases["machine"] == "a100") & (cases["batch_size"] == 8) & (cases["workload"] == "dit-s-2-cond")
    ].copy()
    cpu["device"], cpu["machine"] = "cpu", "laptop"
    cpu["peak_reserved_bytes"] = cpu["peak_allocated_bytes"] = None
    cpu.loc[cpu["method"] == "opacus-ghost", "status"] = "unsupported"
    table = overhead_table(cpu)
    for column in ("peak tensor MiB", "nondp peak tensor MiB", *RATIOS.values(), "step time noise"):
        assert table[column].dtype == float, column  # typed: never a string parsed back later
    by_method = table.set_index("method")
    assert math.isnan(by_method.loc["opacus-ghost", "peak tensor ×nondp"])
    assert by_method.loc["opacus-ghost", "status"] == "unsupported"
    assert math.isnan(by_method.loc["bk", "peak reserved ×nondp"])  # no allocator on CPU
    assert by_method.loc["bk", "peak tensor ×nondp"] > 0
    shown = overhead_display(table).set_index("method")
    assert shown.loc["opacus-ghost", "peak tensor ×nondp"] == "unsupported"
    assert shown.loc["opacus-ghost", "peak tensor MiB"] == "unsupported"
    assert shown.loc["bk", "peak reserved ×nondp"] == "n/a"
    assert float(shown.loc["bk", "peak tensor ×nondp"]) == by_method.loc["bk", "peak tensor ×nondp"]
    cpu.loc[cpu["method"] == "nondp", "status"] = "oom"
    oom_base = overhead_table(cpu)
    assert set(oom_base["nondp status"]) == {"oom"} and oom_base["peak tensor ×nondp"].isna().all()
    assert overhead_display(oom_base).set_index("method").loc["bk", "peak tensor ×nondp"] == "nondp OOM"
    no_base = overhead_table(cpu[cpu["method"] != "nondp"])
    assert set(no_base["nondp status"]) == {"missing"}
    assert overhead_display(no_base).set_index("method").loc["bk", "median step ×nondp"] == "no nondp"
    time_texts = ["step time noise", "time vs noise", "time ratio of", "time unreliable because"]  # empty: no ratio
    assert not (overhead_display(table) == "").drop(columns=time_texts).any().any()


def _timed(method: str, median: float, iqr: float | None, rounds: int = 5, threads: int = 2) -> dict:
    return {
        "machine": "m",
        "device": "cpu",
        "workload": "w",
        "batch_size": 4,
        "precision": "fp32",
        "checkpointing": "none",
        "method": method,
        "status": "ok",
        "peak_tensor_bytes": 100.0,
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        "time_median_s": median,
        "time_iqr_s": iqr,
        "rounds": rounds,
        "torch_threads": threads,
    }


@pytest.mark.parametrize(
    ("dp", "base", "verdict"),
    [
        # |1.20 − 1| = 0.20 > √(0.05² + 0.05²) = 0.071: the overhead is real
        (_timed("bk", 1.20, 0.06), _timed("nondp", 1.00, 0.05), "beyond noise"),
        # |1.10 − 1| = 0.10 < √(0.22² + 0.05²) = 0.226: cannot tell the two step times apart
        (_timed("bk", 1.10, 0.242), _timed("nondp", 1.00, 0.05), "within noise"),
        # the "0.09×" of a 3-round tiny case whose non-DP rounds spread over 2× their median
        (_timed("bk", 0.09, 0.001, rounds=3), _timed("nondp", 1.0, 2.0, rounds=3), "within noise"),
        (_timed("bk", 1.50, 0.01, rounds=2), _timed("nondp", 1.00, 0.01), "noise unknown"),
        (_timed("bk", 1.50, None), _timed("nondp", 1.00, 0.01), "noise unknown"),
        (_timed("bk", 1.50, 0.01, threads=8), _timed("nondp", 1.00, 0.01, threads=2), "threads differ"),
    ],
)
def test_time_ratio_is_trusted_only_beyond_its_noise(dp, base, verdict):
    row = overhead_table(pd.DataFrame([base, dp])).iloc[0]
    assert row["time vs noise"] == verdict
    assert row["median step ×nondp"] == pytest.approx(round(dp["time_median_s"] / base["time_median_s"], 3))
    if verdict in ("beyond noise", "within noise"):
        expected = math.hypot(dp["time_iqr_s"] / dp["time_median_s"], base["time_iqr_s"] / base["time_median_s"])
        assert row["step time noise"] == pytest.approx(expected, abs=1e-4)
    shown = overhead_display(overhead_table(pd.DataFrame([base, dp]))).iloc[0]
    assert shown["time vs noise"] == verdict


def test_synthetic_run_time_ratios_carry_their_noise(two_gpu):
    _, results = two_gpu
    ok = results.overhead[results.overhead["status"] == "ok"]
    assert (ok["time vs noise"] == "beyond noise").all()
    assert ok["step time noise"].to_numpy() == pytest.approx(math.hypot(RELATIVE_IQR, RELATIVE_IQR), abs=1e-4)
    assert results.overhead[results.overhead["status"] != "ok"]["time vs noise"].isna().all()


def test_affine_fit_recovers_the_memory_model(two_gpu):
    _, results = two_gpu
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
    assert not hooks["max batch is lower bound"]
    bk = fits.loc[("a100", "dit-s-2-cond", "bk")]
    assert bk["measured max batch"] == 64 and bk["max batch is lower bound"]  # no larger batch failed
    assert pd.isna(bk["first failing batch"])
    for column in ("points", "measured max batch", "first failing batch", "predicted max batch"):
        assert str(fits[column].dtype) == "Int64", column
    shown = fit_display(fits.reset_index()).set_index(["machine", "workload", "method"])
    assert shown.loc[("a100", "dit-s-2-cond", "bk"), "measured max batch"] == "≥64"
    assert shown.loc[("a100", "dit-s-2-cond", "bk"), "first failing batch"] == "none"
    assert shown.loc[("a100", "dit-s-2-cond", "opacus-hooks"), "measured max batch"] == "32"


def test_max_batch_records_take_precedence_over_the_case_fit(tmp_path, two_gpu):
    files, _ = two_gpu
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
    results = load_results([*files, path])
    assert len(results.max_batches) == 1
    fits = affine_fit_table(results.cases, results.max_batches).set_index(["machine", "workload", "method"])
    row = fits.loc[("a100", "dit-s-2-cond", "bk")]
    assert (row["source"], row["measured max batch"], row["predicted max batch"]) == ("max-batch search", 600, 619)
    assert not row["max batch is lower bound"] and pd.isna(row["points"])
    assert fits.loc[("h100", "dit-s-2-cond", "bk"), "source"] == "fit to cases"
    shown = fit_display(fits.reset_index()).set_index(["machine", "workload", "method"])
    assert shown.loc[("a100", "dit-s-2-cond", "bk"), "points"] == ""


def test_a_paired_ratio_is_the_time_ratio_with_its_own_spread():
    """The DP case's rounds each over the non-DP rounds either side: 1.5×, though its median is 20× the nondp
    case's (timed under another load); the noise is the per-round ratios' IQR / median."""
    paired = {"paired_time_ratio": 1.5, "paired_time_ratio_iqr": 0.03, "round_times_s": [20.0] * 5}
    dp = {**_timed("bk", 20.0, 0.1), **paired, "time_reliable": True, "time_unreliable_reason": ""}
    row = overhead_table(pd.DataFrame([_timed("nondp", 1.0, 0.9), dp])).iloc[0]
    assert row["median step ×nondp"] == 1.5 and row["time ratio of"] == "paired rounds"
    assert row["step time noise"] == pytest.approx(0.02) and row["time vs noise"] == "beyond noise"
    few = {**dp, "round_times_s": [20.0] * 2}
    assert overhead_table(pd.DataFrame([_timed("nondp", 1.0, 0.9), few])).iloc[0]["time vs noise"] == "noise unknown"


@pytest.mark.parametrize("side", ["bk", "nondp"])
def test_an_unpaired_ratio_is_unreliable_when_either_case_is(side):
    cases = {
        m: {**_timed(m, median, 0.01), "time_reliable": True, "time_unreliable_reason": ""}
        for m, median in (("bk", 1.5), ("nondp", 1.0))
    }
    cases[side] |= {"time_reliable": False, "time_unreliable_reason": "load average 5.0 above the 2 CPUs available"}
    row = overhead_table(pd.DataFrame(cases.values())).iloc[0]
    assert row["time vs noise"] == "unreliable" and row["time ratio of"] == "case medians"
    who = "this case" if side == "bk" else "nondp"
    assert row["time unreliable because"] == f"{who}: load average 5.0 above the 2 CPUs available"
    assert overhead_warnings(overhead_table(pd.DataFrame(cases.values())))[0].startswith("1 time ratio(s) are marked")
