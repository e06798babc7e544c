"""Reports of a run mixing trainable modes (``--trainable full,bitfit,lora:r=8``): each mode its own block, row,
fit and panel, and every ratio divided by nondp fine-tuned the same way (never by nondp's full training)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from reports.__main__ import main
from reports.figures import FigureOptions, fig_fixed_vs_per_sample, fig_peak_vs_batch, fig_per_rank_peak
from reports.load import load_results
from reports.paper import PaperTableError, paper_table
from reports.summary import overview
from reports.tables import mode_label, mode_order

from .fakes import BATCHES, GIB, METHODS, copy_record, make_case, make_ranked_case, run_cli, write_jsonl

WORKLOAD = "dit-s-2-cond"
TRAINABLES = ("full", "bitfit", "lora:r=8")
# Per trainable mode, the peak's scale for nondp and for the DP methods: a fine-tuning mode shrinks nondp's peak
# less than the DP methods' (no per-sample state of frozen weights), so its ratios differ from full training's
# and a ratio divided by the wrong nondp shows.
SCALES = {"full": (1.0, 1.0), "bitfit": (0.5, 0.55), "lora:r=8": (0.7, 0.8)}


def _records() -> list:
    records = []
    for trainable, (nondp_scale, dp_scale) in SCALES.items():
        for method in METHODS:
            for batch in BATCHES:
                scale = nondp_scale if method == "nondp" else dp_scale
                record = copy_record(make_case(WORKLOAD, method, batch, "h100", scale=scale))
                record.trainable = trainable
                records.append(record)
    return records


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    records = _records()
    path = write_jsonl(tmp_path_factory.mktemp("mixed") / "mixed.jsonl", records)
    return path, records, load_results([path])


def _peak(records, trainable: str, method: str, batch: int, figure: str = "peak_reserved_bytes") -> float:
    (record,) = [
        r for r in records if (r.trainable, r.method, r.batch_size) == (trainable, method, batch) and r.status == "ok"
    ]
    return getattr(record.memory, figure)


def test_a_mixed_run_renders_each_trainable_mode_as_its_own_block(mixed, tmp_path):
    path, _, _ = mixed
    out = tmp_path / "report"
    assert main([str(path), "--out", str(out)]) == 0  # before: a KeyError in the first screen's matrix
    report = (out / "report.md").read_text()
    titles = ["h100 · cuda:0 (", "cuda:0 · fp32 + bitfit fine-tuning (", "cuda:0 · fp32 + lora:r=8 fine-tuning ("]
    at = [report.index(title) for title in titles]  # full first, then the fine-tuning modes by name
    assert at == sorted(at)
    overhead = (out / "overhead.csv").read_text().splitlines()
    assert "trainable" in overhead[0].split(",")
    assert len(overhead) == 1 + len(TRAINABLES) * (len(METHODS) - 1) * len(BATCHES)  # one row per DP case


def test_each_ratio_divides_by_nondp_in_the_same_trainable_mode(mixed):
    _, records, results = mixed
    matrices = overview(results)
    assert [m.block.trainable for m in matrices] == list(TRAINABLES)
    for matrix in matrices:
        trainable = matrix.block.trainable
        (row,) = matrix.rows
        for method, cell in row.cells.items():
            if cell.status != "ok":
                continue
            peak = _peak(records, trainable, method, row.batch_size)
            assert cell.memory_ratio == round(peak / _peak(records, trainable, "nondp", row.batch_size), 3)
            if trainable != "full":  # the same case over full training's nondp would read otherwise
                assert cell.memory_ratio != round(peak / _peak(records, "full", "nondp", row.batch_size), 3)
    table = results.overhead
    for _, ratio in table[table["status"] == "ok"].iterrows():
        trainable, method, batch = ratio["trainable"], ratio["method"], ratio["batch_size"]
        own = _peak(records, trainable, method, batch, "peak_tensor_bytes")
        base = _peak(records, trainable, "nondp", batch, "peak_tensor_bytes")
        assert ratio["peak tensor ×nondp"] == round(own / base, 3)


def test_fits_and_figures_keep_the_trainable_modes_apart(mixed):
    _, records, results = mixed
    fits = results.fits
    for trainable in TRAINABLES:  # each method's fit over its own mode's batches: its own slope
        fit = fits[(fits["trainable"] == trainable) & (fits["method"] == "bk")]
        assert len(fit) == 1
        slope = (_peak(records, trainable, "bk", 16) - _peak(records, trainable, "bk", 8)) / 8
        assert fit["per_sample_bytes"].iloc[0] == pytest.approx(slope, rel=1e-6)
    fig, _ = fig_peak_vs_batch(results, FigureOptions())
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert titles == [
            f"{WORKLOAD}\nh100 · cuda:0",
            f"{WORKLOAD}\nh100 · cuda:0 · fp32+bitfit",
            f"{WORKLOAD}\nh100 · cuda:0 · fp32+lora:r=8",
        ]
    finally:
        plt.close(fig)
    fig, _ = fig_fixed_vs_per_sample(results, FigureOptions())
    try:
        rows = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("per sample")]
        assert len(rows) == len(TRAINABLES)  # one row of panels per mode, named
        assert any(title.endswith("fp32+lora:r=8") for title in rows)
    finally:
        plt.close(fig)


def test_paper_by_mode_has_a_column_per_trainable_mode_each_over_its_own_nondp(mixed):
    path, records, _ = mixed
    done = run_cli("paper", path, "--workloads", WORKLOAD, "--by", "mode", "--batch-size", "16")
    assert done.returncode == 0, done.stderr
    header, _, *lines = done.stdout.splitlines()
    assert header == "| method | fp32 | fp32+bitfit | fp32+lora:r=8 |"
    (bk,) = [line for line in lines if line.startswith("| `bk` |")]
    cells = bk.strip("|").split("|")[1:]
    for cell, trainable in zip(cells, TRAINABLES):
        peak = _peak(records, trainable, "bk", 16, "peak_tensor_bytes")
        nondp = _peak(records, trainable, "nondp", 16, "peak_tensor_bytes")
        assert cell.strip() == f"{peak / GIB:.1f} ({peak / nondp:.2f}×)"


def test_paper_mode_names_the_trainable_part(mixed):
    _, records, results = mixed
    grid = paper_table(results, "batch", [WORKLOAD], "fp32+lora:r=8", None)
    assert grid.title == f"{WORKLOAD} — fp32+lora:r=8"
    peak = _peak(records, "lora:r=8", "bk", 8, "peak_tensor_bytes")
    nondp = _peak(records, "lora:r=8", "nondp", 8, "peak_tensor_bytes")
    bk = next(row for row in grid.rows if row[0].text == "`bk`")
    assert bk[1].text == f"{peak / GIB:.1f} ({peak / nondp:.2f}×)"
    with pytest.raises(PaperTableError, match=r"mode 'lora:r=8' \(modes: fp32, fp32\+bitfit, fp32\+lora:r=8\)"):
        paper_table(results, "batch", [WORKLOAD], "lora:r=8", None)


def test_modes_are_named_and_ordered_full_first_then_fine_tuning_by_name():
    assert mode_label("fp32", "none", "full") == ""
    assert mode_label("amp-bf16", "blocks", "lora:r=8") == "amp-bf16+blocks+lora:r=8"
    assert mode_label("fp32", "none", "bitfit") == "fp32+bitfit"
    modes = [
        ("fp32", "none", "lora:r=16"),
        ("amp-bf16", "none", "full"),
        ("fp32", "blocks", "lora:r=8"),
        ("fp32", "none", "lora:r=8"),
        ("fp32", "none", "bitfit"),
        ("fp32", "blocks", "full"),
        ("fp32", "none", "full"),
    ]
    assert sorted(modes, key=lambda mode: mode_order(*mode)) == [
        ("fp32", "none", "full"),
        ("fp32", "blocks", "full"),
        ("amp-bf16", "none", "full"),
        ("fp32", "none", "bitfit"),
        ("fp32", "none", "lora:r=8"),
        ("fp32", "blocks", "lora:r=8"),
        ("fp32", "none", "lora:r=16"),  # numbers as numbers: r=8 before r=16
    ]


def test_the_per_rank_figure_draws_each_trainable_mode_in_its_own_panel(tmp_path):
    records = []
    for trainable, per_rank_mib in (("full", 1000), ("lora:r=8", 400)):
        for method, extra in (("nondp", 0), ("bk", 100)):
            record = make_ranked_case(method, 2, "ddp", per_rank_mib + extra)
            record.trainable = trainable
            records.append(record)
    results = load_results([write_jsonl(tmp_path / "ranks.jsonl", records)])
    fig, _ = fig_per_rank_peak(results, FigureOptions())
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == [
            f"{WORKLOAD} — B=16 global — a100 · cuda",
            f"{WORKLOAD} — B=16 global — a100 · cuda · fp32+lora:r=8",
        ]
        for ax in fig.axes[: len(titles)]:  # each method once per panel, not once per mode
            labels = [line.get_label() for line in ax.get_lines()]
            assert sorted(labels) == ["bk ddp", "nondp ddp"]
    finally:
        plt.close(fig)
