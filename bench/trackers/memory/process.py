"""Process resident set size (RSS) sampled by psutil in a thread during a step — the CPU's whole-process view.

RSS counts everything the process has mapped in: the Python heap, libraries, allocator arenas that glibc keeps
after free. So it is a ceiling on tensor memory, and not isolated between cases in one process.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass, field

from .nvml import check_interval


@dataclass
class RssResult:
    baseline_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    samples: int = 0
    times: list[float] = field(default_factory=list)  # time.perf_counter() values
    rss_bytes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def maxrss_note() -> str:
    """getrusage's ru_maxrss as a note: the lifetime high-water mark of the whole process, not of one step."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB, macOS bytes
    return f"ru_maxrss {maxrss_bytes / 2**20:.1f} MiB (high-water mark of the whole process lifetime, not this step)"


class RssSampler:
    """Poll this process's RSS every ``interval_s`` between :meth:`start` and :meth:`stop`."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = check_interval(interval_s)
        self._result = RssResult()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._process = psutil.Process()
        except Exception as exc:  # psutil missing or /proc unreadable
            self._process = None
            self._result.notes.append(f"RSS: psutil unavailable ({type(exc).__name__}: {exc})")

    def _sample(self) -> None:
        rss = int(self._process.memory_info().rss)
        result = self._result
        result.times.append(time.perf_counter())
        result.rss_bytes.append(rss)
        result.samples += 1
        if result.peak_rss_bytes is None or rss > result.peak_rss_bytes:
            result.peak_rss_bytes = rss

    def start(self) -> None:
        if self._process is None:
            return
        self._result.baseline_rss_bytes = int(self._process.memory_info().rss)
        self._thread = threading.Thread(target=self._run, name="dpmem-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sample()
                self._stop.wait(self.interval_s)
        except Exception as exc:
            self._result.notes.append(f"RSS: sampling stopped early ({type(exc).__name__}: {exc})")

    @property
    def result(self) -> RssResult:
        """What was sampled so far (final once :meth:`stop` returned)."""
        return self._result

    def stop(self) -> RssResult:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sample()  # the final state after the step
        self._result.notes.append(maxrss_note())
        return self._result
