"""Timed rounds of a case through pytest-benchmark: calibrated, paired with non-DP rounds, judged against the load.

Calibration. A round of pytest-benchmark is ``iterations`` calls of the step; its statistics are per call. A step
of a few milliseconds timed one call per round is dominated by scheduler noise on a shared machine (a 3-round tiny
case once reported a DP method at 0.09× the non-DP step time). So, like pytest-benchmark's own calibration, a
round repeats the step until it lasts at least :data:`MIN_ROUND_S` (or ``--benchmark-min-time`` when that is
larger); the number of rounds is the preset's (``--rounds``).

Pairing. A step time on a shared machine measures the step *and* whatever else ran: with other load, cpu-smoke's
nondp dit-tiny-cond took 904 ms instead of 10 ms and bk-tiled came out 0.18× of it. A ratio of two cases timed at
different moments divides two different loads. So a DP method's case also times the non-DP step of the same
workload, batch, training mode and device (built by bench/case/runner.py, on its own model) between the method's rounds:
N₀ A₁ N₁ A₂ … A_r N_r. Each method round A_i is divided by the mean of the non-DP rounds either side of it (a
load that rises or falls steadily across the three cancels), and the record keeps the median of these per-round
ratios (``paired_time_ratio``) and their IQR. The non-DP rounds run in pytest-benchmark's ``teardown`` hook,
which it calls after each round outside its timer, so its statistics and JSON stay the method's alone. They run
after the measured round and on their own model, so no memory figure sees them. A non-DP round is calibrated
like the method's (its own ``iterations``, at least MIN_ROUND_S), so it costs at most what a method round does.

Reliability. :func:`unreliable_reasons` is the one rule saying when the run cannot vouch for a case's step times;
the record keeps its verdict (``time_reliable``, ``time_unreliable_reason``) beside the load figures it read
(bench/trackers/contention.py), and the reports never rank an unreliable ratio.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from pytest_benchmark.stats import Stats

from bench.results.record import Timing
from bench.trackers import contention
from bench.trackers.contention import Reading

__all__ = [
    "CPU_WAIT_LIMIT",
    "MIN_ROUND_S",
    "MIN_SPREAD_PAIRS",
    "PAIR_SPREAD_LIMIT",
    "STEAL_LIMIT",
    "Reference",
    "StepTimer",
    "benchmark_timer",
    "iterations_for",
    "median_and_iqr",
    "paired_ratios",
    "timing_from_durations",
    "unreliable_reasons",
]

MIN_ROUND_S = 0.05  # seconds a timed round lasts at least (a few OS scheduler quanta)
# A first call slower than this needs no calibration call: even at 10× first-call overhead the steady step
# would fill a round. Faster ones are timed once more, since a first call (lazy state, caches) says little.
CALIBRATE_BELOW_S = 10 * MIN_ROUND_S

# --- the reliability rule's thresholds (see unreliable_reasons) -------------------------------------------------
# Two runs of a ratio should agree within 15 % (the acceptance of issue #17); the thresholds keep a ratio whose own
# rounds or load say it could be further off than that out of every ranking.
# Of the time this process's threads could run, the share they waited for a CPU taken by other processes. At a
# quarter, every step time is stretched by a third (1 / (1 − ¼)) by other load alone; beyond it, how much of that
# stretch the method and the non-DP rounds shared is a guess.
CPU_WAIT_LIMIT = 0.25
# The share of the machine's CPU time the hypervisor gave to other guests: the same stretch, invisible inside.
STEAL_LIMIT = 0.25
# The per-round ratios of a paired case disagree (IQR / median) by more than two runs may: the median of a
# handful of them cannot be closer than that.
PAIR_SPREAD_LIMIT = 0.15
MIN_SPREAD_PAIRS = 3  # a quartile of fewer per-round ratios says nothing about their spread


@dataclass(frozen=True)
class Reference:
    """The non-DP step timed between a DP method's rounds: one call (device synchronised), and the duration of a
    call seen before (its warm-up step) to calibrate its rounds from."""

    step: Callable[[], None]
    one_call_s: float


class StepTimer(Protocol):
    def __call__(
        self,
        step: Callable[[], None],
        one_call_s: float,
        reference: Callable[[], Reference | None] | None = None,
        notes: list[str] | None = None,
    ) -> Timing:
        """Time ``step`` (one call = one fused step, device synchronised); ``one_call_s`` is the duration of a
        call seen before (the warm-up step). ``reference`` builds the non-DP step to pair the rounds with (only
        when they will be timed; None: not built, not paired); ``notes`` receives a line if pairing failed."""
        ...


def iterations_for(one_call_s: float, min_round_s: float) -> int:
    """Calls per round so that a round lasts at least ``min_round_s`` (1 for a step that already does)."""
    if not math.isfinite(one_call_s) or one_call_s <= 0:
        return 1
    return max(1, math.ceil(min_round_s / one_call_s))


def timing_from_durations(round_times_s: Sequence[float], iterations: int) -> Timing:
    """The :class:`Timing` of rounds that lasted ``round_times_s`` each (per call, ``iterations`` calls a round),
    with pytest-benchmark's own statistics (its quartiles), so that ``time_iqr_s`` means the same for a rank that
    times itself as for a one-process case timed by pytest-benchmark."""
    stats = Stats()
    for duration in round_times_s:
        stats.update(duration)
    return Timing(
        time_median_s=stats.median,
        time_mean_s=stats.mean,
        time_min_s=stats.min,
        time_max_s=stats.max,
        time_stddev_s=float(stats.stddev),  # pytest-benchmark's is the int 0 for one round
        time_iqr_s=stats.iqr,
        rounds=int(stats.rounds),
        iterations=iterations,
        torch_threads=torch.get_num_threads(),
    )


def median_and_iqr(values: Sequence[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``values`` (inclusive quartiles; the IQR of one value is 0)."""
    if len(values) < 2:
        return values[0], 0.0
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q3 - q1


