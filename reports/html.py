"""Write report.md and a self-contained report.html (figures inlined as base64 PNG, CSS and a few lines of
JavaScript inline: no external reference, the file works offline) from the same :class:`ReportContent`.

Both have one structure: the title, then "At a glance" (per machine × device the method × workload matrix and the
ranked summary), then sections whose tables sit next to the figures that illustrate them, then the definitions.
HTML tables sort by a click on a header (numerically, by each cell's number); reasons and details show on hover
(``title``); in Markdown a cell's reason is a numbered footnote under its table.

Text that comes from result files (workload, method and error strings, captions, warnings) is escaped in both:
HTML-escaped in report.html, and in report.md raw HTML and ``<!--`` comments are written as entities
(:func:`reports.tables.markdown_text`), so a result name cannot inject markup.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .figures import FigureResult
from .grid import Cell, Grid, caption_line, grid_markdown, ratio_colour
from .tables import markdown_text

__all__ = ["ReportContent", "Section", "grid_html", "write_html", "write_markdown"]


@dataclass
class Section:
    title: str
    intro: str = ""  # one line under the heading
    grids: list[Grid] = field(default_factory=list)
    figures: list[FigureResult] = field(default_factory=list)  # produced figures, drawn next to the grids
    details: tuple[str, ...] = ()  # definitions: paragraphs in Markdown, collapsed (<details>) in HTML
    empty: str = ""  # what to say when the section has no grid and no figure

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass
class ReportContent:
    title: str
    sources: list[str]
    subtitle: str  # one line: what the inputs hold
    sections: list[Section]
    skipped: list[FigureResult] = field(default_factory=list)  # figures not produced, with the reason
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
def shown_paths(paths: list[str]) -> list[str]:
    """Input paths as the report names them: relative to the working directory when they lie below it (what was
    typed), else relative to the folder those others share — their file names for one input — never where a
    machine keeps its checkout or temporary files."""
    cwd = Path.cwd().resolve()
    resolved = [Path(p).resolve() for p in paths]
    outside = [r for r in resolved if not r.is_relative_to(cwd)]
    common = Path(os.path.commonpath([r.parent for r in outside])) if outside else cwd
    return [(r.relative_to(cwd) if r.is_relative_to(cwd) else r.relative_to(common)).as_posix() for r in resolved]


def _source(path: str) -> str:
    """An input path in report.md (as :func:`shown_paths` gives it): a code span, or escaped text when it holds
    characters a code span would not keep inert everywhere (markup, backticks, line breaks)."""
    if any(c in path for c in "<>&`\r\n"):
        return markdown_text(path)
    return f"`{path}`"


def write_markdown(content: ReportContent, out_dir: Path) -> Path:
    """report.md: the same sections as report.html, figures as linked PNG files next to it."""
    esc = markdown_text
    lines = [
        f"# {esc(content.title)}",
        "",
        esc(content.subtitle) + " Inputs: " + ", ".join(_source(s) for s in shown_paths(content.sources)),
        "",
    ]
    if content.warnings:
        lines += ["**Warnings**", ""] + [f"- {esc(w)}" for w in content.warnings] + [""]
    for section in content.sections:
        lines += [f"## {esc(section.title)}", ""]
        if section.intro:
            lines += [esc(section.intro), ""]
        for grid in section.grids:
            lines += grid_markdown(grid)
        for figure in section.figures:
            lines += [
                f"![{esc(figure.title)}]({_relative(figure.png, out_dir)})",
                "",
                f"_{esc(figure.title)}_: {esc(figure.caption)}",
                "",
            ]
        if not section.grids and not section.figures and section.empty:
            lines += [f"_{esc(section.empty)}_", ""]
        for paragraph in section.details:
            lines += [esc(paragraph), ""]
    if content.skipped:
        lines += ["## Figures not produced", ""]
        lines += [f"- {esc(f.title)}: {esc(f.skipped)}" for f in content.skipped] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;padding:10px 22px;
  max-width:1360px;color:#1d1d1f}
h1{font-size:21px;margin:4px 0 2px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:12px 0 2px}
.sub,.cap,.legend,.foot{color:#555;font-size:12px;margin:2px 0}.legend{margin-top:3px}
nav{font-size:12px;margin:2px 0 6px}nav a{margin-right:12px;color:#245}
.warn{background:#fff6d6;border:1px solid #e8d48a;padding:4px 10px;font-size:12px;margin:6px 0}
.warn ul{margin:0;padding-left:18px}
table{border-collapse:collapse;font-size:12px;margin:4px 0}
th,td{border:1px solid #d4d4d4;padding:2px 6px;text-align:right;vertical-align:top}
th{background:#f1f1f1;cursor:pointer;user-select:none;font-weight:600;text-align:left}
table.matrix th{text-align:center}table.matrix th:first-child{text-align:left}
th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}
td.label{text-align:left;font-weight:600;white-space:nowrap}td small{display:block;font-weight:400;color:#555}
table.matrix td{min-width:78px;text-align:center;font-size:14px;padding:3px 6px}
table.matrix td.label{text-align:left;font-size:13px}table.matrix td small{font-size:11px}
table.ranked td,table.ranked th{text-align:left;white-space:nowrap}table.ranked td:last-child{white-space:normal}
td.best{outline:2px solid #1d1d1f;outline-offset:-2px;font-weight:700}
td.oom,td.unsupported,td.error{color:#7a2e00;
  background:repeating-linear-gradient(135deg,#f4f4f4 0 5px,#e6e6e6 5px 10px)}
.pred,.extrap{font-style:italic;color:#33507a}
td small.est{color:#6b3fa0;font-style:italic;border-top:1px dotted #b9a3d6;margin-top:1px}
td.untrusted{color:#888}
.pair{display:flex;flex-wrap:wrap;gap:14px 22px;align-items:flex-start}.pair>.tables{flex:1 1 560px;min-width:0}
.pair>.figs{flex:1 1 520px;max-width:720px}figure{margin:4px 0 12px}figure img{width:100%;border:1px solid #eee}
figure.wide img{width:auto;max-width:100%}
figcaption{font-size:12px;color:#444}.scale{display:inline-flex;vertical-align:middle;margin:0 4px}
.scale span{width:34px;text-align:center;font-size:11px;border:1px solid #ddd}
details{font-size:12px;color:#444;margin:6px 0}.alone{max-width:960px}
"""

