"""Write report.md and a self-contained report.html (figures inlined as base64 PNG, tables inline).

Text that comes from result files (workload, method and error strings in the summary, tables, captions and
warnings) is escaped in both: HTML-escaped in report.html, and in report.md raw HTML and ``<!--`` comments are
written as entities (:func:`reports.tables.markdown_text`), so a result name cannot inject markup.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .figures import FigureResult
from .tables import format_number, markdown_text, to_markdown

__all__ = ["ReportContent", "ReportTable", "write_html", "write_markdown"]


@dataclass
class ReportTable:
    title: str
    notes: str
    table: pd.DataFrame  # typed (numbers, NaN, status columns): the CSV
    display: pd.DataFrame  # the same rows as text: the Markdown and HTML tables
    stem: str  # file stem of its .md/.csv next to the report


@dataclass
class ReportContent:
    title: str
    sources: list[str]
    summary: list[str]
    tables: list[ReportTable]
    figures: list[FigureResult]
    warnings: list[str] = field(default_factory=list)


def _source(path: str) -> str:
    """An input path in report.md: a code span, or escaped text when it holds characters a code span would not
    keep inert everywhere (markup, backticks, line breaks)."""
    if any(c in path for c in "<>&`\r\n"):
        return markdown_text(path)
    return f"`{path}`"


def write_markdown(content: ReportContent, out_dir: Path) -> Path:
    """report.md: summary, tables, figures (linked PNG files next to it), skipped figures with reasons."""
    esc = markdown_text
    lines = [
        f"# {esc(content.title)}",
        "",
        "Inputs: " + ", ".join(_source(s) for s in content.sources),
        "",
        "## Summary",
        "",
    ]
    lines += [f"- {esc(line)}" for line in content.summary] + [""]
    if content.warnings:
        lines += ["## Input warnings", ""] + [f"- {esc(w)}" for w in content.warnings] + [""]
    for table in content.tables:
        lines += [f"## {esc(table.title)}", "", table.notes, "", f"(also `{table.stem}.csv`)", ""]
        lines += [to_markdown(table.display) if len(table.display) else "_no rows_", ""]
    lines += ["## Figures", ""]
    for figure in content.figures:
        if figure.skipped is None and figure.png is not None:
            lines += [
                f"### {esc(figure.title)}",
                "",
                esc(figure.caption),
                "",
                f"![{esc(figure.title)}]({_relative(figure.png, out_dir)})",
                "",
            ]
    skipped = [f for f in content.figures if f.skipped is not None]
    if skipped:
        lines += ["## Figures not produced", ""] + [f"- {esc(f.title)}: {esc(f.skipped)}" for f in skipped] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_html(content: ReportContent, out_dir: Path) -> Path:
    """report.html with no external references: CSS inline, each figure a data: URI of its PNG."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(content.title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}</style>",
        "</head><body>",
        f"<h1>{esc(content.title)}</h1>",
        "<p class='note'>Inputs: " + ", ".join(f"<code>{esc(s)}</code>" for s in content.sources) + "</p>",
        "<h2>Summary</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in content.summary) + "</ul>",
    ]
    if content.warnings:
        parts.append("<h2>Input warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in content.warnings) + "</ul>")
    for table in content.tables:
        parts += [f"<h2>{esc(table.title)}</h2>", f"<p class='note'>{esc(table.notes)}</p>", _html_table(table.display)]
    parts.append("<h2>Figures</h2>")
    for figure in content.figures:
        if figure.skipped is None and figure.png is not None:
            data = base64.b64encode(figure.png.read_bytes()).decode("ascii")
            parts += [
                f"<h3>{esc(figure.title)}</h3>",
                f"<p class='note'>{esc(figure.caption)}</p>",
                f'<img alt="{esc(figure.title)}" src="data:image/png;base64,{data}">',
            ]
    skipped = [f for f in content.figures if f.skipped is not None]
    if skipped:
        parts.append(
            "<h2>Figures not produced</h2><ul>"
            + "".join(f"<li>{esc(f.title)}: {esc(f.skipped)}</li>" for f in skipped)
            + "</ul>"
        )
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _html_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_number(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()
