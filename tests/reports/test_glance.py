"""The first screen's parts and the rules the redesign added: predicted (meta) rows kept apart from measured ones,
tables fitted to their data, max-batch extrapolations written as bounds and drawn capped."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from reports.__main__ import report_content
from reports.figures import (
    FigureOptions,
    SkipFigure,
    choose_case,
    fig_gpu_comparison,
    fig_max_batch,
    fig_peak_vs_batch,
    fig_timeline,
)
from reports.grid import Cell, Grid, compact, grid_markdown, ratio_colour
from reports.html import write_markdown
from reports.load import is_predicted, load_results
from reports.pivots import fit_grids, time_pivot
from reports.summary import blocks, matrix_grid, overview, ranked_grid, ranked_summary, short_reason
from reports.tables import EXTRAPOLATION_LIMIT, FIT_NOTES, affine_fit_table, fit_display, predicted_max_batch_text
from tests.reports.fakes import GPUS, METHODS, copy_record, make_run, write_jsonl, write_two_gpu_files


def _meta_copy(record):
    """A measured CUDA record as the meta device would predict it: exact tensor bytes only, nothing timed."""
    meta = copy_record(record)
    meta.device, meta.device_name, meta.device_memory_bytes = "meta", None, None
    meta.measurement = "predicted"
    memory = meta.memory
    memory.peak_allocated_bytes = memory.peak_reserved_bytes = None
    memory.nvml_peak_used_bytes = memory.nvml_baseline_bytes = memory.nvml_peak_minus_baseline_bytes = None
    memory.timeline.t_s, memory.timeline.allocated_bytes, memory.timeline.nvml_used_bytes = [], [], []
    meta.timing = type(meta.timing)()
    return meta


@pytest.fixture(scope="module")
def with_meta(tmp_path_factory):
    """The A100 run (measured, cuda:0) and the same cases predicted on the meta device, one runner label."""
    measured = make_run("a100")
    folder = tmp_path_factory.mktemp("meta")
    path = write_jsonl(folder / "mixed.jsonl", [*measured, *(_meta_copy(r) for r in measured)])
    return load_results([path]), measured


def test_is_predicted_follows_the_measurement_field_else_the_meta_device(with_meta):
    results, measured = with_meta
    meta_record = _meta_copy(measured[0])
    assert is_predicted(meta_record) and not is_predicted(measured[0])
    assert is_predicted({"device": "meta"}) and not is_predicted({"device": "cpu"})
    # the record's own field decides where a row has it
    assert is_predicted({"device": "cpu", "measurement": "predicted"})
    assert not is_predicted({"device": "meta", "measurement": "measured"})
    by_device = {device: rows.apply(is_predicted, axis=1).all() for device, rows in results.cases.groupby("device")}
    assert by_device == {"cuda:0": False, "meta": True}


def test_predicted_rows_are_their_own_block_never_timed(with_meta):
    results, _ = with_meta
    found = blocks(results)
    assert [(b.device, b.predicted) for b, _ in found] == [("cuda:0", False), ("meta", True)]  # measured first
    measured_block, predicted_block = (b for b, _ in found)
    assert "predicted: exact tensor bytes" in predicted_block.title and "measured" in measured_block.title
    assert predicted_block.metric == "peak_tensor_bytes" and measured_block.metric == "peak_reserved_bytes"
    _, meta_matrix = overview(results)
    grid = matrix_grid(meta_matrix)
    ok_cells = [c for row in grid.rows for c in row[1:] if c.value is not None]
    assert ok_cells and all("pred" in c.style.split() and not c.sub for c in ok_cells)  # no step time
    assert all(" ms" not in row[0].sub for row in grid.rows)
    ranked = ranked_grid(predicted_block, ranked_summary(results, meta_matrix))
    assert "fastest DP step (×nondp)" not in ranked.header
    assert time_pivot(predicted_block, found[1][1], results.overhead) is None
    md = "\n".join(line for g in (grid, ranked) for line in grid_markdown(g))
    assert " · t " not in md


def test_figures_keep_predicted_apart_and_say_so(with_meta, tmp_path):
    results, measured = with_meta
    fig, caption = fig_peak_vs_batch(results, FigureOptions())
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    plt.close(fig)
    assert "dit-s-2-cond\na100 · meta (predicted)" in titles and "dit-s-2-cond\na100 · cuda:0" in titles
    assert "dashed, hollow = predicted" in caption
    chosen = choose_case(results, FigureOptions())  # breakdown / timeline: a measured case first
    assert (chosen.device, chosen.predicted) == ("cuda:0", False)
    only_meta = load_results([write_jsonl(tmp_path / "meta.jsonl", [_meta_copy(r) for r in measured])])
    with pytest.raises(SkipFigure, match="predicted step has no time axis"):
        fig_timeline(only_meta, FigureOptions())
    h100 = [_meta_copy(r) for r in make_run("h100")]
    two_machines = load_results([write_jsonl(tmp_path / "two.jsonl", [*measured, *h100])])
    with pytest.raises(SkipFigure, match="one machine only"):  # h100's rows are all predicted: not compared
        fig_gpu_comparison(two_machines, FigureOptions())


def test_compact_moves_constant_columns_to_the_caption_and_leaves_out_empty_ones():
    rows = [
        [Cell("w1"), Cell("cpu"), Cell("n/a"), Cell("unsupported", style="reason"), Cell("1.5", 1.5)],
        [Cell("w2"), Cell("cpu"), Cell(""), Cell("n/a"), Cell("OOM", style="oom")],
        [Cell("w3"), Cell("cpu"), Cell("n/a"), Cell("n/a"), Cell("2", 2.0)],
    ]
    grid = compact(Grid("t", "c", ["workload", "device", "allocated", "reserved", "peak"], rows), keep=("workload",))
    assert grid.header == ["workload", "peak"] and grid.facts == [("device", "cpu")]
    assert grid.omitted == ["allocated", "reserved"]
    assert [row[1].text for row in grid.rows] == ["1.5", "OOM", "2"]
    caption = grid_markdown(grid)[2]
    assert "device: cpu" in caption and "empty on every row: allocated, reserved" in caption
    one_row = compact(Grid("t", "c", ["workload", "device"], rows[:1]))
    assert one_row.header == ["workload", "device"]  # one row: nothing is "the same on every row"


def test_diverging_colour_is_white_at_one_and_symmetric_on_a_log_scale():
    assert ratio_colour(1.0) == "#ffffff" and ratio_colour(math.nan) is None
    low, high = ratio_colour(0.5), ratio_colour(2.0)
    assert low != high and low.startswith("#") and high.startswith("#")
    assert ratio_colour(8.0) == ratio_colour(4.0)  # saturates at 4×
    # as far from white at 0.5× as at 2× (log scale): the same share of each end colour (blue / red)
    blue_share = (255 - int(low[1:3], 16)) / (255 - 33)
    red_share = (255 - int(high[5:7], 16)) / (255 - 43)
    assert blue_share == pytest.approx(red_share, abs=0.01) and 0 < blue_share < 1
    assert int(low[5:7], 16) > int(low[1:3], 16) and int(high[1:3], 16) > int(high[5:7], 16)  # blue below, red above


def test_short_reason_keeps_the_library_message_only():
    reason = (
        "opacus-ghost: NotImplementedError: Parameter tying is not supported with Ghost Clipping — gpt-tiny "
        "ties lm_head.weight = wte.weight"
    )
    assert short_reason(reason, "opacus-ghost") == "Parameter tying is not supported with Ghost Clipping"
    assert short_reason("x" * 200, "m").endswith("…") and len(short_reason("x" * 200, "m")) == 70


@pytest.mark.parametrize(
    ("predicted", "largest_run", "text"),
    [
        (166692, 16, "> 64 (extrapolated ×10418)"),  # the 3 MiB model's "max batch" on a CPU
        (64, 16, "64"),  # exactly the limit: still a prediction
        (65, 16, "> 64 (extrapolated ×4)"),
        (619, 600, "619"),
        (None, 16, "n/a"),
    ],
)
def test_a_prediction_beyond_the_limit_is_written_as_a_bound(predicted, largest_run, text):
    assert EXTRAPOLATION_LIMIT == 4
    assert predicted_max_batch_text(predicted, largest_run) == text


@pytest.mark.parametrize(
    ("first_failing", "text"),
    [
        (17, "fit ~166692, but batch 17 failed"),
        (64, "fit ~166692, but batch 64 failed"),
        (65, "> 64 (extrapolated ×10418)"),
    ],
)
def test_a_bound_never_contradicts_a_failed_batch(first_failing, text):
    """Issue #17 item 7: "> 64" next to a first failing batch of 17 would claim what the run refuted."""
    assert predicted_max_batch_text(166692, 16, first_failing) == text


