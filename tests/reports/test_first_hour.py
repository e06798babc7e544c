"""What a new user sees of ``python -m reports``: the inputs named as typed (never a CI or temp folder), one
line saying where the report is and what it holds, figures shown at a size they can be read."""

from __future__ import annotations

import pandas as pd
import pytest

import reports.__main__ as cli
from reports.figures import FigureResult
from reports.grid import frame_grid
from reports.html import SIDE_COLUMN_PX, ReportContent, Section, write_html
from tests.reports.fakes import make_run, write_jsonl


@pytest.fixture
def no_figures(monkeypatch):
    """Reports without their figures (drawn and tested in test_figures.py): the inputs line is what matters."""
    monkeypatch.setattr(cli, "render_figures", lambda results, out_dir, options: [])


def test_inputs_outside_the_working_directory_are_named_without_their_folders(
    tmp_path, monkeypatch, capsys, no_figures
):
    ci = tmp_path / "ci.ZBvN" / "main" / "results"
    (ci / "a100").mkdir(parents=True)
    (ci / "h100").mkdir()
    files = [write_jsonl(ci / gpu / "bench.jsonl", make_run(gpu)) for gpu in ("a100", "h100")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main([*map(str, files), "--out", "r"]) == 0
    for name in ("report.md", "report.html"):
        page = (elsewhere / "r" / name).read_text()
        assert str(tmp_path) not in page and "ci.ZBvN" not in page
        assert "a100/bench.jsonl" in page and "h100/bench.jsonl" in page  # told apart by what they do not share
    assert cli.main([str(files[0]), "--out", "one"]) == 0
    assert "Inputs: `bench.jsonl`" in (elsewhere / "one" / "report.md").read_text()
    # below the working directory: as typed
    monkeypatch.chdir(tmp_path / "ci.ZBvN" / "main")
    assert cli.main(["results/a100/bench.jsonl", "--out", str(elsewhere / "typed")]) == 0
    assert "Inputs: `results/a100/bench.jsonl`" in (elsewhere / "typed" / "report.md").read_text()
    out = capsys.readouterr().out.splitlines()
    # the last render's two lines: what was written, then where the report is and what it found
    assert out[-1].startswith(f"{elsewhere / 'typed' / 'report.html'}: 32 cases (")
    assert "2 workloads × 4 methods × 4 batch sizes" in out[-1]


def test_a_figure_wider_than_the_side_column_goes_under_the_tables_unshrunk(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    narrow = FigureResult("narrow", "Narrow", [png], width_px=SIDE_COLUMN_PX)
    wide = FigureResult("wide", "Wide", [png], width_px=SIDE_COLUMN_PX + 1)
    table = frame_grid(pd.DataFrame({"method": ["bk"]}), None, "A table", "")
    section = Section("Peak memory", grids=[table], figures=[narrow, wide])
    page = write_html(ReportContent("t", [], "", [section]), tmp_path).read_text()
    pair_end = page.index("</div></div>", page.index("<div class='pair'>"))
    assert page.index('alt="Narrow"') < pair_end < page.index("<figure class='wide'><img alt=\"Wide\"")
