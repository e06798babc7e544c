"""Run one bench case (workload × method × batch size × device) and return its :class:`CaseRecord`.

The order inside a case: build model, batch and fused step → one warm-up step → one measured round (samplers
and tensor tracker attached) → timed rounds (nothing attached) → release everything. The measured round comes
before the timed rounds so that a step over the CPU memory cap (enforced in the warm-up and the measured round)
is an ``oom`` result before it is ever timed. Out-of-memory and unsupported combinations are results, not
exceptions; anything else is recorded as ``error`` and re-raised by the caller as a test failure. An
out-of-memory error counts wherever it sits in an exception's chain, so no method's own error handling can turn
it into ``unsupported``; a workload that breaks the workload contract (models/contract.py) is an ``error`` named
once, before any method runs.

Isolation: every case starts and ends at a case boundary (:mod:`bench.memory.isolation`: garbage collection,
the caching allocator emptied, peak statistics reset, the NVML baseline read), so its figures do not depend
on the cases that ran before it in the same process (tested in tests/bench/).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

import models
from bench import dp
from bench.config import BenchConfig
from bench.devices import resolve_device
from bench.dp.errors import error_text, exception_chain, out_of_memory_in
from bench.machine import device_facts
from bench.memory.isolation import end_case, start_case
from bench.memory.measure import measure_step
from bench.memory.tensors import TensorTracker
from bench.record import CaseRecord
from bench.timing import StepTimer
from models.contract import check_workload_contract


@dataclass(frozen=True)
class CaseSpec:
    workload: str
    method: str
    batch_size: int
    device: str

    @property
    def case_id(self) -> str:
        """The id of the case in pytest (``test_dp_step[<case_id>]``), ``-k`` and ``--snapshot``."""
        return f"{self.workload}-{self.method}-bs{self.batch_size}-{self.device}"


# Characters actions/upload-artifact (v4) refuses in a path, and path separators: replaced in snapshot file names.
_UNSAFE_IN_FILE_NAMES = re.compile(r'[":<>|*?\\/\s]')


def snapshot_path(config: BenchConfig, spec: CaseSpec) -> str:
    """Where ``--snapshot`` writes this case's allocator snapshot: the case id with ``:`` (``cuda:0``, workload
    specs) and other characters CI artifact uploads refuse replaced by ``_``; the record names the case."""
    return f"{config.snapshot_dir}/{_UNSAFE_IN_FILE_NAMES.sub('_', spec.case_id)}.pickle"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_record(spec: CaseSpec, config: BenchConfig) -> CaseRecord:
    """The record of ``spec`` before anything ran: the case, its privacy settings and the device's facts."""
    device_name, device_memory = device_facts(spec.device)
    return CaseRecord(
        workload=spec.workload,
        method=spec.method,
        batch_size=spec.batch_size,
        device=spec.device,
        **config.privacy.to_dict(),  # noise_multiplier, epsilon, delta, accountant, max_grad_norm, sample_rate, steps
        optimizer=config.optimizer,
        device_name=device_name,
        device_memory_bytes=device_memory,
        runner_label=config.runner_label,
    )


def memory_cap_for(device: torch.device, config: BenchConfig) -> int | None:
    """The live-tensor-byte cap of a case: ``--memory-cap`` on CPU; none on a GPU (its capacity decides)."""
    return config.memory_cap_bytes if device.type == "cpu" else None


def _warm_up(step, batch, device: torch.device, config: BenchConfig) -> float:
    """One untimed step (allocator pools, cuBLAS workspaces, Opacus' lazy state); returns its duration. On CPU
    with a memory cap it runs under the capped tensor tracker (counting as the measured round counts), so a case
    too large for the machine becomes ``oom`` instead of taking the machine down."""
    cap = memory_cap_for(device, config)
    start = time.perf_counter()
    if cap is not None:
        tracker = TensorTracker(device, cap_bytes=cap)  # its figures are discarded: only the cap matters here
        tracker.register_state(step.model, step.optimizer)
        with tracker:
            step(batch)
    else:
        step(batch)
    _sync(device)
    return time.perf_counter() - start


def run_case(spec: CaseSpec, config: BenchConfig, timer: StepTimer | None) -> CaseRecord:
    """Run the case (no timed rounds when ``timer`` is None, as in the max-batch search); never raises for OOM or
    unsupported (the status says so); any other failure is recorded with status 'error'."""
    record = new_record(spec, config)
    device = resolve_device(spec.device)
    workload = models.get_workload(spec.workload)
    record.tokens_per_sample, record.family = workload.tokens_per_sample, workload.family
    record.overrides = dict(workload.overrides)
    nvml_baseline = start_case(device, record.notes)  # before the case allocates anything
    step = model = batch = None
    try:
        model = workload.build_model(device)
        record.params_total = sum(p.numel() for p in model.parameters())
        record.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        # the user's bug, named once, before any method runs; checked where the model lives
        check_workload_contract(workload, model, next(model.parameters()).device)
        generator = torch.Generator().manual_seed(config.seed)
        batch = workload.make_batch(spec.batch_size, generator=generator, device=device)
        step = dp.build_step(
            spec.method,
            workload,
            model,
            privacy=config.privacy,
            batch_size=spec.batch_size,
            optimizer=config.optimizer,
            lr=config.lr,
            noise_generator=torch.Generator(device=device).manual_seed(config.seed + 1),
        )
        one_call_s = _warm_up(step, batch, device, config)
        snapshot = config.snapshot_case in (spec.case_id, "all")
        record.memory = measure_step(
            lambda mark: step(batch, mark),
            device=device,
            model=step.model,
            optimizer=step.optimizer,
            sample_interval_s=config.sample_interval_s,
            nvml_baseline_bytes=nvml_baseline,
            snapshot_path=snapshot_path(config, spec) if snapshot else None,
            memory_cap_bytes=memory_cap_for(device, config),
            notes=record.notes,
        )
        if timer is not None:
            record.timing = timer(lambda: (step(batch), _sync(device)), one_call_s)
    except Exception as exc:  # classified below; the traceback must not keep tensors alive
        oom = out_of_memory_in(exc)  # first: an OOM wins over any method's own wrapping of it
        if oom is not None:
            record.status, record.reason = "oom", f"batch {spec.batch_size}: {error_text(oom)}"
        elif isinstance(exc, dp.MethodUnsupported):
            record.status, record.reason = "unsupported", str(exc)
        else:
            record.status, record.reason = "error", error_text(exc)
        for link in exception_chain(exc):
            link.__traceback__ = None
    finally:
        if step is not None:
            step.close()
        step = model = batch = None  # drop this case's tensors before the next case starts
        end_case(device)  # collects garbage first
    return record
