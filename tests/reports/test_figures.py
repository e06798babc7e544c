"""Figures: produced only from data that exist (else skipped with the reason), and driven by the chosen case."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

import reports.__main__ as cli
from reports.figures import FigureOptions, SkipFigure, fig_breakdown, fig_timeline
from reports.load import load_results
from tests.reports.fakes import make_run, write_jsonl, write_two_gpu_files


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