SIDE_COLUMN_PX = 720  # .pair>.figs' max-width: a wider figure beside the tables would be shrunk

# Click a header to sort its table: by each cell's data-v number where it has one, else by its text; rows
# without a value go last. Plain DOM code, no library.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, column) {
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var up = th.dataset.dir !== "asc";
      table.querySelectorAll("thead th").forEach(function (other) { delete other.dataset.dir; });
      th.dataset.dir = up ? "asc" : "desc";
      var body = table.tBodies[0];
      var key = function (row) {
        var cell = row.cells[column];
        if (cell.dataset.v !== undefined) return parseFloat(cell.dataset.v);
        return cell.textContent.trim() === "" ? null : cell.textContent.trim().toLowerCase();
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
        return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _html_cell(cell: Cell) -> str:
    esc = html.escape
    attrs = []
    if cell.style:
        attrs.append(f'class="{esc(cell.style)}"')
    if cell.value is not None:
        attrs.append(f'data-v="{cell.value:.6g}"')
    title = "\n".join(t for t in (cell.hover, cell.footnote) if t)
    if title:
        attrs.append(f'title="{esc(title)}"')
    if cell.color:
        attrs.append(f'style="background:{esc(cell.color)}"')
    sub_class = f" class='{esc(cell.sub_style)}'" if cell.sub_style else ""
    sub = f"<small{sub_class}>{esc(cell.sub)}</small>" if cell.sub else ""
    text = " · ".join(f"<span class='{esc(s)}'>{esc(t)}</span>" if s else esc(t) for t, s in cell.spans) or esc(
        cell.text
    )
    return f"<td {' '.join(attrs)}>{text}{sub}</td>" if attrs else f"<td>{text}{sub}</td>"


def _colour_scale() -> str:
    steps = (0.25, 0.5, 0.71, 1.0, 1.41, 2.0, 4.0)
    return (
        "<span class='scale'>"
        + "".join(f"<span style='background:{ratio_colour(r)}'>{r:g}×</span>" for r in steps)
        + "</span>"
    )


def grid_html(grid: Grid) -> str:
    """A grid as a sortable HTML table under its heading and caption, its legend below."""
    esc = html.escape
    parts = [f"<h3>{esc(grid.title)}</h3>", f"<p class='cap'>{esc(caption_line(grid))}</p>"]
    if not grid.rows:
        return "".join(parts) + "<p><em>no rows</em></p>"
    head = "".join(f"<th>{esc(h)}</th>" for h in grid.header)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in grid.rows)
    parts.append(
        f"<table class='sortable {esc(grid.kind)}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )
    if grid.legend:
        scale = _colour_scale() if grid.kind == "matrix" else ""
        parts.append(f"<p class='legend'>{scale}{esc(grid.legend)}</p>")
    return "".join(parts)


def _figure_html(figure: FigureResult, kind: str = "") -> str:
    esc = html.escape
    data = base64.b64encode(figure.png.read_bytes()).decode("ascii")
    return (
        f"<figure{f' class={kind!r}' if kind else ''}>"
        f'<img alt="{esc(figure.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{esc(figure.title)}.</b> {esc(figure.caption)}</figcaption></figure>"
    )


def _section_html(section: Section) -> str:
    esc = html.escape
    parts = [f"<h2 id='{section.anchor}'>{esc(section.title)}</h2>"]
    if section.intro:
        parts.append(f"<p class='sub'>{esc(section.intro)}</p>")
    tables = "".join(grid_html(g) for g in section.grids)
    # beside the tables only what fits the side column unshrunk; wider figures under them, at their own size
    side = "".join(_figure_html(f) for f in section.figures if f.width_px <= SIDE_COLUMN_PX)
    wide = "".join(_figure_html(f, "wide") for f in section.figures if f.width_px > SIDE_COLUMN_PX)
    if tables and side:
        parts.append(f"<div class='pair'><div class='tables'>{tables}</div><div class='figs'>{side}</div></div>")
    else:
        parts.append(tables or side)
    parts.append(wide)
    if not tables and not side and not wide and section.empty:
        parts.append(f"<p class='sub'><em>{esc(section.empty)}</em></p>")
    if section.details:
        paragraphs = "".join(f"<p>{esc(p)}</p>" for p in section.details)
        parts.append(f"<details><summary>definitions</summary>{paragraphs}</details>")
    return "".join(parts)


def write_html(content: ReportContent, out_dir: Path) -> Path:
    """report.html: nothing outside the file (CSS, script and figures inline)."""
    esc = html.escape
    nav = "".join(f"<a href='#{s.anchor}'>{esc(s.title)}</a>" for s in content.sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(content.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{esc(content.title)}</h1>",
        f"<p class='sub'>{esc(content.subtitle)} Inputs: "
        + ", ".join(f"<code>{esc(s)}</code>" for s in shown_paths(content.sources))
        + "</p>",
        f"<nav>{nav}</nav>",
    ]
    if content.warnings:
        parts.append("<div class='warn'><ul>" + "".join(f"<li>{esc(w)}</li>" for w in content.warnings) + "</ul></div>")
    parts += [_section_html(s) for s in content.sections]
    if content.skipped:
        parts.append(
            "<h2 id='figures-not-produced'>Figures not produced</h2><ul class='foot'>"
            + "".join(f"<li>{esc(f.title)}: {esc(f.skipped)}</li>" for f in content.skipped)
            + "</ul>"
        )
    parts += [f"<script>{_SORT_SCRIPT}</script>", "</body></html>"]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()
