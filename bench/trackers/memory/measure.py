"""Measure one fused step with every memory source that applies to its device, as a :class:`StepMemory`.

    sources = StepSources(dev, model=step.model, optimizer=step.optimizer)
    record.memory = measure_step(lambda mark: step(batch, mark), sources, record.notes)

Sources: the tensor tracker (any device), the CUDA allocator peaks and the NVML sampler (CUDA), process RSS
(CPU); on meta the tracker alone (nothing is resident). The measured round is not a timed round: on CUDA its
marks synchronise the device so phase times are true, the tracker slows every op, and the GIL switch interval
is shortened so the sampler threads get their turn while the main thread runs Python. Run one warm-up step
before it (lazy kernel loading, cuBLAS workspaces and optimizer state are then in the baseline, not in the
step's peak).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.results.record import Phase, StepMemory, Timeline
from bench.system.devices import resolve_device

from . import allocator
from .nvml import NvmlResult, NvmlSampler, check_interval
from .process import RssResult, RssSampler
from .tensors import TensorReport, TensorTracker

MAX_TIMELINE_POINTS = 500
DEFAULT_PROCESS_INTERVAL_S = 0.02

# A trace for the timeline: (perf_counter times, values, the value before the first sample or None).
Trace = tuple[Sequence[float], Sequence[int], int | None]


@dataclass(frozen=True)
class StepSources:
    """What the measured round measures on ``device``, and how.

    ``model``, ``optimizer``, ``extra_state``: the state that exists before the step (declared to the tensor
    tracker, so that only storages made outside its view are adopted; ``extra_state`` e.g. the batch).
    ``nvml_baseline_bytes``: device ``used`` read before the caller allocated anything for this case (CUDA
    context + other processes; the bench reads it at case start); ``nvml_peak_minus_baseline_bytes`` is taken
    against it and is ``None`` without it. ``memory_cap_bytes``: the tensor tracker raises
    :class:`~bench.trackers.memory.tensors.MemoryCapExceeded` as soon as the tracked live bytes pass it (the CPU
    memory cap). ``snapshot_path``: where CUDA's allocator snapshot of the round goes. ``nvml_module``: injected
    by tests."""

    device: torch.device | str
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    extra_state: Sequence[torch.Tensor] = ()
    sample_interval_s: float = 0.001
    process_interval_s: float = DEFAULT_PROCESS_INTERVAL_S
    track_tensors: bool = True
    memory_cap_bytes: int | None = None
    nvml_baseline_bytes: int | None = None
    snapshot_path: str | None = None
    nvml_module: Any = None


def measure_step(
    run_step: Callable[[Callable[[str], None]], Any], sources: StepSources, notes: list[str] | None = None
) -> StepMemory:
    """Run ``run_step(mark)`` once under every source for ``sources.device`` and return its figures.

    ``notes`` receives one line per source problem. An exception from the step (out-of-memory included)
    propagates after every source is stopped and the tracker detached; the figures gathered until then ride
    along as ``exc.partial_measurement`` (a StepMemory)."""
    notes = [] if notes is None else notes
    measured = _MeasuredRound(sources)
    try:
        with ExitStack() as stack:
            # Entered outermost, so the snapshot is dumped after the samplers stopped (pickling is slow).
            snapshot_notes = stack.enter_context(allocator.memory_snapshot(measured.device, sources.snapshot_path))
            stack.enter_context(sampling(measured.window, measured.device, notes))
            if measured.tracker is not None:
                stack.enter_context(measured.tracker)
            run_step(measured.mark)
    except BaseException as exc:
        try:
            exc.partial_measurement = measured.figures(notes)  # type: ignore[attr-defined]
        except Exception:  # the step's own error matters more than a failed partial record
            pass
        raise
    memory = measured.figures(notes)
    notes.extend(snapshot_notes)
    snapshot_kept = measured.device.type == "cuda" and sources.snapshot_path and not snapshot_notes
    memory.snapshot_path = sources.snapshot_path if snapshot_kept else None
    return memory


class _MeasuredRound:
    """The sources of one measured round, ready before the step: the tensor tracker (the state registered), the
    sampler's window, CUDA's allocator peaks reset; the phase marks the step makes; the figures after it."""

    def __init__(self, sources: StepSources):
        self.sources = sources
        self.interval_s = check_interval(sources.sample_interval_s)
        process_interval_s = check_interval(sources.process_interval_s, "process sample interval")
        self.device = resolve_device(sources.device)
        self.is_cuda = self.device.type == "cuda"
        self.marks: list[tuple[str, float]] = []
        if sources.memory_cap_bytes is not None and not sources.track_tensors:
            raise ValueError("a memory cap is enforced by the tensor tracker: it needs track_tensors=True")
        self.tracker: TensorTracker | None = None
        if sources.track_tensors:
            self.tracker = TensorTracker(self.device, cap_bytes=sources.memory_cap_bytes)
            self.tracker.register_state(sources.model, sources.optimizer, extra=sources.extra_state)
        self.alloc_at_start = None
        if self.is_cuda:
            allocator.reset_peak(self.device)  # synchronises, so the first NVML reading sees a quiet device
            self.alloc_at_start, _ = allocator.current_figures(self.device)
        self.window = new_sampling_window(
            self.device,
            interval_s=self.interval_s,
            process_interval_s=process_interval_s,
            nvml_module=sources.nvml_module,
        )

    def mark(self, phase: str) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        self.marks.append((phase, time.perf_counter()))
        if self.tracker is not None:
            self.tracker.mark(phase)

    def figures(self, notes: list[str]) -> StepMemory:
        window = self.window
        memory = StepMemory(nvml_interval_s=self.interval_s if self.is_cuda else None)
        memory.phases = phases_from_marks(self.marks, window.t0, window.t_end)
        traces: dict[str, Trace] = {}
        if self.tracker is not None:
            traces.update(add_tensor_figures(memory, self.tracker.report(), notes))
        if self.is_cuda:
            memory.peak_allocated_bytes, memory.peak_reserved_bytes = allocator.peak_figures(self.device)
            baseline = self.sources.nvml_baseline_bytes
            traces.update(add_nvml_figures(memory, window.sampler.result, baseline, self.alloc_at_start, notes))
        elif window.sampler is not None:
            traces.update(add_rss_figures(memory, window.sampler.result, notes))
        memory.timeline = build_timeline(traces, window.t0, window.t_end)
        return memory


@dataclass
class SamplingWindow:
    """The sampler of one measured round and the ``perf_counter`` window it covered (set by :func:`sampling`)."""

    sampler: NvmlSampler | RssSampler | None  # meta: nothing resident to sample, the tracker is all
    interval_s: float
    t0: float = math.nan
    t_end: float = math.nan


def new_sampling_window(
    device: torch.device,
    *,
    interval_s: float = 0.001,
    process_interval_s: float = DEFAULT_PROCESS_INTERVAL_S,
    nvml_module: Any = None,
) -> SamplingWindow:
    """The sampler the measured round runs on ``device``: NVML (with the allocator's ``memory_allocated`` as its
    slow probe) on CUDA, none on meta, process RSS elsewhere."""
    if device.type == "cuda":
        sampler: NvmlSampler | RssSampler | None = NvmlSampler(
            device.index,
            interval_s=interval_s,
            process_interval_s=process_interval_s,
            nvml=nvml_module,
            slow_probe=lambda: torch.cuda.memory_allocated(device),
        )
    elif device.type == "meta":
        sampler = None
    else:
        sampler = RssSampler(interval_s)
    return SamplingWindow(sampler, interval_s)


@contextmanager
def sampling(window: SamplingWindow, device: torch.device, notes: list[str]) -> Iterator[SamplingWindow]:
    """Run ``window``'s sampler around the block exactly as the measured round does (``bench.gpu_check`` times
    this same context): the GIL switch interval lowered to the sample interval so the sampler thread gets its
    turn while the step runs Python, and on CUDA a device sync before the last reading."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, window.interval_s))
    try:
        if window.sampler is not None:
            window.sampler.start()
        window.t0 = time.perf_counter()
        try:
            yield window
        finally:
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize(device)
                except Exception as exc:  # after a device error the sync may fail too; still stop the sampler
                    notes.append(f"CUDA: synchronize after the step failed ({type(exc).__name__}: {exc})")
            window.t_end = time.perf_counter()
            if window.sampler is not None:
                window.sampler.stop()
    finally:
        sys.setswitchinterval(old)


