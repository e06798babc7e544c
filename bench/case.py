"""Run one bench case (workload × method × batch size × device) and return its :class:`CaseRecord`.

The order inside a case: build model, batch and fused step → one warm-up step → timed rounds (nothing
attached) → one measured round (samplers and tensor tracker attached) → release everything. Out-of-memory
and unsupported combinations are results, not exceptions; anything else is recorded as ``error`` and
re-raised by the caller as a test failure.

Isolation: every case starts and ends with :func:`bench.memory.cuda.reset_between_cases` (garbage
collection, emptying the caching allocator, resetting peak statistics), so its figures do not depend on the
cases that ran before it in the same process (tested in tests/test_bench.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

import models
from bench import dp
from bench.config import BenchConfig
from bench.devices import resolve_device
from bench.machine import device_facts
from bench.memory import cuda as cuda_mem
from bench.memory.cap import LiveBytesCap, MemoryCapExceeded
from bench.memory.measure import measure_step
from bench.memory.nvml import read_used_bytes
from bench.record import CaseRecord

Timer = Callable[[Callable[[], None]], dict]


@dataclass(frozen=True)
class CaseSpec:
    workload: str
    method: str
    batch_size: int
    device: str

    @property
    def case_id(self) -> str:
        return f"{self.workload}-{self.method}-bs{self.batch_size}-{self.device}"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, the CPU memory cap, or the CPU allocator failing."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryCapExceeded)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_record(spec: CaseSpec, config: BenchConfig, privacy: dp.PrivacyParams) -> CaseRecord:
    device_name, device_memory = device_facts(spec.device)
    return CaseRecord(
        workload=spec.workload,
        method=spec.method,
        batch_size=spec.batch_size,
        device=spec.device,
        **privacy.to_dict(),  # noise_multiplier, epsilon, delta, accountant, max_grad_norm, sample_rate, steps
        optimizer=config.optimizer,
        device_name=device_name,
        device_memory_bytes=device_memory,
        runner_label=config.runner_label,
    )


def _warm_up(step, batch, device: torch.device, config: BenchConfig) -> None:
    """One untimed step: allocator pools, cuBLAS workspaces, Opacus' lazy state. On CPU with a memory cap it
    runs under the capped tensor tracker, so a case too large for the machine becomes ``oom`` instead of
    taking the machine down (the timed rounds repeat the same step, so they stay under the cap too)."""
    if device.type == "cpu" and config.memory_cap_bytes is not None:
        existing = sum(t.untyped_storage().nbytes() for t in (*step.model.parameters(), *step.model.buffers()))
        with LiveBytesCap(config.memory_cap_bytes, baseline_bytes=existing):
            step(batch)
    else:
        step(batch)


def run_case(
    spec: CaseSpec,
    config: BenchConfig,
    privacy: dp.PrivacyParams,
    timer: Timer | None,
) -> CaseRecord:
    """Run the case (no timed rounds when ``timer`` is None, as in the max-batch search); never raises for OOM or
    unsupported (the status says so); any other failure is recorded with status 'error'."""
    record = new_record(spec, config, privacy)
    device = resolve_device(spec.device)
    workload = models.get_workload(spec.workload)
    record.tokens_per_sample, record.family = workload.tokens_per_sample, workload.family
    cuda_mem.reset_between_cases(device)
    nvml_baseline = None
    if device.type == "cuda":  # before the case allocates anything: CUDA context + other processes
        nvml_baseline, _ = read_used_bytes(device.index)
    step = model = batch = None
    try:
        model = workload.build_model(device)
        record.params_total = sum(p.numel() for p in model.parameters())
        record.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        generator = torch.Generator().manual_seed(config.seed)
        batch = workload.make_batch(spec.batch_size, generator=generator, device=device)
        step = dp.build_step(
            spec.method,
            workload,
            model,
            privacy=privacy,
            batch_size=spec.batch_size,
            optimizer=config.optimizer,
            lr=config.lr,
            noise_generator=torch.Generator(device=device).manual_seed(config.seed + 1),
        )
        _warm_up(step, batch, device, config)
        _sync(device)
        if timer is not None:
            stats = timer(lambda: (step(batch), _sync(device)))
            record.time_median_s = stats["median"]
            record.time_mean_s = stats["mean"]
            record.time_min_s = stats["min"]
            record.time_stddev_s = stats["stddev"]
            record.rounds = int(stats["rounds"])
        snapshot = config.snapshot_case in (spec.case_id, "all")
        figures = measure_step(
            lambda mark: step(batch, mark),
            device=device,
            model=step.model,
            optimizer=step.optimizer,
            sample_interval_s=config.sample_interval_s,
            track_tensors=True,
            nvml_baseline_bytes=nvml_baseline,
            snapshot_path=f"{config.snapshot_dir}/{spec.case_id}.pickle" if snapshot else None,
        )
        for key, value in figures.items():
            setattr(record, key, value)
    except dp.MethodUnsupported as exc:
        record.status, record.reason = "unsupported", str(exc)
    except Exception as exc:
        if is_out_of_memory(exc):
            record.status = "oom"
            record.reason = f"batch {spec.batch_size}: {_first_line(exc)}"
        else:
            record.status, record.reason = "error", _first_line(exc)
        exc.__traceback__ = None
    finally:
        if step is not None:
            step.close()
        step = model = batch = None  # drop this case's tensors before the next case starts
        gc.collect()
        cuda_mem.reset_between_cases(device)
    return record
