"""One rank's share of a many-rank case: the same order as a one-process case (bench/case/runner.py), on this rank.

Build the model (equal on every rank: seeded by the workload) → draw the *global* batch from the case's seed
and keep this rank's contiguous ``batch_size / world_size`` samples (rank r holds samples r·n … r·n + n − 1, so
the ranks together step on exactly the one-process batch) → the parallel step (bench/dp/parallel.py) → two
warm-up steps (DDP rebuilds its gradient buckets at the second step; the measured one is the steady state) →
one measured round (bench.trackers.memory.measure_step: tensor tracker, allocator and NVML for this rank's GPU, RSS on
CPU) → timed rounds. The result is a :class:`CaseRecord` of this rank alone (``ranks`` holds its one
:class:`RankFigures`); the launcher combines the ranks' records (bench.results.record.combine_rank_records).

Under a FakeTensorMode (``fake_mode``; bench/ranks/predict.py) the same code runs on fake tensors with a fake
process group: no values, no kernels, no timing — the tracker's exact tensor bytes of this rank.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

import models
from bench.case.runner import ModelFacts, finished_record, run_measured, sync, warm_up
from bench.dp.parallel import build_parallel_step
from bench.results.record import CaseRecord, RankFigures, StepMemory, StepWork, Timing
from bench.trackers.channel import PhaseMarker, no_mark
from bench.trackers.memory.measure import StepSources, measure_step
from bench.trackers.timing import MIN_ROUND_S, iterations_for, timing_from_durations

from .job import RankJob

WARM_UP_STEPS = 2


def run_rank(job: RankJob, rank: int, device: torch.device, *, mesh=None, fake_mode=None) -> CaseRecord:
    """This rank's record of ``job``; never raises for OOM, unsupported or a failed step (the status says so)."""
    workload = models.get_workload(job.case.workload)
    case = _RankCase(job, rank, device, workload, mesh, fake_mode)
    notes: list[str] = []
    outcome = run_measured(case, notes)
    record = finished_record(job.new_record(device), workload, case.facts, outcome, notes, peak_rank=rank)
    return dataclasses.replace(record, ranks=[rank_figures(record, rank)])


class _RankCase:
    """One rank's share of a many-rank case, for the run skeleton (bench.case.runner.run_measured): the parallel
    step on this rank's samples, warmed up WARM_UP_STEPS times, timed by itself. Under a FakeTensorMode nothing
    is resident and nothing is timed."""

    op_cache = None

    def __init__(self, job: RankJob, rank: int, device: torch.device, workload, mesh, fake_mode):
        self.job, self.rank, self.device, self.workload = job, rank, device, workload
        self.mesh, self.fake_mode = mesh, fake_mode
        self.resident = fake_mode is None
        self.batch_text = f"batch {job.case.batch_size} ({job.local_batch_size} per rank)"
        self.facts = ModelFacts()
        self.work = StepWork()  # no work counter on ranks
        self.cap_bytes = job.memory_cap_bytes if device.type == "cpu" else None
        self.step = self.batch = None

    def context(self) -> AbstractContextManager:
        return self.fake_mode if self.fake_mode is not None else nullcontext()

    def build(self) -> None:
        job, device, facts = self.job, self.device, self.facts
        # Under a FakeTensorMode the model is built where the mode makes fake tensors (on the CPU type).
        model = self.workload.build_model(device if self.fake_mode is None else None)
        facts.params_total, facts.params_trainable = models.parameter_counts(model)
        facts.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.batch = local_batch(self.workload, job, self.rank, device, self.fake_mode)
        self.step = build_parallel_step(
            job.case.method,
            job.case.parallel,
            self.workload,
            model,
            privacy=job.privacy,
            batch_size=job.case.batch_size,
            optimizer=job.optimizer,
            lr=job.lr,
            # The same seed on every rank: the clipped-sum methods draw identical noise after the all-reduce.
            noise_generator=torch.Generator(device=device).manual_seed(job.seed + 1),
            mesh=self.mesh,
            device_ids=[device.index] if device.type == "cuda" else None,
        )

    def _batch_tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.batch.inputs, self.batch.target)

    def _run(self, mark: PhaseMarker = no_mark):
        return self.step(self.batch, mark)

    def warm_up(self) -> float:
        extra = self._batch_tensors()
        return min(warm_up(self._run, self.step, self.device, self.cap_bytes, extra) for _ in range(WARM_UP_STEPS))

    def measure(self, nvml_baseline_bytes: int | None, notes: list[str]) -> StepMemory:
        sources = StepSources(
            self.device,
            model=self.step.model,
            optimizer=self.step.optimizer,
            sample_interval_s=self.job.sample_interval_s,
            nvml_baseline_bytes=nvml_baseline_bytes,
            memory_cap_bytes=self.cap_bytes,
            extra_state=self._batch_tensors(),
        )
        return measure_step(self._run, sources, notes)

    def time(self, one_call_s: float, notes: list[str]) -> Timing:
        if self.fake_mode is not None or not self.job.rounds:
            return Timing()
        device = self.device
        return time_rounds(lambda: (self._run(), sync(device)), self.job.rounds, one_call_s, device)

    def close(self) -> None:
        if self.step is not None:
            self.step.close()
        self.step = self.batch = None


