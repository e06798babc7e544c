"""A record's reason in the reports: written cut to a bounded length (one helper, tables.reason_text), kept
whole in the record."""

from __future__ import annotations

from reports.__main__ import main, report_content
from reports.html import write_html, write_markdown
from reports.load import load_results
from reports.tables import REASON_CHARS, reason_text
from tests.reports.fakes import make_case, make_run, write_jsonl

HUGE = 10_000_000


def test_reason_text_is_the_first_line_cut_with_a_note():
    assert reason_text("bk: ValueError: short\nTraceback ...") == "bk: ValueError: short"
    assert reason_text("x" * REASON_CHARS) == "x" * REASON_CHARS
    cut = reason_text("y" * (REASON_CHARS + 1))
    assert cut.startswith("y" * REASON_CHARS + "…") and "y" * (REASON_CHARS + 1) not in cut
    assert f"of {REASON_CHARS + 1:,} characters; full text in the record" in cut


def _run_with_reason(reason: str):
    records = make_run("a100")
    for index, (method, status) in enumerate((("opacus-ghost", "unsupported"), ("bk", "error"))):
        at = next(i for i, r in enumerate(records) if r.method == method and r.batch_size == 16)
        records[at] = make_case(records[at].workload, method, 16, "a100", status=status)
        records[at].reason = f"{method}: RuntimeError: {index}" + reason
    oom = next(i for i, r in enumerate(records) if r.status == "oom")
    records[oom].reason = "CUDA out of memory. " + reason
    return records


def _report_sizes(folder, reason: str) -> tuple[int, int]:
    folder.mkdir()
    results = load_results([write_jsonl(folder / "run.jsonl", _run_with_reason(reason))], warn=print)
    content = report_content(results, [], "t")
    return write_markdown(content, folder).stat().st_size, write_html(content, folder).stat().st_size


def test_a_10_mb_reason_leaves_report_md_and_html_small_and_the_record_whole(tmp_path):
    huge = "x" * HUGE
    md, page = _report_sizes(tmp_path / "huge", huge)
    md_short, page_short = _report_sizes(tmp_path / "short", "x")
    # each place a reason is written (matrix, ranked summary and peak-memory footnotes; HTML hovers) holds at most
    # REASON_CHARS of it and the note: a few dozen places at most, against 10 MB per place before
    assert md - md_short < 40 * (REASON_CHARS + 100) and page - page_short < 40 * (REASON_CHARS + 100)
    for name in ("report.md", "report.html"):
        assert f"of {HUGE + 20:,} characters; full text in the record" in (tmp_path / "huge" / name).read_text()
    # the record keeps every character: as loaded, and through merge
    path = tmp_path / "huge" / "run.jsonl"
    results = load_results([path])
    expected = sorted(r.reason for r in _run_with_reason(huge) if len(r.reason) > HUGE)
    assert sorted(r for r in results.cases["reason"] if len(r) > HUGE) == expected
    assert main(["merge", str(path), "--out", str(tmp_path / "merged.jsonl")]) == 0
    merged = load_results([tmp_path / "merged.jsonl"])
    assert sorted(r for r in merged.cases["reason"] if len(r) > HUGE) == expected
