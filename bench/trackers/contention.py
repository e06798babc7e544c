"""What else the machine was doing while a case was timed: readings of this process's CPU time and of the load.

A :class:`Reading` is cheap (a few small ``/proc`` files, well under a millisecond); the timer takes one at every
round boundary. Between two readings, :func:`conditions_between` gives the share of time this process's threads
waited for a CPU (the kernel's per-thread run-queue delay, ``/proc/self/task/*/schedstat``), the CPUs that other
processes kept busy and the share the hypervisor stole (``/proc/stat``). Where a source does not exist (not
Linux, a kernel without schedstat) its figure is None, never a guess.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["LoadConditions", "Reading", "conditions_between", "read"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit, per second


@dataclass(frozen=True)
class Reading:
    wall_s: float  # time.perf_counter()
    cpu_s: float  # time.process_time(): this process's CPU time, all its threads together
    # thread id -> (ns on a CPU, ns runnable but waiting for one), from /proc/self/task/<tid>/schedstat
    threads_ns: dict[int, tuple[int, int]] | None = None
    # /proc/stat "cpu" line, in clock ticks summed over the CPUs: (busy, steal, all)
    machine_ticks: tuple[int, int, int] | None = None
    load_average_1m: float | None = None  # runnable threads, this process's included (os.getloadavg)
    cpus_available: int | None = None  # the CPUs this process may run on (its affinity mask where there is one)


@dataclass(frozen=True)
class LoadConditions:
    """Between two readings: None where the source is missing."""

    wall_s: float
    cpu_s: float  # this process's CPU seconds (all threads)
    run_queue_wait: float | None = None  # of the time this process's threads were runnable, the share they waited
    other_cpus: float | None = None  # CPUs kept busy by everything but this process (mean over the window)
    steal: float | None = None  # share of the machine's CPU time the hypervisor gave to other guests


def read() -> Reading:
    return Reading(
        time.perf_counter(),
        time.process_time(),
        _threads_ns(),
        _machine_ticks(),
        _load_average(),
        available_cpu_cores(),
    )


def available_cpu_cores() -> int | None:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def conditions_between(start: Reading, end: Reading) -> LoadConditions:
    wall_s, cpu_s = end.wall_s - start.wall_s, end.cpu_s - start.cpu_s
    run_queue_wait = other_cpus = steal = None
    if start.threads_ns is not None and end.threads_ns is not None:
        # a thread born in the window counts from zero; one that ended in it is gone from both sums
        ran = sum(run - start.threads_ns.get(tid, (0, 0))[0] for tid, (run, _) in end.threads_ns.items())
        waited = sum(wait - start.threads_ns.get(tid, (0, 0))[1] for tid, (_, wait) in end.threads_ns.items())
        if ran + waited > 0:
            run_queue_wait = waited / (ran + waited)
    if start.machine_ticks is not None and end.machine_ticks is not None and wall_s > 0:
        busy, stolen, total = (e - s for e, s in zip(end.machine_ticks, start.machine_ticks))
        if total > 0:
            # ticks are coarse (10 ms): the difference from this process's own CPU time can round below zero
            other_cpus = max(0.0, (busy / _CLOCK_TICKS - cpu_s) / wall_s)
            steal = stolen / total
    return LoadConditions(wall_s, cpu_s, run_queue_wait, other_cpus, steal)


def _threads_ns() -> dict[int, tuple[int, int]] | None:
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    figures = {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as handle:
                run, wait, _ = handle.read().split()
        except (OSError, ValueError):  # the thread ended meanwhile, or no schedstat
            continue
        figures[int(tid)] = (int(run), int(wait))
    return figures or None


def _machine_ticks() -> tuple[int, int, int] | None:
    """(busy, steal, all) clock ticks of /proc/stat's "cpu" line (user nice system idle iowait irq softirq steal
    guest guest_nice; guest time is already inside user)."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal
