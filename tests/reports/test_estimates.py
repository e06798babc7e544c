"""Estimated step times of predicted records (reports/estimates.py) in `reports paper --value time` and in the
report's predicted blocks, and the first screen's JAX columns with what their peak counts.

The predicted records are real meta cases of dit-tiny-cond (exact work counts, no stored estimate); the JAX
record is a fake with a real jax-vmap record's fields (compiling a JAX step takes ~30 s on 2 cores)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.plan.gpus import get_gpu
from bench.plan.timemodel import estimate, gpu_roofline
from bench.results.record import StepWork, TimeEstimate
from reports.__main__ import report_content
from reports.estimates import NO_WORK, milliseconds_text, step_estimate
from reports.grid import table_markdown
from reports.html import write_html
from reports.load import is_predicted, load_results
from reports.paper import PaperTableError, paper_table
from reports.pivots import time_pivot
from reports.summary import PEAK_KINDS_NOTE, blocks, matrix_grid, overview, ranked_grid, ranked_summary

from .fakes import make_case, make_jax_case, run_cli, write_jsonl

WORKLOAD = "dit-tiny-cond"
UNCALIBRATED_H100 = "estimated, uncalibrated, h100-80gb datasheet peaks × default efficiencies; no fusion"


def _config() -> BenchConfig:
    return BenchConfig.from_fields(
        preset="test", workloads=(), methods=(), batch_sizes=(), devices=(), rounds=1, privacy=dp.resolve_privacy(1.0)
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Real records: meta nondp and bk at batch 2 and 4 (work counts, no stored estimate), CPU nondp and bk at 4."""
    config = _config()
    meta = [run_case(CaseSpec(WORKLOAD, m, b, "meta"), config, None) for m in ("nondp", "bk") for b in (2, 4)]
    cpu = [run_case(CaseSpec(WORKLOAD, m, 4, "cpu"), config, None) for m in ("nondp", "bk")]
    assert all(r.status == "ok" and r.work.op_count for r in meta + cpu), [r.reason for r in meta + cpu]
    folder = tmp_path_factory.mktemp("estimates")
    return {"meta": meta, "cpu": cpu, "folder": folder, "meta_path": write_jsonl(folder / "meta.jsonl", meta)}


def _cells(grid) -> dict[tuple[str, str], str]:
    return {(row[0].text.strip("`"), title): cell.text for row in grid.rows for title, cell in zip(grid.header, row)}


def _seconds(record, gpu: str = "h100-80gb") -> float:
    """The roofline's step time, computed here from the time model itself."""
    return estimate(record.work, gpu_roofline(get_gpu(gpu))).seconds


def _of(records, method, batch):
    (record,) = [r for r in records if r.method == method and r.batch_size == batch]
    return record


def test_value_time_writes_estimated_ms_and_the_ratio_to_nondps_estimate(real):
    results = load_results([real["meta_path"]])
    grid = paper_table(results, "batch", [WORKLOAD], "fp32", None, "time")
    cells = _cells(grid)
    for batch in (2, 4):
        nondp, bk = (_seconds(_of(real["meta"], m, batch)) for m in ("nondp", "bk"))
        assert cells["nondp", f"B = {batch}"] == milliseconds_text(nondp)
        assert cells["bk", f"B = {batch}"] == f"{milliseconds_text(bk)} ({bk / nondp:.2f}×)"
        assert bk > nondp  # Book-Keeping's Gram products and clipping are extra work
    assert UNCALIBRATED_H100 in grid.caption and UNCALIBRATED_H100 in grid.legend
    assert grid.legend in "\n".join(table_markdown(grid))  # what the README copies says what the figures are
    assert all("pred" in cell.style for row in grid.rows for cell in row[1:])


