"""The rendered report (``python -m reports``): files, first screen, self-contained HTML, noise rule, escaping."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path

import pytest

from bench.results.record import CaseRecord
from reports.__main__ import main, report_content
from reports.figures import FIGURES, FigureResult
from reports.grid import frame_grid, grid_markdown, write_table
from reports.html import ReportContent, Section, write_html, write_markdown
from reports.load import load_results
from reports.pivots import memory_pivot
from reports.summary import blocks, matrix_grid, overview, ranked_grid, ranked_summary
from reports.tables import OVERHEAD_NOTES, overhead_display, to_markdown
from tests.reports.fakes import METHODS, make_ranked_case, make_run, write_jsonl, write_two_gpu_files
from tests.reports.test_load import write_bad

SKIPPED_INPUTS = ("empty.json", "truncated.json", "foreign.json")
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["'](?!data:|#)|https?://|@import|url\(""")


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


def _memory_ratio(method: str, batch: int) -> float:
    """The fakes' memory model: peak = fixed + per_sample · B (reserved = 1.10 × that on both sides)."""
    fixed, per_sample, _ = METHODS[method]
    base_fixed, base_per_sample, _ = METHODS["nondp"]
    return (fixed + per_sample * batch) / (base_fixed + base_per_sample * batch)


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
    assert not EXTERNAL.search(page)  # nothing outside the file: it works offline
    assert "Figures not produced" not in page
    overhead_md = (out / "overhead.md").read_text()  # the long form, every case, lives in overhead.md
    assert "| step time noise | time vs noise |" in overhead_md and "| ±2.8% | beyond noise |" in overhead_md


def test_first_screen_is_the_matrix_then_the_ranked_summary(rendered):
    """At a glance, per GPU: workloads × methods at the largest batch where nondp ran ok (64), cell = peak reserved
    ×nondp and the step time ratio (2 % IQR per side: beyond noise); the OOM cell names its reason."""
    out, _, _ = rendered
    md = (out / "report.md").read_text()
    glance = md[md.index("## At a glance") : md.index("## Peak memory")]
    assert md.index("## At a glance") < md.index("![")  # the answer before any figure
    a100 = glance[glance.index("### a100 · cuda:0 (NVIDIA A100-SXM4-40GB) — measured") :]
    assert "| workload · batch | bk | opacus-ghost | opacus-hooks |" in a100
    row = next(line for line in a100.splitlines() if line.startswith("| dit-s-2-cond (B=64"))
    assert f"**{_memory_ratio('bk', 64):.2f}× · t 1.18×**" in row  # lowest of the row: bold (outlined in HTML)
    assert f"{_memory_ratio('opacus-ghost', 64):.2f}× · t 1.60×" in row
    assert "| OOM¹ |" in row and "¹ opacus-hooks on dit-s-2-cond at batch 64: OOM: CUDA out of memory" in a100
    ranked = a100[a100.index("### Ranked per workload — a100") :]
    ranked_row = next(line for line in ranked.splitlines() if line.startswith("| dit-s-2-cond (B=64)"))
    assert f"bk {_memory_ratio('bk', 64):.2f}× · opacus-ghost {_memory_ratio('opacus-ghost', 64):.2f}×" in ranked_row
    assert "bk 1.18× · opacus-ghost 1.60×" in ranked_row and "opacus-hooks (ok ≤ 32)" in ranked_row
    assert "### h100 · cuda:0 (NVIDIA H100 80GB HBM3) — measured" in glance
    page = (out / "report.html").read_text()
    first_image = page.index("<img")
    matrix, ranked_table = page.index("class='sortable matrix'"), page.index("class='sortable ranked'")
    assert page.index("id='at-a-glance'") < matrix < ranked_table < first_image
    assert "<script>" in page and "table.sortable" in page and "addEventListener" in page
    assert re.search(r'<td class="oom" title="[^"]*CUDA out of memory', page)  # the reason on hover
    best = f'<td class="best" data-v="{_memory_ratio("bk", 64):.3f}" title="'  # the number behind the text
    assert re.search(re.escape(best) + r'[^"]*" style="background:#', page)