def add_tensor_figures(memory: StepMemory, report: TensorReport, notes: list[str]) -> dict[str, Trace]:
    """Fill the tracker's figures into ``memory``; return its trace."""
    memory.peak_tensor_bytes = report.peak_tensor_bytes
    memory.baseline_tensor_bytes = report.baseline_tensor_bytes
    memory.breakdown = report.breakdown
    memory.peak_phase = report.peak_phase
    memory.adopted_tensor_bytes = report.adopted_bytes
    if report.adopted_storages:
        notes.append(
            f"tensors: {report.adopted_storages} pre-existing storage(s) first seen as op inputs "
            f"({report.adopted_bytes} bytes, e.g. the batch) counted in the baseline"
        )
    if report.unknown_annotations:
        notes.append(
            f"tensors: {report.unknown_annotations} annotated DP buffer(s) had a storage the tracker never saw"
        )
    return {"tensor_bytes": (report.trace_t, report.trace_bytes, report.baseline_tensor_bytes)}


def add_nvml_figures(
    memory: StepMemory,
    nvml: NvmlResult,
    case_baseline_bytes: int | None,
    alloc_at_start: int | None,
    notes: list[str],
) -> dict[str, Trace]:
    """Fill NVML's figures into ``memory``; peak − baseline only against the case-start baseline."""
    notes.extend(nvml.notes)
    memory.nvml_peak_used_bytes = nvml.peak_used_bytes
    memory.nvml_baseline_bytes = case_baseline_bytes
    memory.nvml_step_start_bytes = nvml.baseline_used_bytes
    if nvml.peak_used_bytes is not None and case_baseline_bytes is not None:
        memory.nvml_peak_minus_baseline_bytes = nvml.peak_used_bytes - case_baseline_bytes
    elif nvml.available:
        notes.append("NVML: no case-start baseline reading; nvml_peak_minus_baseline_bytes is None")
    memory.nvml_peak_reserved_bytes = nvml.peak_reserved_bytes
    memory.nvml_process_peak_bytes = nvml.process_peak_bytes
    memory.nvml_samples = nvml.samples
    if not nvml.available:
        return {}
    return {
        "nvml_used_bytes": (nvml.times, nvml.used_bytes, nvml.baseline_used_bytes),
        "allocated_bytes": (nvml.probe_times, nvml.probe_values, alloc_at_start),
    }


