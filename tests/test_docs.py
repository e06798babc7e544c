"""The README is the front door and docs/ holds the chapters: the README stays short, every relative link in
them lands on a file that exists and on a heading that exists there, and every chapter is reachable from the
README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHAPTERS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *CHAPTERS]
README_MAX_LINES = 400

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
# [text](target) and ![alt](target); the target stops at whitespace or ")", an optional "title" may follow
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is not a heading, nor a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase; drop every character other than letters, digits, spaces, hyphens
    and underscores; spaces become hyphens. Inline markup goes first: a link keeps its text, code its content."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; a repeated heading gets GitHub's -1, -2, ... suffixes."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose_lines(path.read_text()):
        match = _HEADING.match(line)
        if not match:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    """The targets of the relative Markdown links of a file (not in code), in order; URLs and mail are left out."""
    targets = []
    for line in _prose_lines(path.read_text()):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file does not exist or whose #anchor is no heading of that file."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        if not dest.exists():
            broken.append(f"{target}: no file {shown}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {shown}")
    return broken


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_there_are_chapters():
    assert CHAPTERS, "docs/ holds no chapter"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_lands(page):
    assert broken_links(page) == []


def test_every_chapter_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README) if t.partition("#")[0]}
    missing = [str(c.relative_to(ROOT)) for c in CHAPTERS if c.resolve() not in linked]
    assert missing == [], f"chapters the README does not link: {missing}"


def test_every_chapter_opens_with_a_title_and_a_summary():
    for chapter in CHAPTERS:
        lines = chapter.read_text().splitlines()
        assert lines[0].startswith("# "), chapter.name
        assert lines[1] == "" and lines[2] and not lines[2].startswith("#"), chapter.name


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A chapter\n\n## Which torch\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n## Read more\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#which-torch) [ok](#read-more) [url](https://example.org/x)\n"
        "`[in code](docs/none.md)`\n\n```\n[in a block](docs/none.md)\n```\n"
        "[gone](docs/gone.md) [bad anchor](docs/a.md#which-torch-2) [comment](docs/a.md#not-a-heading)\n"
    )
    found = [entry.split(":")[0] for entry in broken_links(page)]
    assert found == ["docs/gone.md", "docs/a.md#which-torch-2", "docs/a.md#not-a-heading"]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Can conditional DiT be trained with Opacus? Yes.", "can-conditional-dit-be-trained-with-opacus-yes"),
        ("Many ranks (torchrun): DDP and FSDP2, memory per rank", "many-ranks-torchrun-ddp-and-fsdp2-memory-per-rank"),
        ("The seed note's proxies, answered", "the-seed-notes-proxies-answered"),
        (
            "Training modes: mixed precision and activation checkpointing",
            "training-modes-mixed-precision-and-activation-checkpointing",
        ),
        ("`bk` and `bk-tiled`", "bk-and-bk-tiled"),
        ("snake_case stays", "snake_case-stays"),
    ],
)
def test_github_anchor_rule(heading, anchor):
    assert github_anchor(heading) == anchor
