"""The reports on cases run on many ranks: keyed by world size and strategy, nodes merged, the per-rank figure."""

from __future__ import annotations

import dataclasses

import matplotlib.pyplot as plt
import pytest

from bench.results.record import RankFigures, StepMemory, combine_rank_records
from reports.compare import compare_results
from reports.figures import FigureOptions, SkipFigure, fig_peak_vs_batch, fig_per_rank_peak
from reports.load import load_results
from tests.reports.fakes import MIB, make_case, make_ranked_case, write_jsonl

BATCH = 16


def _ranked(method: str, world: int, parallel: str, per_rank_mib: float, ranks=None):
    return make_ranked_case(method, world, parallel, per_rank_mib, batch=BATCH, ranks=ranks)


def _one_process(method: str, mib: float):
    record = make_case("dit-s-2-cond", method, BATCH, "a100")
    peak = int(mib * MIB)
    memory = dataclasses.replace(record.memory, peak_tensor_bytes=peak, breakdown={"other": peak})
    return dataclasses.replace(record, device="cuda", memory=memory)


def test_overhead_compares_like_with_like_world_size_and_strategy(tmp_path):
    records = [
        _one_process("nondp", 1000),
        _one_process("bk", 1100),
        _ranked("nondp", 4, "ddp", 400),
        _ranked("bk", 4, "ddp", 500),
        _ranked("nondp", 4, "fsdp", 200),
        _ranked("bk", 4, "fsdp", 300),
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)], warn=lambda message: None)
    assert len(results.cases) == 6  # one row per case key: world size and strategy tell them apart
    ratio = results.overhead.set_index(["world_size", "parallel", "method"])["peak tensor ×nondp"]
    assert ratio[1, "none", "bk"] == 1.1
    assert ratio[4, "ddp", "bk"] == round(503 / 403, 3)  # per-rank peak: the highest rank, rank 3 (+3 MiB)
    assert ratio[4, "fsdp", "bk"] == round(303 / 203, 3)


def test_each_nodes_ranks_are_merged_into_one_case(tmp_path):
    """Two nodes, each with its local ranks of the same case: one row, every rank, the highest peak."""
    node0 = write_jsonl(tmp_path / "node0.jsonl", [_ranked("bk", 4, "fsdp", 300, ranks=[0, 1])])
    node1 = write_jsonl(tmp_path / "node1.jsonl", [_ranked("bk", 4, "fsdp", 300, ranks=[2, 3])])
    warnings = []
    results = load_results([node0, node1], warn=warnings.append)
    assert len(results.cases) == 1 and not warnings
    record = results.cases.iloc[0]["record"]
    assert [r.rank for r in record.ranks] == [0, 1, 2, 3] and record.peak_rank == 3
    assert results.cases.iloc[0]["peak_tensor_bytes"] == 303 * MIB
    assert record.rank_mean["peak_tensor_bytes"] == 301.5 * MIB


def test_compare_gates_each_world_size_and_strategy_on_its_own(tmp_path):
    base = load_results([write_jsonl(tmp_path / "b.jsonl", [_ranked("bk", 4, "ddp", 500)])], warn=print)
    grown = [_ranked("bk", 4, "ddp", 600), _ranked("bk", 8, "ddp", 500)]
    new = load_results([write_jsonl(tmp_path / "n.jsonl", grown)], warn=print)
    comparison = compare_results(base, new, 0.05)
    assert [c.split(":")[0] for c in comparison.failures] == ["dit-s-2-cond/bk/bs16/cuda/ddp4 [a100]"]
    assert comparison.only_new == ["dit-s-2-cond/bk/bs16/cuda/ddp8 [a100]"]


def test_per_rank_peak_figure_is_drawn_from_cases_on_many_ranks(tmp_path):
    records = [_one_process("nondp", 1000), _one_process("bk", 1100)]
    records += [
        _ranked(m, w, p, mib / w) for m, mib in (("nondp", 1600), ("bk", 1800)) for w in (2, 4) for p in ("ddp", "fsdp")
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)], warn=print)
    fig, _ = fig_per_rank_peak(results, FigureOptions())
    try:
        peak_axes, ratio_axes = fig.axes[0], fig.axes[1]
        lines = {line.get_label(): line for line in peak_axes.get_lines()}
        assert set(lines) == {"nondp ddp", "nondp fsdp", "bk ddp", "bk fsdp"}
        # world size 1 (the one-process case) starts every strategy's line; peaks in GiB: the highest rank's
        assert list(lines["bk fsdp"].get_xdata()) == [1, 2, 4]
        assert [y * 1024 for y in lines["bk fsdp"].get_ydata()] == [1100, 1800 / 2 + 1, 1800 / 4 + 3]
        ratios = [list(line.get_ydata()) for line in ratio_axes.get_lines()]
        assert [1.1, round(901 / 801, 3), round(453 / 403, 3)] in ratios  # bk over nondp, same strategy and size
    finally:
        plt.close(fig)
    one_process, _ = fig_peak_vs_batch(results, FigureOptions())  # the one-process figures keep their rows
    plt.close(one_process)
    alone = load_results([write_jsonl(tmp_path / "one.jsonl", records[:2])], warn=print)
    with pytest.raises(SkipFigure, match=r"no case ran ok on many ranks \(--world-sizes above 1\)"):
        fig_per_rank_peak(alone, FigureOptions())


def test_a_rank_without_figures_still_loads(tmp_path):
    failed = _ranked("bk", 3, "ddp", 100, ranks=[0, 1])  # rank 2 reported no figures
    failed = combine_rank_records([failed, dataclasses.replace(failed, ranks=[RankFigures(rank=2, status="error")])])
    failed.memory = StepMemory()
    results = load_results([write_jsonl(tmp_path / "f.jsonl", [failed])], warn=print)
    assert results.cases.iloc[0]["status"] == "error"