def rank_figures(record: CaseRecord, rank: int) -> RankFigures:
    """The per-rank summary of this rank's own record."""
    memory = record.memory
    return RankFigures(
        rank=rank,
        status=record.status,
        reason=record.reason,
        host=socket.gethostname(),
        device=_rank_device_name(record),
        peak_tensor_bytes=memory.peak_tensor_bytes,
        baseline_tensor_bytes=memory.baseline_tensor_bytes,
        peak_allocated_bytes=memory.peak_allocated_bytes,
        peak_reserved_bytes=memory.peak_reserved_bytes,
        nvml_peak_minus_baseline_bytes=memory.nvml_peak_minus_baseline_bytes,
        nvml_process_peak_bytes=memory.nvml_process_peak_bytes,
        peak_rss_bytes=memory.peak_rss_bytes,
        time_median_s=record.timing.time_median_s,
    )


def _rank_device_name(record: CaseRecord) -> str:
    if record.device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return record.device


def local_batch(workload, job: RankJob, rank: int, device: torch.device, fake_mode=None) -> models.Batch:
    """Rank ``rank``'s contiguous share of the case's global batch, in storages of its own (a view would keep
    the whole global batch alive and counted); fake tensors under ``fake_mode``."""
    n = job.local_batch_size
    with _real_tensors(fake_mode):
        whole = workload.make_batch(job.case.batch_size, generator=torch.Generator().manual_seed(job.seed))
        share = whole.select(slice(rank * n, (rank + 1) * n))
        own = models.Batch(tuple(t.clone() for t in share.inputs), share.target.clone())
    if fake_mode is not None:
        return models.Batch(tuple(fake_mode.from_tensor(t) for t in own.inputs), fake_mode.from_tensor(own.target))
    return own.to(device)


def _real_tensors(fake_mode):
    """A context where factories make real tensors even inside ``fake_mode`` (the batch's values are drawn)."""
    if fake_mode is None:
        return nullcontext()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def agreed_iterations(iterations: int, device: torch.device) -> int:
    """The largest of the ranks' ``iterations``, on every rank.

    Each rank calibrates its calls per round from its own warm-up step, and on a loaded machine the ranks' warm-ups
    differ. A parallel step is a collective: a rank that runs more calls than the others waits in an all-reduce
    for peers that have already finished, and fails when they leave ("Connection closed by peer"). The largest
    count keeps every rank's round at least MIN_ROUND_S long."""
    count = torch.tensor([iterations], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def time_rounds(run: Callable[[], object], rounds: int, one_call_s: float, device: torch.device) -> Timing:
    """``rounds`` timed rounds of ``run`` (each repeated until it lasts MIN_ROUND_S, as bench/trackers/timing.py does
    for pytest-benchmark); times are per call. A rank has no pytest-benchmark: it times itself. Inside a process
    group every rank runs the same number of calls (:func:`agreed_iterations`)."""
    iterations = iterations_for(one_call_s, MIN_ROUND_S)
    if dist.is_available() and dist.is_initialized():
        iterations = agreed_iterations(iterations, device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iterations):
            run()
        times.append((time.perf_counter() - start) / iterations)
    return timing_from_durations(times, iterations)