def test_long_tables_are_pivoted_and_fitted_to_their_data(rendered):
    """Batch sizes as columns; machine and device in the block title, not repeated on every row; the long form
    (every case, every column) only in the CSV."""
    out, _, _ = rendered
    md = (out / "report.md").read_text()
    memory = md[md.index("## Peak memory") : md.index("## Step time")]
    assert "| workload | method | B=8 | B=16 | B=32 | B=64 |" in memory
    assert "| machine |" not in md and "| device |" not in md
    assert "| dit-s-2-cond | opacus-hooks |" in memory and "| OOM¹ |" in memory
    fit_md = (out / "memory_fit.md").read_text()
    assert "source: fit to cases" in fit_md.splitlines()[2]  # the same on every row: moved into the caption
    header = next(line for line in fit_md.splitlines() if line.startswith("| "))
    assert "| source |" not in header and "| machine |" in header  # two machines: a column


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


def _first_screen(path: Path) -> tuple[list[str], list[str]]:
    """The matrix row and the ranked row of the one workload in ``path``, as Markdown table lines."""
    results = load_results([path])
    (matrix,) = overview(results)
    matrix_md = "\n".join(grid_markdown(matrix_grid(matrix)))
    ranked_md = "\n".join(grid_markdown(ranked_grid(matrix.block, ranked_summary(results, matrix))))
    return matrix_md.splitlines(), ranked_md.splitlines()


def test_first_screen_states_a_time_ratio_only_beyond_its_noise(tmp_path):
    """1.18× with a 2 % spread per side is stated; with ±90 % on nondp's side it is "t ~" and not ranked."""
    steady = _first_screen(write_jsonl(tmp_path / "steady.jsonl", _run_with_time_spread(base_iqr=0.02)))
    assert any("| 1.0" in line and "t 1.18×" in line for line in steady[0])
    assert any("bk 1.18× · opacus-hooks 1.35× · opacus-ghost 1.60×" in line for line in steady[1])
    noisy = _first_screen(write_jsonl(tmp_path / "noisy.jsonl", _run_with_time_spread(base_iqr=0.9)))
    row = next(line for line in noisy[0] if line.startswith("| dit-s-2-cond"))
    assert row.count("t ~") == 3 and "t 1." not in row
    assert any("none beyond timing noise" in line for line in noisy[1])
    assert any("3 within noise or not comparable: bk, opacus-ghost, opacus-hooks" in line for line in noisy[1])
    records = _run_with_time_spread(base_iqr=0.02)
    for r in records:
        r.timing.rounds = 2
    few = _first_screen(write_jsonl(tmp_path / "few.jsonl", records))
    assert next(line for line in few[0] if line.startswith("| dit-s-2-cond")).count("t ?") == 3


def test_different_thread_counts_in_one_ratio_are_a_report_warning(tmp_path):
    records = _run_with_time_spread(base_iqr=0.02)
    next(r for r in records if r.method == "bk").timing.torch_threads = 1
    results = load_results([write_jsonl(tmp_path / "mixed.jsonl", records)])
    (matrix,) = overview(results)
    assert matrix.rows[0].cells["bk"].time_verdict == "threads differ"
    out = _mkdir(tmp_path / "r")
    md = write_markdown(report_content(results, [], "t"), out).read_text()
    assert "1 time ratio(s) divide step times timed with different torch CPU thread counts" in md
    assert "t ?" in next(line for line in md.splitlines() if line.startswith("| dit-s-2-cond (B=32"))


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
    figures = [
        FigureResult("breakdown", "Breakdown", skipped=f"workload {HOSTILE!r} is not in the results"),
        FigureResult("timeline", "Timeline", [tmp_path / "t.png"], caption=f"traces of {HOSTILE}"),
    ]
    (tmp_path / "t.png").write_bytes(b"\x89PNG\r\n")
    (matrix,) = overview(results)
    ((block, rows),) = blocks(results)
    grids = [
        matrix_grid(matrix),
        ranked_grid(block, ranked_summary(results, matrix)),
        memory_pivot(block, rows, results.overhead),
    ]
    content = ReportContent(
        f"title {HOSTILE}",
        results.sources,
        f"subtitle {HOSTILE}",
        [Section("At a glance", grids=grids, figures=[figures[1]])],
        skipped=[figures[0]],
        warnings=[f"warned {HOSTILE}"],
    )
    out = _mkdir(tmp_path / "out")
    md = write_markdown(content, out).read_text()
    page = write_html(content, out).read_text()
    assert page.count("<script") == 1 and page.rindex("<script>") > page.rindex("</table>")  # only ours, at the end
    for text in (md, page):  # the raw name is written escaped: no tag, no comment opener
        assert "<script>x" not in text and "<!--" not in text
    # title, subtitle, matrix, ranked and pivot rows, footnotes, caption, skip reason, warning
    assert md.count("&lt;script&gt;x&lt;/script&gt;&lt;!--") >= 10
    assert page.count(html.escape(HOSTILE)) >= 10
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
    grid = frame_grid(overhead_display(results.overhead), results.overhead, "overhead", "every case")
    md, csv_path = write_table(grid, tmp_path, "o", OVERHEAD_NOTES, results.overhead)
    assert {r["workload"] for r in csv.DictReader(csv_path.open())} == {HOSTILE}
    assert "<!--" not in md.read_text() and "&lt;!--" in md.read_text()