def add_rss_figures(memory: StepMemory, rss: RssResult, notes: list[str]) -> dict[str, Trace]:
    """Fill the RSS sampler's figures into ``memory``; return its trace."""
    notes.extend(rss.notes)
    memory.peak_rss_bytes, memory.baseline_rss_bytes = rss.peak_rss_bytes, rss.baseline_rss_bytes
    return {"rss_bytes": (rss.times, rss.rss_bytes, rss.baseline_rss_bytes)}


def phases_from_marks(marks: Sequence[tuple[str, float]], t0: float, t_end: float) -> list[Phase]:
    """Phases in the order they were marked; each ends where the next begins ("end" closes the last one)."""
    phases: list[Phase] = []
    for i, (name, start) in enumerate(marks):
        if name == "end":
            continue
        stop = marks[i + 1][1] if i + 1 < len(marks) else t_end
        phases.append(Phase(name=name, start_s=start - t0, end_s=stop - t0))
    return phases


def build_timeline(
    traces: dict[str, Trace],
    t0: float,
    t_end: float,
    max_points: int = MAX_TIMELINE_POINTS,
) -> Timeline:
    """Put every trace on one time axis of at most ``max_points`` equal buckets over [t0, t_end].

    Each bucket holds the *maximum* of the trace's samples in it (so the timeline keeps every peak) or, if it
    has none, the value carried over from before (a trace's initial value is the one given with it)."""
    densest = max((len(times) for times, _, _ in traces.values()), default=0)
    if densest == 0:
        return Timeline()
    n = max(1, min(max_points, densest))
    width = max(t_end - t0, 1e-9) / n
    timeline = Timeline(t_s=[round(i * width, 9) for i in range(n)])
    for name, (times, values, initial) in traces.items():
        if not times:
            continue
        maxima: list[int | None] = [None] * n
        last: list[int | None] = [None] * n
        for t, value in zip(times, values):
            i = min(n - 1, max(0, int((t - t0) / width)))
            if maxima[i] is None or value > maxima[i]:
                maxima[i] = value
            last[i] = value
        carried = initial if initial is not None else values[0]
        filled: list[int] = []
        for i in range(n):
            filled.append(maxima[i] if maxima[i] is not None else carried)
            if last[i] is not None:
                carried = last[i]
        setattr(timeline, name, [int(v) for v in filled])
    return timeline
