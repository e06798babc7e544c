"""The pieces of one-line messages that every layer writes: the close names after an unknown one, and the
first line of a longer message. Torch-free and import-free, so the DP code, the command lines and the reports
share them without depending on one another."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["did_you_mean", "first_line"]


def did_you_mean(name: str, valid: Sequence[str], cutoff: float = 0.5) -> str:
    """`` (did you mean a, b?)`` for the valid names close to ``name``; empty when none is."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=cutoff)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def first_line(text: object) -> str:
    """The first non-blank line of a (possibly multi-line) message, e.g. a library's error."""
    return (str(text).strip().splitlines() or [""])[0]
