"""Check the memory measurement itself on one GPU: do NVML and the allocator agree, and does sampling cost time?

    python -m bench.gpu_check [--device cuda:0] [--workloads dit-s-2-cond gpt2] [--methods nondp opacus-hooks bk]

Per case it prints NVML peak − baseline, max_memory_reserved and max_memory_allocated, and evaluates the goal
"NVML peak within 2 % of reserved + non-allocator overhead", where the overhead (CUDA context, kernels, library
workspaces outside the allocator, other processes) is estimated just before the measured step as NVML used
minus torch's reserved. It then times N steps with the sampling off and on, interleaved, and evaluates the
goal "sampler overhead ≤ 1 %". "On" is the measured round's own sampling context
(:func:`bench.trackers.memory.measure.sampling`: NVML thread with the allocator probe, GIL switch interval lowered), so
the check measures what the bench runs. Exits 2 on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from bench.config.cli import OneLineParser, run
from bench.messages import first_line

GAP_GOAL = 0.02
OVERHEAD_GOAL = 0.01
DEFAULT_WORKLOADS = ("dit-s-2-cond", "gpt2")
DEFAULT_METHODS = ("nondp", "opacus-hooks", "bk")


@dataclass
class GapCheck:
    """NVML vs allocator for one measured step."""

    nvml_peak_used_bytes: int
    nvml_baseline_bytes: int
    reserved_at_start_bytes: int
    peak_reserved_bytes: int
    peak_allocated_bytes: int

    @property
    def non_allocator_bytes(self) -> int:
        """NVML used minus torch reserved just before the step: context, workspaces, other processes."""
        return self.nvml_baseline_bytes - self.reserved_at_start_bytes

    @property
    def expected_peak_bytes(self) -> int:
        return self.peak_reserved_bytes + self.non_allocator_bytes

    @property
    def gap_bytes(self) -> int:
        return self.nvml_peak_used_bytes - self.expected_peak_bytes

    @property
    def relative_gap(self) -> float:
        return self.gap_bytes / self.expected_peak_bytes if self.expected_peak_bytes > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return abs(self.relative_gap) <= GAP_GOAL

    def line(self) -> str:
        mib = 2**20
        return (
            f"nvml peak-baseline {(self.nvml_peak_used_bytes - self.nvml_baseline_bytes) / mib:9.1f} MiB | "
            f"max reserved {self.peak_reserved_bytes / mib:9.1f} MiB | "
            f"max allocated {self.peak_allocated_bytes / mib:9.1f} MiB | "
            f"non-allocator {self.non_allocator_bytes / mib:8.1f} MiB | gap {self.gap_bytes / mib:+8.1f} MiB "
            f"({self.relative_gap:+.2%}) {'OK' if self.ok else 'OVER 2%'}"
        )


def sampler_overhead(
    run_step: Callable[[], Any],
    sampling: Callable[[], AbstractContextManager[Any]],
    steps: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[float, list[float], list[float]]:
    """Median step time inside a fresh ``sampling()`` context / outside it, minus one; steps alternate off/on to
    cancel drift. Only the step is timed (device synchronised before and after); starting and stopping the
    sampler is not. A step that raises leaves no sampler running."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    off: list[float] = []
    on: list[float] = []

    def timed() -> float:
        sync()
        start = time.perf_counter()
        run_step()
        sync()
        return time.perf_counter() - start

    for _ in range(steps):
        off.append(timed())
        with sampling():
            on.append(timed())
    return statistics.median(on) / statistics.median(off) - 1.0, off, on


def measured_sampling(device, interval_s: float, nvml_module: Any = None) -> Callable[[], AbstractContextManager]:
    """A factory of the measured round's sampling context on ``device`` (one fresh sampler per call)."""
    from bench.trackers.memory.measure import new_sampling_window, sampling

    def enter() -> AbstractContextManager:
        window = new_sampling_window(device, interval_s=interval_s, nvml_module=nvml_module)
        return sampling(window, device, [])

    return enter


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm of the overhead check")
    parser.add_argument("--interval", type=float, default=0.001, help="NVML sample interval, seconds")
    return parser.parse_args(argv)


def check_case(workload_name: str, method: str, batch_size: int, device, args) -> tuple[GapCheck, float]:
    import torch

    import models
    from bench.dp import build_step, resolve_privacy
    from bench.trackers.memory import allocator
    from bench.trackers.memory.measure import StepSources, measure_step

    workload = models.get_workload(workload_name)
    model = workload.build_model(device)
    step = build_step(method, workload, model, privacy=resolve_privacy(1.0), batch_size=batch_size)
    batch = workload.make_batch(batch_size, device=device)
    try:
        step(batch)  # warm-up: lazy kernels, cuBLAS workspace and optimizer state exist before measuring
        allocator.reset_between_cases(device)
        _, reserved_at_start = allocator.current_figures(device)
        notes: list[str] = []
        sources = StepSources(
            device, model=step.model, optimizer=step.optimizer, sample_interval_s=args.interval, track_tensors=False
        )
        memory = measure_step(lambda mark: step(batch, mark), sources, notes)
        if memory.nvml_peak_used_bytes is None:
            raise RuntimeError("; ".join(notes) or "NVML produced no samples")
        gap = GapCheck(
            nvml_peak_used_bytes=memory.nvml_peak_used_bytes,
            nvml_baseline_bytes=memory.nvml_step_start_bytes,  # NVML just before the step
            reserved_at_start_bytes=reserved_at_start,
            peak_reserved_bytes=memory.peak_reserved_bytes,
            peak_allocated_bytes=memory.peak_allocated_bytes,
        )
        overhead, _, _ = sampler_overhead(
            lambda: step(batch),
            measured_sampling(device, args.interval),
            args.steps,
            sync=lambda: torch.cuda.synchronize(device),
        )
    finally:
        step.close()
    return gap, overhead


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check", file=sys.stderr)
        return 2
    from bench.system.devices import resolve_device
    from bench.system.machine import device_facts

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    name, total = device_facts(device)
    print(
        f"gpu_check on {device} ({name}, {total / 2**30:.1f} GiB), batch {args.batch_size}, "
        f"interval {args.interval * 1e3:g} ms"
    )
    failures = 0
    for workload_name in args.workloads:
        for method in args.methods:
            label = f"{workload_name:>14} {method:>14}"
            try:
                gap, overhead = check_case(workload_name, method, args.batch_size, device, args)
            except Exception as exc:  # report and go on: one bad case should not hide the others
                print(f"{label}  ERROR {type(exc).__name__}: {first_line(exc)}")
                failures += 1
                continue
            overhead_ok = overhead <= OVERHEAD_GOAL
            failures += (not gap.ok) + (not overhead_ok)
            print(f"{label}  {gap.line()} | sampler overhead {overhead:+.2%} {'OK' if overhead_ok else 'OVER 1%'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run(main, "python -m bench.gpu_check"))
