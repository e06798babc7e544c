"""Screenshot a rendered report.html with headless Chromium: ``python reports/screenshot.py HTML PNG``.

What a reader sees first, as a PNG (1400×900 by default), for the README and as a CI check that the report
renders in a real browser. As a script it imports the standard library, the project's one-line usage errors
(bench.config.cli) and Pillow when installed; ``tox -e screenshot`` installs the project for bench.config.cli.

Exit status: 0 written (the PNG is checked: not empty, not one flat colour); 0 with a "skipped" line when no
Chromium binary exists, unless ``--require-browser`` (CI installs one and asks for it: then 1); 1 when the
browser exists but the screenshot is missing, empty or blank; 2 bad arguments (a missing HTML file, a bad
--size, a $DPMEM_CHROMIUM that is no executable).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.config.cli import OneLineParser, run

# Debian/Ubuntu packages (chromium-headless-shell, chromium), other distributions and Google's builds.
BROWSERS = (
    "chromium-headless-shell",
    "chromium",
    "chromium-browser",
    "headless_shell",
    "google-chrome",
    "google-chrome-stable",
)
TIMEOUT_S = 120


def find_browser() -> str | None:
    """The Chromium binary to use: $DPMEM_CHROMIUM if set, else the first of BROWSERS on the PATH."""
    override = os.environ.get("DPMEM_CHROMIUM")
    if override:
        return shutil.which(override) or (override if Path(override).is_file() else None)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot_command(browser: str, html: Path, png: Path, width: int, height: int, profile: Path) -> list[str]:
    """Chromium's own headless screenshot: the top ``width`` × ``height`` pixels of the page, at scale 1."""
    return [
        browser,
        "--headless",
        "--no-sandbox",  # CI containers run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",  # a fresh profile: no lock held by another Chromium, nothing left behind
        f"--window-size={width},{height}",
        f"--screenshot={png}",
        html.resolve().as_uri(),
    ]


def blank_problem(png: Path) -> str | None:
    """Why ``png`` is not a usable screenshot (missing, empty, one flat colour), or None."""
    if not png.is_file() or png.stat().st_size == 0:
        return "no screenshot was written" if not png.is_file() else "the screenshot file is empty"
    try:
        from PIL import Image
    except ImportError:  # without Pillow only the file itself is checked
        return None
    with Image.open(png) as image:
        if image.getcolors(maxcolors=1) is not None:
            return f"the screenshot is one flat colour ({image.size[0]}×{image.size[1]}): nothing rendered"
    return None


def parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 1400x900")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m reports.screenshot", description="Screenshot report.html with headless Chromium."
    )
    parser.add_argument("html", type=Path, help="the report.html to open")
    parser.add_argument("png", type=Path, help="the PNG to write")
    parser.add_argument("--size", type=parse_size, default=(1400, 900), help="window WIDTHxHEIGHT (1400x900)")
    parser.add_argument(
        "--require-browser", action="store_true", help="fail (exit 1) instead of skipping when no Chromium is found"
    )
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html}: no such file (render it first: python -m reports ... --out DIR)", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None and os.environ.get("DPMEM_CHROMIUM"):
        print(f"error: DPMEM_CHROMIUM={os.environ['DPMEM_CHROMIUM']}: no such executable", file=sys.stderr)
        return 2
    if browser is None:
        looked = f"looked for $DPMEM_CHROMIUM, {', '.join(BROWSERS)}"
        if args.require_browser:
            print(f"error: no Chromium binary found ({looked}); --require-browser", file=sys.stderr)
            return 1
        print(f"skipped: no Chromium binary found ({looked})")
        return 0
    args.png.parent.mkdir(parents=True, exist_ok=True)
    args.png.unlink(missing_ok=True)  # a stale PNG must not pass for a new one
    with tempfile.TemporaryDirectory(prefix="dpmem-chromium-") as profile:
        command = screenshot_command(browser, args.html, args.png, *args.size, Path(profile))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"error: {browser} took more than {TIMEOUT_S} s to screenshot {args.html}", file=sys.stderr)
            return 1
    problem = blank_problem(args.png)
    if problem is not None:
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
        print(f"error: {browser} (exit {proc.returncode}): {problem}. {tail}".rstrip(), file=sys.stderr)
        return 1
    print(f"wrote {args.png} ({args.size[0]}×{args.size[1]}, {browser})")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "python -m reports.screenshot"))
