"""Timed rounds of a case through pytest-benchmark, calibrated so that fast steps are not timed one call at a time.

A round of pytest-benchmark is ``iterations`` calls of the step; its statistics are per call. A step of a few
milliseconds timed one call per round is dominated by scheduler noise on a shared machine (a 3-round tiny case
once reported a DP method at 0.09× the non-DP step time). So, like pytest-benchmark's own calibration, a round
repeats the step until it lasts at least :data:`MIN_ROUND_S` (or ``--benchmark-min-time`` when that is larger);
the number of rounds is the preset's (``--rounds``). The record keeps the dispersion (stddev, IQR), the
iteration count and torch's CPU thread count, so a reader can tell a ratio from its noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from bench.record import Timing

__all__ = ["MIN_ROUND_S", "StepTimer", "benchmark_timer", "iterations_for"]

MIN_ROUND_S = 0.05  # seconds a timed round lasts at least (a few OS scheduler quanta)
# A first call slower than this needs no calibration call: even at 10× first-call overhead the steady step
# would fill a round. Faster ones are timed once more, since a first call (lazy state, caches) says little.
CALIBRATE_BELOW_S = 10 * MIN_ROUND_S

# timer(step, one_call_s) -> Timing: time ``step`` (one call = one fused step, device synchronised); one_call_s
# is the duration of a call seen before (the warm-up step), from which the iterations per round are calibrated.
StepTimer = Callable[[Callable[[], None], float], Timing]


def iterations_for(one_call_s: float, min_round_s: float) -> int:
    """Calls per round so that a round lasts at least ``min_round_s`` (1 for a step that already does)."""
    if not math.isfinite(one_call_s) or one_call_s <= 0:
        return 1
    return max(1, math.ceil(min_round_s / one_call_s))


def benchmark_timer(benchmark, rounds: int, min_round_s: float = MIN_ROUND_S) -> StepTimer:
    """A :data:`StepTimer` that runs pytest-benchmark's ``pedantic`` mode with calibrated iterations."""

    def time_step(step: Callable[[], None], one_call_s: float) -> Timing:
        if one_call_s < CALIBRATE_BELOW_S:
            start = time.perf_counter()
            step()
            one_call_s = time.perf_counter() - start
        iterations = iterations_for(one_call_s, min_round_s)
        benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=0)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is None:  # --benchmark-disable: the step ran once, untimed
            return Timing(torch_threads=torch.get_num_threads())
        return Timing(
            time_median_s=stats.median,
            time_mean_s=stats.mean,
            time_min_s=stats.min,
            time_max_s=stats.max,
            time_stddev_s=stats.stddev,
            time_iqr_s=stats.iqr,
            rounds=int(stats.rounds),
            iterations=iterations,
            torch_threads=torch.get_num_threads(),
        )

    return time_step