def _paired(records: list[CaseRecord], ratios: dict[str, float], unreliable: dict[str, str]) -> list[CaseRecord]:
    """The records as the bench now writes them: each DP case with its paired ratio and every case judged."""
    for r in records:
        timing = r.timing
        timing.round_times_s = [timing.time_median_s] * 5
        if r.method in ratios:
            timing.paired_time_ratio, timing.paired_time_ratio_iqr = ratios[r.method], 0.02 * ratios[r.method]
        timing.time_reliable = r.method not in unreliable
        timing.time_unreliable_reason = unreliable.get(r.method, "")
    return records


def test_an_unreliable_time_ratio_is_marked_on_the_first_screen_and_never_ranked(tmp_path):
    """bk's paired rounds ran while other processes held the CPUs: its ratio is shown as unreliable and left out
    of the "fastest" ranking, though it is the lowest; nondp's own step time is marked too."""
    waited = "its threads waited for a CPU 60% of the time they could run (limit 25%)"
    ratios = {"bk": 0.18, "opacus-hooks": 1.35, "opacus-ghost": 1.60}
    records = _paired(_run_with_time_spread(base_iqr=0.02), ratios, {"bk": waited, "nondp": waited})
    path = write_jsonl(tmp_path / "loaded.jsonl", records)
    matrix_md, ranked_md = _first_screen(path)
    row = next(line for line in matrix_md if line.startswith("| dit-s-2-cond"))
    assert "t unreliable" in row and "t 0.18×" not in row and "t 1.35×" in row
    assert "(unreliable)" in row.split("|")[1]  # the row label's nondp step time
    ranked_row = next(line for line in ranked_md if line.startswith("| dit-s-2-cond"))
    assert "opacus-hooks 1.35× · opacus-ghost 1.60×" in ranked_row and "bk 0.18×" not in ranked_row
    assert "unreliable, not ranked: bk" in ranked_row
    results = load_results([path])
    (matrix,) = overview(results)
    (ranked,) = ranked_summary(results, matrix)
    assert [m for m, _ in ranked.fastest] == ["opacus-hooks", "opacus-ghost"] and ranked.unreliable == (("bk", waited),)
    assert waited in matrix_grid(matrix).rows[0][1 + matrix.methods.index("bk")].hover
    md = write_markdown(report_content(results, [], "t"), _mkdir(tmp_path / "r")).read_text()
    assert "1 time ratio(s) are marked `unreliable`" in md and "divide two cases' medians" not in md


def test_paired_ratios_are_the_reported_ratio_and_older_records_are_said_to_divide_medians(tmp_path):
    paired = _paired(_run_with_time_spread(base_iqr=0.02), {"bk": 1.05, "opacus-hooks": 1.2, "opacus-ghost": 1.3}, {})
    results = load_results([write_jsonl(tmp_path / "paired.jsonl", paired)])
    (matrix,) = overview(results)
    assert matrix.rows[0].cells["bk"].time_ratio == 1.05  # not the two cases' medians' 1.18
    assert matrix.rows[0].cells["bk"].time_basis == "paired rounds"
    older = _run_with_time_spread(base_iqr=0.02)  # no paired fields, not judged
    results = load_results([write_jsonl(tmp_path / "older.jsonl", older)])
    (matrix,) = overview(results)
    assert matrix.rows[0].cells["bk"].time_ratio == 1.18 and matrix.rows[0].cells["bk"].time_basis == "case medians"
    md = write_markdown(report_content(results, [], "t"), _mkdir(tmp_path / "r")).read_text()
    assert "3 time ratio(s) divide two cases' medians timed at different moments" in md