def paired_ratios(method_s: Sequence[float], nondp_s: Sequence[float]) -> list[float]:
    """Each method round ÷ the mean of the non-DP rounds before and after it (``nondp_s`` has one more round:
    N₀ A₁ N₁ … A_r N_r)."""
    if len(nondp_s) != len(method_s) + 1:
        raise ValueError(f"{len(method_s)} method rounds need {len(method_s) + 1} non-DP rounds, got {len(nondp_s)}")
    return [a / ((nondp_s[i] + nondp_s[i + 1]) / 2) for i, a in enumerate(method_s)]


def unreliable_reasons(timing: Timing) -> list[str]:
    """Why the run cannot vouch for ``timing``'s step times and ratio (``[]``: it can) — the one rule:

    * this process's threads waited for a CPU more than CPU_WAIT_LIMIT of the time they could run (other
      processes held the CPUs); where the OS gives no run-queue figures, a 1-minute load average above the CPUs
      available (more runnable threads than CPUs, this process's included) stands in for it;
    * the hypervisor stole more than STEAL_LIMIT of the machine's CPU time;
    * a paired ratio's per-round ratios spread (IQR / median) wider than PAIR_SPREAD_LIMIT (at least
      MIN_SPREAD_PAIRS of them: the load changed under the pairs, or the step itself varies that much).
    """
    reasons = []
    wait, load, cpus = timing.cpu_wait_fraction, timing.load_average_1m, timing.cpus_available
    if wait is not None and wait > CPU_WAIT_LIMIT:
        limit = f"limit {CPU_WAIT_LIMIT:.0%}"
        reasons.append(f"its threads waited for a CPU {wait:.0%} of the time they could run ({limit})")
    elif wait is None and load is not None and cpus and load > cpus:
        reasons.append(f"load average {load:.1f} above the {cpus} CPUs available")
    steal = timing.cpu_steal_fraction
    if steal is not None and steal > STEAL_LIMIT:
        reasons.append(f"the hypervisor stole {steal:.0%} of the CPU time (limit {STEAL_LIMIT:.0%})")
    ratio, iqr = timing.paired_time_ratio, timing.paired_time_ratio_iqr
    pairs = len(timing.round_times_s)
    if ratio and iqr is not None and pairs >= MIN_SPREAD_PAIRS and iqr / ratio > PAIR_SPREAD_LIMIT:
        reasons.append(
            f"its {pairs} round pairs disagree: IQR {iqr / ratio:.0%} of the ratio (limit {PAIR_SPREAD_LIMIT:.0%})"
        )
    return reasons


def judged(timing: Timing) -> Timing:
    """``timing`` with the rule's verdict filled in."""
    reasons = unreliable_reasons(timing)
    return dataclasses.replace(timing, time_reliable=not reasons, time_unreliable_reason="; ".join(reasons))


