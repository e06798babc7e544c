"""Measure one fused step with every memory source that applies to its device, as CaseRecord fields.

    record = CaseRecord(workload=..., method=..., batch_size=..., device=...,
                        **measure_step(lambda mark: step(batch, mark), device=dev,
                                       model=step.model, optimizer=step.optimizer))

Sources: the tensor tracker (any device), the CUDA allocator peaks and the NVML sampler (CUDA), process RSS
(CPU). The measured round is not a timed round: on CUDA its marks synchronise the device so phase times are
true, the tracker slows every op, and the GIL switch interval is shortened so the sampler threads get their
turn while the main thread runs Python. Run one warm-up step before it (lazy kernel loading, cuBLAS
workspaces and optimizer state are then in the baseline, not in the step's peak).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from bench.record import Phase, Timeline

from ..devices import resolve_device
from . import cuda
from .nvml import NvmlSampler, check_interval
from .process import RssSampler
from .tensors import TensorTracker

MAX_TIMELINE_POINTS = 500
DEFAULT_PROCESS_INTERVAL_S = 0.02


def measure_step(
    run_step: Callable[[Callable[[str], None]], Any],
    *,
    device: torch.device | str,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    sample_interval_s: float = 0.001,
    track_tensors: bool = True,
    snapshot_path: str | None = None,
    nvml_module: Any = None,
    process_interval_s: float = DEFAULT_PROCESS_INTERVAL_S,
    extra_tensors: Iterable[Tensor] = (),
    nvml_baseline_bytes: int | None = None,
) -> dict[str, Any]:
    """Run ``run_step(mark)`` once under every sampler for ``device``; return CaseRecord fields as a dict.

    ``extra_tensors`` (e.g. the batch) are declared pre-existing; others an op reads are adopted anyway. An
    exception from the step (out-of-memory included) propagates after the samplers are stopped and the tracker
    detached; the figures gathered until then ride along as ``exc.partial_measurement``.

    ``nvml_baseline_bytes``: device ``used`` before the caller allocated anything for this case (CUDA context +
    other processes; the bench reads it at case start). ``nvml_peak_minus_baseline_bytes`` is taken against it;
    without it, against the reading just before the step. Both readings are recorded."""
    interval_s = check_interval(sample_interval_s)
    process_interval_s = check_interval(process_interval_s, "process sample interval")
    device = resolve_device(device)
    is_cuda = device.type == "cuda"
    notes: list[str] = []
    marks: list[tuple[str, float]] = []

    tracker: TensorTracker | None = None
    if track_tensors:
        tracker = TensorTracker(device)
        tracker.register_state(model, optimizer, extra_tensors)

    nvml_sampler = rss_sampler = None
    alloc_at_start = None
    if is_cuda:
        cuda.reset_peak(device)  # synchronises, so the NVML baseline below sees a quiet device
        alloc_at_start, _ = cuda.current_figures(device)
        nvml_sampler = NvmlSampler(
            device.index,
            interval_s=interval_s,
            process_interval_s=process_interval_s,
            nvml=nvml_module,
            slow_probe=lambda: torch.cuda.memory_allocated(device),
        )
    else:
        rss_sampler = RssSampler(interval_s)

    def mark(phase: str) -> None:
        if is_cuda:
            torch.cuda.synchronize(device)
        marks.append((phase, time.perf_counter()))
        if tracker is not None:
            tracker.mark(phase)

    stopped: dict[str, Any] = {}
    old_switch = sys.getswitchinterval()

    def stop_all() -> None:
        if stopped:
            return
        if is_cuda:
            try:
                torch.cuda.synchronize(device)
            except Exception as exc:  # after a device error the sync may fail too; still stop the samplers
                notes.append(f"CUDA: synchronize after the step failed ({type(exc).__name__}: {exc})")
        stopped["t_end"] = time.perf_counter()
        stopped["nvml"] = nvml_sampler.stop() if nvml_sampler is not None else None
        stopped["rss"] = rss_sampler.stop() if rss_sampler is not None else None
        sys.setswitchinterval(old_switch)

    for sampler in (nvml_sampler, rss_sampler):
        if sampler is not None:
            sampler.start()
    sys.setswitchinterval(min(old_switch, interval_s))
    t0 = time.perf_counter()

    def assemble(snapshot_notes: Sequence[str]) -> dict[str, Any]:
        return _assemble(
            t0=t0,
            stopped=stopped,
            tracker=tracker,
            marks=marks,
            device=device,
            notes=notes + list(snapshot_notes),
            snapshot_path=snapshot_path if (is_cuda and not snapshot_notes) else None,
            interval_s=interval_s if is_cuda else None,
            alloc_at_start=alloc_at_start,
            nvml_baseline_bytes=nvml_baseline_bytes,
        )

    snapshot_notes: list[str] = []
    try:
        with ExitStack() as stack:
            snapshot_notes = stack.enter_context(cuda.memory_snapshot(device, snapshot_path))
            if tracker is not None:
                stack.enter_context(tracker)
            run_step(mark)
            if is_cuda:
                torch.cuda.synchronize(device)
    except BaseException as exc:
        stop_all()
        try:
            exc.partial_measurement = assemble(snapshot_notes)  # type: ignore[attr-defined]
        except Exception:  # the step's own error matters more than a failed partial record
            pass
        raise
    stop_all()
    return assemble(snapshot_notes)


def _assemble(
    *,
    t0: float,
    stopped: dict[str, Any],
    tracker: TensorTracker | None,
    marks: list[tuple[str, float]],
    device: torch.device,
    notes: list[str],
    snapshot_path: str | None,
    interval_s: float | None,
    alloc_at_start: int | None,
    nvml_baseline_bytes: int | None = None,
) -> dict[str, Any]:
    t_end = stopped["t_end"]
    out: dict[str, Any] = {
        "peak_tensor_bytes": None,
        "baseline_tensor_bytes": None,
        "breakdown": {},
        "peak_phase": None,
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        "snapshot_path": snapshot_path,
        "nvml_peak_used_bytes": None,
        "nvml_baseline_bytes": None,
        "nvml_step_start_bytes": None,
        "nvml_peak_minus_baseline_bytes": None,
        "nvml_peak_reserved_bytes": None,
        "nvml_process_peak_bytes": None,
        "nvml_samples": 0,
        "nvml_interval_s": interval_s,
        "peak_rss_bytes": None,
        "baseline_rss_bytes": None,
        "phases": phases_from_marks(marks, t0, t_end),
    }
    traces: dict[str, tuple[list[float], list[int], int | None]] = {}

    if tracker is not None:
        report = tracker.report()
        out.update(
            peak_tensor_bytes=report.peak_tensor_bytes,
            baseline_tensor_bytes=report.baseline_tensor_bytes,
            breakdown=report.breakdown,
            peak_phase=report.peak_phase,
        )
        traces["tensor_bytes"] = (report.trace_t, report.trace_bytes, report.baseline_tensor_bytes)
        if report.adopted_storages:
            notes.append(
                f"tensors: {report.adopted_storages} pre-existing storage(s) first seen as op inputs "
                f"({report.adopted_bytes} bytes, e.g. the batch) counted in the baseline"
            )
        if report.unknown_annotations:
            notes.append(
                f"tensors: {report.unknown_annotations} annotated DP buffer(s) had a storage the tracker never saw"
            )

    if device.type == "cuda":
        out["peak_allocated_bytes"], out["peak_reserved_bytes"] = cuda.peak_figures(device)

    nvml = stopped.get("nvml")
    if nvml is not None:
        notes.extend(nvml.notes)
        baseline = nvml.baseline_used_bytes if nvml_baseline_bytes is None else nvml_baseline_bytes
        out.update(
            nvml_peak_used_bytes=nvml.peak_used_bytes,
            nvml_baseline_bytes=baseline,
            nvml_step_start_bytes=nvml.baseline_used_bytes,
            nvml_peak_minus_baseline_bytes=(
                None if nvml.peak_used_bytes is None or baseline is None else nvml.peak_used_bytes - baseline
            ),
            nvml_peak_reserved_bytes=nvml.peak_reserved_bytes,
            nvml_process_peak_bytes=nvml.process_peak_bytes,
            nvml_samples=nvml.samples,
        )
        if nvml.available:
            traces["nvml_used_bytes"] = (nvml.times, nvml.used_bytes, nvml.baseline_used_bytes)
            traces["allocated_bytes"] = (nvml.probe_times, nvml.probe_values, alloc_at_start)

    rss = stopped.get("rss")
    if rss is not None:
        notes.extend(rss.notes)
        out.update(peak_rss_bytes=rss.peak_rss_bytes, baseline_rss_bytes=rss.baseline_rss_bytes)
        traces["rss_bytes"] = (rss.times, rss.rss_bytes, rss.baseline_rss_bytes)

    out["timeline"] = build_timeline(traces, t0, t_end)
    out["notes"] = notes
    return out


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
    traces: dict[str, tuple[Sequence[float], Sequence[int], int | None]],
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
    duration = max(t_end - t0, 1e-9)
    width = duration / n
    timeline = Timeline(t_s=[round(i * width, 9) for i in range(n)])
    for name, (times, values, initial) in traces.items():
        if not times:
            continue
        buckets: list[int | None] = [None] * n
        for t, value in zip(times, values):
            i = min(n - 1, max(0, int((t - t0) / width)))
            if buckets[i] is None or value > buckets[i]:
                buckets[i] = value
        carried = initial if initial is not None else values[0]
        filled: list[int] = []
        last_in_bucket = _last_value_per_bucket(times, values, t0, width, n)
        for i in range(n):
            filled.append(buckets[i] if buckets[i] is not None else carried)
            if last_in_bucket[i] is not None:
                carried = last_in_bucket[i]
        setattr(timeline, name, [int(v) for v in filled])
    return timeline


def _last_value_per_bucket(times, values, t0: float, width: float, n: int) -> list[int | None]:
    last: list[int | None] = [None] * n
    for t, value in zip(times, values):
        last[min(n - 1, max(0, int((t - t0) / width)))] = value
    return last
