"""report.html in a real browser (headless Chromium, where installed): the screenshot ``tox -e screenshot`` takes,
and the sortable tables' script. Without a browser the screenshot step skips with a message, never fails."""

from __future__ import annotations

import configparser
import html
import json
import re
import subprocess
from pathlib import Path

import pytest

from reports import screenshot
from reports.__main__ import report_content
from reports.html import write_html
from reports.load import load_results
from tests.reports.fakes import write_two_gpu_files

ROOT = Path(__file__).resolve().parents[2]
BROWSER = screenshot.find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install chromium-headless-shell)")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """report.html of the two-GPU run (tables only: the browser checks do not need the figures)."""
    folder = tmp_path_factory.mktemp("page")
    results = load_results(write_two_gpu_files(folder))
    return write_html(report_content(results, [], "dpmem report"), folder)


@needs_browser
def test_screenshot_is_1400_by_900_and_shows_the_page(page, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "shot.png"
    png.write_bytes(b"stale")  # replaced, never passed off as the new one
    assert screenshot.main([str(page), str(png)]) == 0
    assert f"wrote {png} (1400×900" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.size == (1400, 900)
        assert image.getcolors(maxcolors=1) is None  # more than one flat colour: the page rendered


@needs_browser
def test_a_blank_page_fails_the_screenshot(tmp_path, capsys):
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert screenshot.main([str(blank), str(tmp_path / "blank.png"), "--size", "300x200"]) == 1
    assert "one flat colour (300×200): nothing rendered" in capsys.readouterr().err


def test_without_a_browser_the_screenshot_step_skips_with_a_message(page, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Chromium on this PATH
    monkeypatch.delenv("DPMEM_CHROMIUM", raising=False)
    assert screenshot.find_browser() is None
    assert screenshot.main([str(page), str(tmp_path / "shot.png")]) == 0
    assert capsys.readouterr().out.startswith("skipped: no Chromium binary found (looked for $DPMEM_CHROMIUM, ")
    assert not (tmp_path / "shot.png").exists()
    assert screenshot.main([str(tmp_path / "missing.html"), str(tmp_path / "shot.png")]) == 2
    monkeypatch.setenv("DPMEM_CHROMIUM", str(tmp_path / "no-such-browser"))  # asked for by name: an error
    assert screenshot.main([str(page), str(tmp_path / "shot.png")]) == 2
    assert "DPMEM_CHROMIUM=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        screenshot.main([str(page), str(tmp_path / "shot.png"), "--size", "wide"])


def test_where_a_browser_is_required_its_absence_fails(page, tmp_path, monkeypatch, capsys):
    """CI installs Chromium and passes --require-browser: a browser that went missing fails, never 'skipped'."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DPMEM_CHROMIUM", raising=False)
    assert screenshot.main([str(page), str(tmp_path / "shot.png"), "--require-browser"]) == 1
    assert "error: no Chromium binary found" in capsys.readouterr().err


def test_the_screenshot_env_installs_what_the_script_imports():
    """``tox -e screenshot`` runs ``python -I reports/screenshot.py``: no folder of the clone is on its path, so
    bench.config.cli must come from the installed project (a skipped package failed CI: No module named 'bench')."""
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    env = tox["testenv:screenshot"]
    assert env.get("package", tox["testenv"].get("package")) == "editable"
    assert "from bench.config.cli import" in (ROOT / "reports" / "screenshot.py").read_text()
    assert "python -I {toxinidir}/reports/screenshot.py" in env["commands"]


# Clicks the "B=64" header of the first detail table twice and stores the numbers of that column after each click.
_CLICK_TWICE = """
<script>
var table = document.querySelector("table.sortable.table");
var th = Array.prototype.find.call(table.tHead.rows[0].cells, function (c) { return c.textContent === "B=64"; });
var column = function () {
  return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[th.cellIndex].dataset.v; });
};
th.click(); var first = column(); th.click(); var second = column();
document.body.setAttribute("data-sorted", JSON.stringify([first, second, th.dataset.dir]));
</script>
"""


@needs_browser
def test_clicking_a_header_sorts_its_table_by_number_in_a_real_browser(page, tmp_path):
    text = page.read_text().replace("</body>", _CLICK_TWICE + "</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(text)
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*command, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-sorted="([^"]*)"', dom)
    assert match, dom[-2000:]
    first, second, direction = json.loads(html.unescape(match.group(1)))
    numbers = [float(v) for v in first if v is not None]
    assert len(numbers) >= 7 and numbers == sorted(numbers)  # numeric order ("39.6" after "5.91"), not text order
    assert [float(v) for v in second if v is not None] == sorted(numbers, reverse=True) and direction == "desc"