def test_value_time_for_another_gpu_and_a_stored_estimate(real, tmp_path):
    results = load_results([real["meta_path"]])
    a100 = _cells(paper_table(results, "batch", [WORKLOAD], "fp32", None, "time", "a100-80gb"))
    nondp = _of(real["meta"], "nondp", 4)
    assert a100["nondp", "B = 4"] == milliseconds_text(_seconds(nondp, "a100-80gb"))
    assert _seconds(nondp, "a100-80gb") > _seconds(nondp)  # the A100's peaks are below the H100's
    # a stored estimate for the GPU asked is the figure; for another GPU the work counts are
    stored = dataclasses.replace(nondp, estimate=TimeEstimate(0.5, "h100-80gb", False, "h100-80gb datasheet"))
    assert step_estimate(stored).seconds == 0.5 == step_estimate(stored, "h100-80gb").seconds
    assert step_estimate(stored, "a100-80gb").seconds == pytest.approx(_seconds(nondp, "a100-80gb"))
    path = write_jsonl(tmp_path / "stored.jsonl", [stored, *[r for r in real["meta"] if r is not nondp]])
    cells = _cells(paper_table(load_results([path]), "batch", [WORKLOAD], "fp32", None, "time"))
    assert cells["nondp", "B = 4"] == "500"
    bk = _seconds(_of(real["meta"], "bk", 4))
    assert cells["bk", "B = 4"] == f"{milliseconds_text(bk)} ({bk / 0.5:.2f}×)"


def test_a_record_without_work_counts_says_so_and_a_gpu_without_peaks_too(real, tmp_path):
    # a record older than the counter: no work counts, no stored estimate
    old = dataclasses.replace(_of(real["meta"], "bk", 4), work=StepWork(), estimate=TimeEstimate())
    assert step_estimate(old).seconds is None and step_estimate(old).reason == NO_WORK
    path = write_jsonl(tmp_path / "old.jsonl", [old, _of(real["meta"], "nondp", 4)])
    results = load_results([path])
    cells = _cells(paper_table(results, "batch", [WORKLOAD], "fp32", None, "time"))
    assert cells["bk", "B = 4"] == NO_WORK
    no_peaks = step_estimate(_of(real["meta"], "nondp", 4), "rtx4090-24gb")
    assert no_peaks.seconds is None and "no peak figures for this GPU" in no_peaks.reason
    # older files load: the work and estimate columns are there, NaN
    frame = results.cases.set_index("method")
    assert frame["flops"].isna()["bk"] and frame["flops"]["nondp"] == _of(real["meta"], "nondp", 4).work.flops
    assert frame[["estimated_step_s", "bytes_accessed", "op_count"]].isna().loc["bk"].all()


