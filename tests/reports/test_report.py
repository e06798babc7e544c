"""The rendered report (``python -m reports``): files, self-contained HTML, summary sentences, escaping."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path

import pytest

from bench.record import CaseRecord
from reports.__main__ import main
from reports.figures import FIGURES, FigureResult
from reports.html import ReportContent, ReportTable, write_html, write_markdown
from reports.load import load_results
from reports.summary import summary_lines
from reports.tables import OVERHEAD_NOTES, overhead_display, overhead_warnings, to_markdown, write_table
from tests.reports.fakes import make_ranked_case, make_run, write_jsonl, write_two_gpu_files
from tests.reports.test_load import write_bad

SKIPPED_INPUTS = ("empty.json", "truncated.json", "foreign.json")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[Path], tuple[Path, Path]]:
    """One full render (every figure) of the two-GPU run, with three bad files skipped by --skip-bad."""
    folder = tmp_path_factory.mktemp("rendered")
    files = write_two_gpu_files(folder)
    ranked = [make_ranked_case(m, w, "ddp", mib / w) for m, mib in (("nondp", 2000), ("bk", 2100)) for w in (2, 4)]
    files = (*files, write_jsonl(folder / "ranks.jsonl", ranked))  # cases on many ranks: the per-rank figure
    bad = [write_bad(folder, name) for name in SKIPPED_INPUTS]
    out = folder / "report"
    assert main([*map(str, bad), *map(str, files), "--skip-bad", "--out", str(out)]) == 0
    return out, bad, files


def test_render_writes_every_figure_table_and_a_self_contained_report(rendered):
    out, _, _ = rendered
    for name in FIGURES:
        for suffix in (".png", ".svg"):
            path = out / "figures" / f"{name}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
    for name in ("overhead.md", "overhead.csv", "memory_fit.md", "memory_fit.csv", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    assert "<table>" in page and "Figures not produced" not in page
    md = (out / "report.md").read_text()
    assert "bk costs 1.02× non-DP memory" in md  # A100, dit-s-2-cond, batch 32 (largest batch where all are ok)
    assert "bk costs 1.02× non-DP memory and 1.18× its step time" in md  # 2 % IQR per side: beyond noise
    assert "opacus-hooks runs out of memory above batch 32 on dit-s-2-cond" in md
    assert "NVIDIA H100 80GB HBM3 (h100)" in md
    assert "| step time noise | time vs noise |" in md and "| ±2.8% | beyond noise |" in md


def test_skip_bad_lists_what_it_skipped(rendered):
    out, bad, _ = rendered
    report = (out / "report.md").read_text()
    assert all(str(p) in report for p in bad)


def test_csv_tables_hold_numbers_with_status_columns(rendered):
    out, _, _ = rendered
    rows = list(csv.DictReader((out / "overhead.csv").open()))
    oom = [r for r in rows if r["status"] == "oom"]
    assert oom and all(r["peak tensor ×nondp"] == "" and r["nondp status"] == "ok" for r in oom)
    assert all(float(r["peak tensor ×nondp"]) > 0 for r in rows if r["status"] == "ok")
    fits = list(csv.DictReader((out / "memory_fit.csv").open()))
    bound = next(r for r in fits if (r["machine"], r["workload"], r["method"]) == ("a100", "dit-s-2-cond", "bk"))
    assert (bound["measured max batch"], bound["max batch is lower bound"]) == ("64", "True")
    assert "≥64" in (out / "memory_fit.md").read_text()


def _run_with_time_spread(base_iqr: float) -> list[CaseRecord]:
    records = [r for r in make_run("a100") if r.workload == "dit-s-2-cond" and r.batch_size == 32]
    for r in records:
        if r.method == "nondp":
            r.timing.time_iqr_s = base_iqr * r.timing.time_median_s
    return records


def test_summary_states_a_time_ratio_only_beyond_its_noise(tmp_path):
    noisy = load_results([write_jsonl(tmp_path / "noisy.jsonl", _run_with_time_spread(base_iqr=0.9))])
    line = next(s for s in summary_lines(noisy) if "costs" in s)
    assert "bk costs 1.02× non-DP memory, its step time within noise of non-DP's (±90%)" in line
    assert "× its step time" not in line
    steady = load_results([write_jsonl(tmp_path / "steady.jsonl", _run_with_time_spread(base_iqr=0.02))])
    assert "bk costs 1.02× non-DP memory and 1.18× its step time" in summary_lines(steady)[0]
    records = _run_with_time_spread(base_iqr=0.02)
    for r in records:
        r.timing.rounds = 2
    few = load_results([write_jsonl(tmp_path / "few.jsonl", records)])
    assert "its step time noise unknown (fewer than 3 timed rounds, or no IQR)" in summary_lines(few)[0]


def test_different_thread_counts_in_one_ratio_are_a_report_warning(tmp_path):
    records = _run_with_time_spread(base_iqr=0.02)
    next(r for r in records if r.method == "bk").timing.torch_threads = 1
    results = load_results([write_jsonl(tmp_path / "mixed.jsonl", records)])
    assert "bk costs 1.02× non-DP memory, its step time not comparable" in summary_lines(results)[0]
    out = tmp_path / "r"
    content = ReportContent("t", results.sources, summary_lines(results), [], [], [])
    content.warnings += overhead_warnings(results.overhead)
    assert "1 time ratio(s) divide step times timed with different torch CPU thread counts" in (
        write_markdown(content, _mkdir(out)).read_text()
    )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


HOSTILE = "<script>x</script><!--"


def test_result_names_cannot_inject_markup_into_report_md_or_html(tmp_path):
    records = [r for r in make_run("a100") if r.workload == "dit-s-2-cond" and r.batch_size in (8, 64)]
    for r in records:
        r.workload = f"dit-{HOSTILE}"
        if r.method == "opacus-ghost":
            r.status, r.reason = "unsupported", f"refused {HOSTILE}\nsecond line"
            r.timing.time_median_s = None
    source = write_jsonl(tmp_path / f"run{HOSTILE.replace('/', '_')}.jsonl", records)
    results = load_results([source])
    assert results.cases["workload"].eq(f"dit-{HOSTILE}").all()
    tables = [ReportTable("DP overhead", "notes", results.overhead, overhead_display(results.overhead), "overhead")]
    figures = [
        FigureResult("breakdown", "Breakdown", skipped=f"workload {HOSTILE!r} is not in the results"),
        FigureResult("timeline", "Timeline", [tmp_path / "t.png"], caption=f"traces of {HOSTILE}"),
    ]
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n")
    content = ReportContent(
        f"title {HOSTILE}", results.sources, summary_lines(results), tables, figures, [f"warned {HOSTILE}"]
    )
    out = _mkdir(tmp_path / "out")
    md = write_markdown(content, out).read_text()
    page = write_html(content, out).read_text()
    assert HOSTILE in "".join(summary_lines(results))  # the raw name reaches the report's text...
    for text in (md, page):  # ...and is written escaped: no tag, no comment opener
        assert "<script" not in text and "<!--" not in text
    assert md.count("&lt;script&gt;x&lt;/script&gt;&lt;!--") >= 5  # summary, table, caption, skip reason, warning
    assert page.count(html.escape(HOSTILE)) >= 5
    assert "<" not in to_markdown(overhead_display(results.overhead))


def test_render_out_that_cannot_be_written_is_exit_2_one_line(tmp_path, capsys):
    records = [r for r in make_run("a100") if r.workload == "dit-s-2-cond" and r.batch_size == 8]
    source = write_jsonl(tmp_path / "r.jsonl", records)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "report"):  # a file where the folder should be; a folder under a file
        assert main([str(source), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "--out" in err and str(out) in err


def test_hostile_workload_reaches_csv_unchanged(tmp_path):
    """Escaping is for Markdown and HTML only; the CSV keeps the name as it was measured."""
    records = [r for r in make_run("h100") if r.workload == "dit-s-2-cond" and r.batch_size == 8]
    for r in records:
        r.workload = HOSTILE
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    md, csv_path = write_table(results.overhead, overhead_display(results.overhead), tmp_path, "o", OVERHEAD_NOTES)
    assert {r["workload"] for r in csv.DictReader(csv_path.open())} == {HOSTILE}
    assert "<!--" not in md.read_text() and "&lt;!--" in md.read_text()
