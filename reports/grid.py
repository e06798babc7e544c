"""A table as the report writes it: rows of :class:`Cell` (text plus the number behind it), in Markdown and HTML.

Every table of report.md / report.html is a :class:`Grid` before it is written. A cell keeps its number
(``value``) next to its text so the HTML sorts numerically; why a cell has no number (OOM, unsupported) is its
``footnote`` (a Markdown footnote, an HTML hover); ``hover`` holds details only the HTML shows. :func:`compact`
fits a table to its data: a column with the same text on every row moves into the caption, a column with no
value on any row is left out (and named).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .tables import format_number, markdown_text, present

__all__ = [
    "EMPTY_TEXTS",
    "Cell",
    "Grid",
    "caption_line",
    "compact",
    "frame_grid",
    "grid_markdown",
    "ratio_colour",
    "table_markdown",
    "write_table",
]

# Cell texts that carry no value (a figure the device does not have, a blank).
EMPTY_TEXTS = frozenset({"", "n/a"})


@dataclass(frozen=True)
class Cell:
    text: str
    value: float | None = None  # the number behind the text: the HTML sorts the column by it
    # CSS classes: oom, unsupported, error, pred (predicted), extrap, untrusted, best, label; "reason": the text
    # says why a number column has no number here (a status other columns already give)
    style: str = ""
    hover: str = ""  # details shown on hover in the HTML only
    footnote: str = ""  # why there is no number: a footnote in Markdown, a hover in HTML
    color: str | None = None  # background (the matrix's diverging scale)
    sub: str = ""  # a second, smaller line (the matrix's step time)
    sub_style: str = ""  # CSS class of that line: "est" for an estimated, not measured, step time
    spans: tuple[tuple[str, str], ...] = ()  # (text, style) parts of a mixed cell (text = the texts joined by " · ")


@dataclass
class Grid:
    title: str
    caption: str  # one line: what the table shows and what to look at
    header: list[str]
    rows: list[list[Cell]]
    facts: list[tuple[str, str]] = field(default_factory=list)  # columns with one value on every row
    omitted: list[str] = field(default_factory=list)  # columns with no value on any row
    kind: str = "table"  # "matrix" for the first screen's matrix (its own CSS)
    legend: str = ""  # the notation of the cells, under the table


def compact(grid: Grid, keep: tuple[str, ...] = ()) -> Grid:
    """``grid`` with columns that say nothing per row taken out: the same text on every row (of two or more
    rows) → ``facts`` (written in the caption); no value on any row → ``omitted`` (a "reason" cell is no value;
    other styled cells, an OOM or a prediction, are). Columns named in ``keep`` stay."""
    facts, omitted, kept = list(grid.facts), list(grid.omitted), []
    for index, title in enumerate(grid.header):
        cells = [row[index] for row in grid.rows]
        if title in keep or not cells:
            kept.append(index)
        elif all(c.style == "reason" or (c.text in EMPTY_TEXTS and not c.style) for c in cells):
            omitted.append(title)
        elif len(cells) > 1 and len({(c.text, c.style) for c in cells}) == 1 and not cells[0].footnote:
            facts.append((title, cells[0].text))
        else:
            kept.append(index)
    return dataclasses.replace(
        grid,
        header=[grid.header[i] for i in kept],
        rows=[[row[i] for i in kept] for row in grid.rows],
        facts=facts,
        omitted=omitted,
    )


def frame_grid(display: pd.DataFrame, typed: pd.DataFrame | None, title: str, caption: str) -> Grid:
    """A display table (text cells, e.g. :func:`reports.tables.overhead_display`) as a Grid; where ``typed`` (the
    table it was made from, same index) has a numeric column of the same name, its numbers become the values and
    a text in place of a missing number is a "reason" cell."""
    numeric = set()
    if typed is not None:
        numeric = {c for c in display.columns if c in typed.columns and pd.api.types.is_numeric_dtype(typed[c])}
    rows = []
    for index, shown in display.iterrows():
        row = []
        for column in display.columns:
            value = typed.at[index, column] if column in numeric else None
            number = float(value) if value is not None and present(value) else None
            reason = column in numeric and number is None and format_number(shown[column]) not in EMPTY_TEXTS
            row.append(Cell(format_number(shown[column]), number, style="reason" if reason else ""))
        rows.append(row)
    return Grid(title, caption, [str(c) for c in display.columns], rows)


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------
_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def caption_line(grid: Grid) -> str:
    """The caption with the columns that were taken out: "… — machine: a100 · device: cuda:0 (no value: …)"."""
    facts = " · ".join(f"{name}: {value}" for name, value in grid.facts)
    omitted = f"left out, empty on every row: {', '.join(grid.omitted)}" if grid.omitted else ""
    extra = "; ".join(p for p in (facts, omitted) if p)
    return grid.caption + (f" — {extra}" if extra else "")


def _footnote_numbers(grid: Grid) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for row in grid.rows:
        for cell in row:
            if cell.footnote and cell.footnote not in numbers:
                numbers[cell.footnote] = len(numbers) + 1
    return numbers


def _markdown_cell(cell: Cell, numbers: dict[str, int]) -> str:
    text = markdown_text(cell.text)
    if cell.sub:
        text += f" · {markdown_text(cell.sub)}" if cell.style != "label" else f" ({markdown_text(cell.sub)})"
    if text and "best" in cell.style.split():
        text = f"**{text}**"
    elif text and {"pred", "extrap"} & set(cell.style.split()):
        text = f"*{text}*"
    if cell.footnote:
        text += str(numbers[cell.footnote]).translate(_SUPERSCRIPT)
    return text


def grid_markdown(grid: Grid, level: str = "###") -> list[str]:
    """A grid as Markdown lines: heading, caption, table, legend, footnotes."""
    lines = [f"{level} {markdown_text(grid.title)}", "", markdown_text(caption_line(grid)), ""]
    if not grid.rows:
        return [*lines, "_no rows_", ""]
    return lines + table_markdown(grid)


def table_markdown(grid: Grid) -> list[str]:
    """The table of a grid (with rows) as Markdown lines, its legend and footnotes after it; no heading."""
    lines = []
    numbers = _footnote_numbers(grid)
    lines.append("| " + " | ".join(markdown_text(h) for h in grid.header) + " |")
    lines.append("|" + "|".join("---" for _ in grid.header) + "|")
    lines += ["| " + " | ".join(_markdown_cell(c, numbers) for c in row) + " |" for row in grid.rows]
    lines.append("")
    if grid.legend:
        lines += [f"_{markdown_text(grid.legend)}_", ""]
    for note, number in numbers.items():
        lines.append(f"{str(number).translate(_SUPERSCRIPT)} {markdown_text(note)}  ")
    return lines + ([""] if numbers else [])


def write_table(grid: Grid, out_dir: Path, stem: str, notes: str, typed: pd.DataFrame) -> list[Path]:
    """Write ``stem``.md (the grid with its caption, then ``notes``) and ``stem``.csv (the typed table, every
    column, numbers as numbers); returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md_path.write_text("\n".join([*grid_markdown(grid, level="#"), markdown_text(notes), ""]), encoding="utf-8")
    typed.to_csv(csv_path, index=False)
    return [md_path, csv_path]


# ---------------------------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------------------------
# The diverging scale around 1.0 (log2 of the ratio, saturating at 4× either way): blue below, red above.
_LOW, _HIGH, _SATURATION = (33, 102, 172), (178, 24, 43), 2.0


def ratio_colour(ratio: float) -> str | None:
    """The background of a ratio cell: white at 1.0, towards blue below (less than non-DP) and red above, on a
    log scale that saturates at 1/4× and 4×; None without a ratio."""
    if not present(ratio) or ratio <= 0:
        return None
    t = max(-1.0, min(1.0, math.log2(ratio) / _SATURATION))
    end = _LOW if t < 0 else _HIGH
    weight = 0.7 * abs(t)  # never the full colour: dark text stays readable
    rgb = (round(255 + (channel - 255) * weight) for channel in end)
    return "#{:02x}{:02x}{:02x}".format(*rgb)