def test_the_max_batch_table_explains_the_extrapolation_factor(tmp_path):
    """Issue #17 item 7: the report says what K of "extrapolated ×K" is, beside the table that shows it."""
    grids = fit_grids(load_results(write_two_gpu_files(tmp_path)))
    assert any(c.text.startswith("> 256 (extrapolated ×") for g in grids for row in g.rows for c in row)
    for grid in grids:
        assert "(extrapolated ×K): the fit predicts K times the largest batch run" in grid.caption
        assert "only N = 4 × that batch is claimed" in grid.caption
    assert "K is how many times the measured max batch the fit predicted" in FIT_NOTES


def test_fit_tables_and_figure_never_show_a_bare_extrapolation(tmp_path):
    results = load_results(write_two_gpu_files(tmp_path))
    fits = affine_fit_table(results.cases, results.max_batches)
    shown = fit_display(fits)
    for (_, fit), text in zip(fits.iterrows(), shown["predicted max batch"]):
        beyond = fit["predicted max batch"] > EXTRAPOLATION_LIMIT * fit["measured max batch"]
        assert text.startswith("> ") == beyond, (fit["method"], text)
        assert beyond or text == str(fit["predicted max batch"])
    assert any(text.startswith("> 256 (extrapolated ×") for text in shown["predicted max batch"])
    fig, caption = fig_max_batch(results, FigureOptions())
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    heights = [bar.get_height() for ax in fig.axes for bar in ax.patches]
    plt.close(fig)
    assert "> 256" in labels and "drawn capped there" in caption
    assert max(h for h in heights if not math.isnan(h)) <= EXTRAPOLATION_LIMIT * 64  # never a bar past the cap


