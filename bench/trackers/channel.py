"""The neutral channel between DP methods and whoever measures them: phase marks and DP-buffer announcements.

A method never imports measurement code, and measurement never imports method code. Methods only *announce*
what they do, through two hooks defined here: a phase marker (``mark("backward")``, called by the fused step
as each phase of :data:`PHASES` begins) and :func:`annotate_dp_buffer`, which names a tensor as a per-sample
gradient / norm buffer — memory that exists only because of DP. A measurement listens with
:func:`listening`; with no listener both hooks cost one Python call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor

__all__ = ["PHASES", "PhaseMarker", "annotate_dp_buffer", "listening", "no_mark"]

PHASES = ("forward", "backward", "clip", "noise", "optimizer")

PhaseMarker = Callable[[str], None]


def no_mark(phase: str) -> None:  # the marker of timed rounds: nothing, in particular no CUDA sync
    return None


_listeners: list[Callable[[Tensor], None]] = []


def annotate_dp_buffer(*tensors: Tensor | None) -> None:
    """Announce tensors that exist only because of DP (per-sample gradients, norms, kept output gradients)."""
    if _listeners:
        for t in tensors:
            if t is not None:
                for listener in _listeners:
                    listener(t)


@contextmanager
def listening(listener: Callable[[Tensor], None]) -> Iterator[None]:
    """Call ``listener(tensor)`` for every announced DP buffer while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