class _Rounds:
    """The readings and the non-DP rounds of one timed case (the method's rounds are pytest-benchmark's). A non-DP
    call that raises (e.g. out of memory beside the method's step) ends the pairing: the method is timed alone."""

    def __init__(self, rounds: int, read: Callable[[], Reading], reference: Reference | None):
        self.rounds, self.read, self.reference = rounds, read, reference
        self.nondp_iterations = 1
        self.nondp: list[tuple[Reading, Reading]] = []  # (start, end) of each non-DP round
        self.method: list[tuple[Reading, Reading]] = []  # (start, end) around each method round
        self.failure = ""
        self.next_start: Reading | None = None

    def calibrate(self, one_call: Callable[[Callable[[], None], float], float], min_round_s: float) -> None:
        if self.reference is not None:
            try:
                one_call_s = one_call(self.reference.step, self.reference.one_call_s)
            except Exception as exc:
                return self._stop(exc)
            self.nondp_iterations = iterations_for(one_call_s, min_round_s)

    def nondp_round(self) -> None:
        if self.reference is None:
            return
        start = self.read()
        try:
            for _ in range(self.nondp_iterations):
                self.reference.step()
        except Exception as exc:
            return self._stop(exc)
        self.nondp.append((start, self.read()))

    def _stop(self, exc: Exception) -> None:
        self.failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.reference, self.nondp = None, []

    def begin(self) -> None:
        self.nondp_round()
        self.next_start = self.read()

    def after_method_round(self) -> None:
        """pytest-benchmark's teardown: the end of a method round; then one non-DP round. It is called again after
        the extra untimed call that follows looped rounds (and by --benchmark-cprofile): those are not rounds."""
        if len(self.method) == self.rounds:
            return
        self.method.append((self.next_start, self.read()))
        self.nondp_round()
        self.next_start = self.read()


def benchmark_timer(
    benchmark, rounds: int, min_round_s: float = MIN_ROUND_S, read: Callable[[], Reading] = contention.read
) -> StepTimer:
    """A :data:`StepTimer` that runs pytest-benchmark's ``pedantic`` mode with calibrated iterations, the non-DP
    rounds in its teardown. ``read``: the clock and load readings (injected by tests)."""

    def one_call(step: Callable[[], None], seen_s: float) -> float:
        if seen_s >= CALIBRATE_BELOW_S:
            return seen_s
        start = read().wall_s
        step()
        return read().wall_s - start

    def time_step(step, one_call_s, reference=None, notes=None) -> Timing:
        iterations = iterations_for(one_call(step, one_call_s), min_round_s)
        if not benchmark.enabled:  # --benchmark-disable: pytest-benchmark calls the step once, untimed
            benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=0)
            return Timing(torch_threads=torch.get_num_threads())
        timed = _Rounds(rounds, read, reference() if reference is not None else None)
        timed.calibrate(one_call, min_round_s)
        first = read()
        timed.begin()
        benchmark.pedantic(
            step, rounds=rounds, iterations=iterations, warmup_rounds=0, teardown=timed.after_method_round
        )
        last = read()
        if timed.failure and notes is not None:
            notes.append(f"timing: a non-DP round failed ({timed.failure}); the method's rounds are unpaired")
        conditions = contention.conditions_between(first, last)
        timing = dataclasses.replace(
            timing_from_durations(benchmark.stats.stats.data, iterations),
            round_times_s=list(benchmark.stats.stats.data),
            round_cpu_s=[(end.cpu_s - start.cpu_s) / iterations for start, end in timed.method],
            load_average_1m=first.load_average_1m,
            cpus_available=first.cpus_available,
            cpu_wait_fraction=conditions.run_queue_wait,
            other_cpus_busy=conditions.other_cpus,
            cpu_steal_fraction=conditions.steal,
        )
        timing.cpu_time_median_s = statistics.median(timing.round_cpu_s) if timing.round_cpu_s else None
        if len(timed.nondp) == len(timing.round_times_s) + 1:
            per_call = timed.nondp_iterations
            timing.paired_nondp_round_times_s = [(end.wall_s - start.wall_s) / per_call for start, end in timed.nondp]
            timing.paired_nondp_round_cpu_s = [(end.cpu_s - start.cpu_s) / per_call for start, end in timed.nondp]
            timing.paired_nondp_iterations = per_call
            ratios = paired_ratios(timing.round_times_s, timing.paired_nondp_round_times_s)
            timing.paired_time_ratio, timing.paired_time_ratio_iqr = median_and_iqr(ratios)
        return judged(timing)

    return time_step