def test_max_batch_figure_is_not_drawn_when_it_could_only_show_extrapolations(tmp_path):
    """Every method ran ok at every batch (lower bounds only) and its fit reaches far beyond: nothing to draw."""
    records = [r for r in make_run("h100") if r.batch_size in (8, 16)]
    results = load_results([write_jsonl(tmp_path / "small.jsonl", records)])
    assert results.fits["max batch is lower bound"].all()
    with pytest.raises(SkipFigure, match="every prediction extrapolates beyond 4×"):
        fig_max_batch(results, FigureOptions())


def test_markdown_report_has_the_same_structure_as_the_html(with_meta, tmp_path):
    results, _ = with_meta
    md = write_markdown(report_content(results, [], "t"), tmp_path).read_text()
    order = [
        "## At a glance",
        "### a100 · cuda:0 (NVIDIA A100-SXM4-40GB) — measured",
        "### Ranked per workload — a100 · cuda:0",
        "### a100 · meta — predicted: exact tensor bytes",
        "## Peak memory",
        "## Step time",
        "## Max batch: what fits",
        "## Definitions and full tables",
    ]
    positions = [md.index(heading) for heading in order]
    assert positions == sorted(positions)
    assert pd.Series(positions).is_unique


def test_ranked_largest_batch_tells_measured_predicted_and_extrapolated_apart(tmp_path):
    """A100 (40 GiB): opacus-hooks ran at 32 and failed at 64 — measured 32. H100 (80 GiB): nothing failed; the fit
    of peak reserved (1.10 × the fakes' fixed + per_sample · B) predicts ~N within 4× batch 64, and beyond it only
    "> 256"."""
    results = load_results(write_two_gpu_files(tmp_path))
    rows = {}
    for matrix in overview(results):
        grid = ranked_grid(matrix.block, ranked_summary(results, matrix))
        column = grid.header.index(next(h for h in grid.header if h.startswith("largest batch in")))
        rows[matrix.block.machine] = {row[0].text: row[column] for row in grid.rows}
    fixed, per_sample, _ = METHODS["opacus-hooks"]
    predicted = int((GPUS["h100"][1] - 1.10 * fixed) // (1.10 * per_sample))
    assert predicted <= EXTRAPOLATION_LIMIT * 64
    a100, h100 = rows["a100"]["dit-s-2-cond"], rows["h100"]["dit-s-2-cond"]
    assert "opacus-hooks 32" in a100.text and "bk > 256" in a100.text
    assert dict(a100.spans)["opacus-hooks 32"] == "" and dict(a100.spans)["bk > 256"] == "extrap"
    assert f"opacus-hooks ~{predicted}" in h100.text and dict(h100.spans)[f"opacus-hooks ~{predicted}"] == "pred"
    assert "the fit predicts" in h100.hover and "an extrapolation beyond 4×" in h100.hover
