"""Figures: produced only from data that exist (else skipped with the reason), and driven by the chosen case."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

import reports.__main__ as cli
from reports.figures import (
    DPI,
    FIGURES,
    PAGE_WIDTH_IN,
    FigureOptions,
    SkipFigure,
    fig_breakdown,
    fig_peak_vs_batch,
    fig_proxy_validity,
    fig_timeline,
)
from reports.load import load_results
from tests.reports.fakes import copy_record, make_run, write_jsonl, write_two_gpu_files


def test_figures_without_data_are_skipped_with_the_reason(tmp_path):
    only_dit = [r for r in make_run("a100") if r.workload == "dit-s-2-cond"]
    for r in only_dit:
        r.memory.breakdown = {}
    path = write_jsonl(tmp_path / "dit.jsonl", only_dit)
    out = tmp_path / "r"
    assert cli.main([str(path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    skipped = md.split("## Figures not produced", 1)[1]
    assert "GPU comparison: results come from one machine only (a100)" in skipped
    assert "Proxy validity (GPT vs DiT): the data lack the GPT proxy family" in skipped
    assert "Breakdown at the peak: no breakdown at peak recorded" in skipped
    assert not (out / "figures" / "gpu_comparison.png").exists()
    assert (out / "figures" / "peak_vs_batch.png").stat().st_size > 0


def test_chosen_workload_and_batch_drive_breakdown_and_timeline(tmp_path, monkeypatch):
    files = write_two_gpu_files(tmp_path)
    results = load_results(files)
    options = FigureOptions(workload="gpt-proxy-256", batch_size=8)
    fig, caption = fig_breakdown(results, options)
    plt.close(fig)
    assert "gpt-proxy-256, batch 8" in caption
    fig, _ = fig_timeline(results, options)
    plt.close(fig)
    assert "gpt-proxy-256, batch 8" in fig.get_suptitle()
    with pytest.raises(SkipFigure, match="workload 'nope' is not in the results"):
        fig_breakdown(results, FigureOptions(workload="nope"))
    # the CLI passes --workload / --batch-size to the figures (captured instead of drawing every figure again)
    seen = []
    monkeypatch.setattr(cli, "render_figures", lambda results, out_dir, options: seen.append(options) or [])
    out = tmp_path / "r"
    assert cli.main([*map(str, files), "--out", str(out), "--workload", "gpt-proxy-256", "--batch-size", "8"]) == 0
    assert seen == [options]


# ---------------------------------------------------------------------------------------------------------------
# What a reader sees: bounded legends inside the figure, page-sized figures, visible overlapping lines, one time
# axis, captions that say only what is drawn
# ---------------------------------------------------------------------------------------------------------------
MODES = [("fp32", "none"), ("fp32", "blocks"), ("amp-bf16", "none"), ("amp-bf16", "blocks")]


def _in_modes(records, modes=MODES):
    """Copies of ``records`` in every training mode of ``modes`` (the cpu-smoke preset has four)."""
    out = []
    for precision, checkpointing in modes:
        for record in records:
            copy = copy_record(record)
            copy.precision, copy.checkpointing = precision, checkpointing
            out.append(copy)
    return out


def _with_bk_tiled(records):
    """The records plus a "bk-tiled" copy of every bk case: the same bytes, as bk-tiled measures on the tiny DiT."""
    tiled = [copy_record(r) for r in records if r.method == "bk"]
    for r in tiled:
        r.method = "bk-tiled"
    return records + tiled


def _results(tmp_path, records):
    return load_results([write_jsonl(tmp_path / "run.jsonl", records)])


def _pixels(fig) -> tuple[float, float]:
    width, height = fig.get_size_inches()
    return width * DPI, height * DPI


def test_proxy_legend_has_one_entry_per_method_and_shape_and_stays_out_of_the_panels(tmp_path):
    results = _results(tmp_path, _with_bk_tiled(_in_modes(make_run("a100") + make_run("h100"))))
    fig, caption = fig_proxy_validity(results, FigureOptions())
    try:
        fig.canvas.draw()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
        (legend,) = legends
        labels = [t.get_text() for t in legend.get_texts()]
        methods, wheres = 4, 2 * len(MODES)  # bk, bk-tiled, opacus-ghost, opacus-hooks; 2 GPUs × 4 modes
        assert len(labels) <= methods + wheres + 1  # not one per method × machine · mode (32 here)
        box = legend.get_window_extent()
        figure_box = fig.bbox
        assert box.x0 >= figure_box.x0 and box.x1 <= figure_box.x1 and box.y0 >= figure_box.y0
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
        assert "colour = method" in caption
        # bk-tiled's points lie exactly on bk's: drawn hollow around them and named in the panel
        assert "bk-tiled = bk" in "\n".join(t.get_text() for t in fig.axes[0].texts)
    finally:
        plt.close(fig)


def test_every_figure_fits_the_report_page(tmp_path):
    results = _results(tmp_path, _with_bk_tiled(_in_modes(make_run("a100") + make_run("h100"), MODES[:2])))
    for name, (_title, function) in FIGURES.items():
        try:
            fig, _ = function(results, FigureOptions())
        except SkipFigure:
            continue
        try:
            width, _ = _pixels(fig)
            assert width <= PAGE_WIDTH_IN * DPI, f"{name} is {width:.0f} px wide"
        finally:
            plt.close(fig)


def test_peak_vs_batch_keeps_coinciding_lines_visible_in_the_tables_order(tmp_path):
    results = _results(tmp_path, _with_bk_tiled(_in_modes(make_run("h100"), MODES[::-1])))
    fig, caption = fig_peak_vs_batch(results, FigureOptions())
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        titles = [ax.get_title() for ax in panels]
        # the tables' order: fp32 before amp-bf16, no checkpointing before blocks; DiT before the GPT proxy
        assert titles[0] == "dit-s-2-cond\nh100 · cuda:0"
        assert titles[1] == "gpt-proxy-256\nh100 · cuda:0"
        assert titles[2].endswith("h100 · cuda:0 · fp32+blocks")
        assert titles[-1].endswith("h100 · cuda:0 · amp-bf16+blocks")
        for ax in panels:
            lines = {line.get_label(): line for line in ax.get_lines()}
            bk, tiled = lines["bk"], lines["bk-tiled"]
            assert list(bk.get_ydata()) == list(tiled.get_ydata())  # the same bytes...
            assert (bk.get_marker(), bk.get_linestyle()) != (tiled.get_marker(), tiled.get_linestyle())
            assert tiled.get_markerfacecolor() == "none"  # ...drawn hollow over bk, and said so in the panel
            assert "bk-tiled = bk" in "\n".join(t.get_text() for t in ax.texts).splitlines()
        assert "OOM" not in caption  # no case ran out of memory on the H100
    finally:
        plt.close(fig)
    fig, caption = fig_peak_vs_batch(_results(tmp_path, make_run("a100")), FigureOptions())
    plt.close(fig)
    assert "× = OOM" in caption  # opacus-hooks runs out of memory at batch 64 on the A100


def test_timeline_shares_its_time_axis_and_does_not_magnify_a_few_kib(tmp_path):
    records = [r for r in make_run("a100") if r.workload == "dit-s-2-cond" and r.batch_size == 8]
    for record in records:
        timeline = record.memory.timeline
        timeline.nvml_used_bytes = []
        timeline.rss_bytes = [3 * 2**30 + (4096 if i > 10 else 0) for i in range(len(timeline.t_s))]
    fig, _ = fig_timeline(_results(tmp_path, records), FigureOptions())
    try:
        panels = [ax for ax in fig.axes if ax.get_ylabel().startswith("step memory")]
        assert len(panels) == len(records)
        assert all(panels[0].get_shared_x_axes().joined(panels[0], ax) for ax in panels[1:])
        for line in (line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "process RSS"):
            low, high = line.axes.get_ylim()
            drawn = max(line.get_ydata()) - min(line.get_ydata())
            assert drawn / (high - low) < 0.01  # 4 KiB against a step of hundreds of MiB: flat, not a step
    finally:
        plt.close(fig)