def test_value_time_refuses_measured_results_and_budget_tables(real, tmp_path):
    cpu = write_jsonl(tmp_path / "cpu.jsonl", real["cpu"])
    with pytest.raises(PaperTableError, match="measured, not predicted"):
        paper_table(load_results([cpu]), "batch", [WORKLOAD], "fp32", None, "time")
    with pytest.raises(PaperTableError, match="--by budget"):
        paper_table(load_results([real["meta_path"]]), "budget", [WORKLOAD], "fp32", None, "time")
    for args in (
        ["paper", cpu, "--workloads", WORKLOAD, "--value", "time"],
        ["paper", real["meta_path"], "--workloads", WORKLOAD, "--value", "time", "--gpu", "h900"],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unknown GPU 'h900'" in proc.stderr
    ok = run_cli("paper", real["meta_path"], "--workloads", WORKLOAD, "--value", "time", "--gpu", "h200-141gb")
    assert ok.returncode == 0 and "h200-141gb datasheet peaks" in ok.stdout, ok.stderr


def test_predicted_block_shows_estimates_apart_from_measured_times(real, tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [*real["meta"], *real["cpu"]])
    results = load_results([path])
    matrices = {m.block.predicted: m for m in overview(results)}
    predicted, measured = matrix_grid(matrices[True]), matrix_grid(matrices[False])
    (row,) = predicted.rows
    bk = _seconds(_of(real["meta"], "bk", 4)) / _seconds(_of(real["meta"], "nondp", 4))
    assert row[1].sub == f"est. {milliseconds_text(_seconds(_of(real['meta'], 'bk', 4)))} ms (×{bk:.2f})"
    assert row[1].sub_style == "est" and "pred" in row[1].style and "on h100-80gb (uncalibrated)" in row[1].hover
    assert f"est. {milliseconds_text(_seconds(_of(real['meta'], 'nondp', 4)))} ms" in row[0].sub
    assert UNCALIBRATED_H100 in predicted.legend and "nothing was timed" in predicted.legend
    # the measured block's time line is measured, never an estimate; no time pivot for the predicted block
    assert all(not c.sub_style and "est." not in c.sub for r in measured.rows for c in r)
    assert "est." not in measured.legend
    assert [time_pivot(b, rows, results.overhead) for b, rows in blocks(results) if b.predicted] == [None]
    html = write_html(report_content(results, [], "t"), tmp_path).read_text()
    assert "<small class='est'>est. " in html and "small.est{" in html


def test_predicted_legend_says_why_when_no_record_has_work_counts(real, tmp_path):
    old = [dataclasses.replace(r, work=StepWork(), estimate=TimeEstimate()) for r in real["meta"]]
    grid = matrix_grid(overview(load_results([write_jsonl(tmp_path / "old.jsonl", old)]))[0])
    assert f"No step-time estimate ({NO_WORK})" in grid.legend
    assert all(not c.sub for r in grid.rows for c in r[1:])


def test_jax_columns_come_last_with_what_their_peak_counts(real, tmp_path):
    nondp = _of(real["cpu"], "nondp", 4)
    xla = 8_438_448
    jax = [
        make_jax_case("jax-vmap", 4, peak_tensor_bytes=xla, paired_time_ratio=0.5),
        make_jax_case("jax-privacy", 4, peak_tensor_bytes=xla - 10**6, paired_time_ratio=0.6),
    ]
    assert not any(is_predicted(r) for r in jax)  # timed, RSS measured: a measured block's cells
    assert is_predicted(dataclasses.replace(jax[0], device="meta"))  # lowered with stand-ins: nothing ran
    results = load_results([write_jsonl(tmp_path / "jax.jsonl", [*real["cpu"], *jax])])
    (matrix,) = overview(results)
    assert matrix.methods == ("bk", "jax-privacy", "jax-vmap")  # the torch methods, then the JAX ones
    grid = matrix_grid(matrix)
    assert PEAK_KINDS_NOTE.format(jax="jax-privacy, jax-vmap") in grid.legend
    assert "temp + arguments + outputs − aliases" in grid.legend and "live tensor bytes (tracker)" in grid.legend
    (row,) = grid.rows
    vmap = row[grid.header.index("jax-vmap")]
    assert vmap.text == f"{xla / nondp.memory.peak_tensor_bytes:.2f}×"
    assert "XLA compiled buffer assignment" in vmap.hover
    assert "XLA" not in row[grid.header.index("bk")].hover
    ranked = ranked_grid(matrix.block, ranked_summary(results, matrix))
    lowest = ranked.rows[0][ranked.header.index("lowest memory (×nondp)")].text
    assert lowest.startswith("bk ") and "jax-privacy" in lowest and lowest.count("(XLA)") == 2
    # without JAX records, no note
    alone = matrix_grid(overview(load_results([write_jsonl(tmp_path / "torch.jsonl", real["cpu"])]))[0])
    assert "XLA" not in alone.legend


def test_the_report_writes_each_distinct_legend_once(real, tmp_path):
    """The first matrix's legend once (not repeated per block), a predicted block's own (its estimates) too."""
    cuda = [make_case("dit-s-2-cond", m, 16, "a100") for m in ("nondp", "bk")]
    path = write_jsonl(tmp_path / "mixed.jsonl", [*cuda, *real["meta"]])
    content = report_content(load_results([path]), [], "t")
    legends = [g.legend for g in content.sections[0].grids if g.kind == "matrix"]
    assert len(legends) == 2 and "est." not in legends[0] and UNCALIBRATED_H100 in legends[1]
