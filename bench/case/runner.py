"""Run one bench case (workload × method × batch size × device × training mode) and return its :class:`CaseRecord`.

The order inside a case: build model, prepare it for the training mode (``bench.dp.prepare_model``: bf16
weights, checkpointed blocks — a mode the device or workload cannot run is ``unsupported``), batch and fused
step → one warm-up step → one measured round (samplers
and tensor tracker attached) → timed rounds (nothing attached) → release everything. The measured round comes
before the timed rounds so that a step over the CPU memory cap (enforced in the warm-up and the measured round)
is an ``oom`` result before it is ever timed. Out-of-memory and unsupported combinations are results, not
exceptions; anything else is recorded as ``error`` and re-raised by the caller as a test failure. An
out-of-memory error counts wherever it sits in an exception's chain, so no method's own error handling can turn
it into ``unsupported``; a workload that breaks the workload contract (models/contract.py) is an ``error`` named
once, before any method runs.

The skeleton of that order, :func:`run_measured`, is handed the device-specific pieces of a case (a
:class:`MeasuredCase`: build, warm up, measure, time, close) and returns an :class:`Outcome`; the record is built
once from it (:func:`finished_record`). It serves the one-process case (``_DeviceCase``, ``_MetaCase``) and a
rank of a many-rank case (bench/ranks/step.py).

Isolation: every case starts and ends at a case boundary (:mod:`bench.trackers.memory.isolation`: garbage collection,
the caching allocator emptied, peak statistics reset, the NVML baseline read), so its figures do not depend
on the cases that ran before it in the same process (tested in tests/bench/).

On the meta device (bench/case/meta_device.py) the same steps run on meta tensors: the model is a copy of one built on
meta, the batch is drawn on CPU with the seeded generator and moved to meta, the DP step draws its noise
without a generator (meta tensors hold no values), there are no timed rounds and no samplers — the measured
round's tensor tracker gives the record's figures, marked ``measurement: "predicted"``. The warm-up step still
runs: it creates the optimizer state (AdamW's moments) and whatever a method builds lazily (Opacus), which the
measured step must find as in a real run. Every step runs under the ``--attention`` choice (bench/case/attention.py)
and the ``--optimizer-impl`` one.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch

import models
from bench import dp
from bench.case.attention import AttentionUnsupported, attention_in_forward
from bench.case.jax_case import JaxCase, is_jax_method
from bench.case.meta_device import MetaOpCache, ValuedOpCache, meta_model, unsupported_reason
from bench.case.spec import CaseSpec, new_record
from bench.config.settings import BenchConfig
from bench.dp.autocast_emulation import meta_autocast
from bench.dp.errors import error_text, exception_chain, out_of_memory_in
from bench.plan.timemodel import time_estimate
from bench.ranks.launch import run_ranked_case
from bench.results.record import CaseRecord, StepMemory, StepWork, Timing
from bench.system.devices import resolve_device
from bench.trackers.channel import PhaseMarker, no_mark
from bench.trackers.memory.isolation import end_case, start_case
from bench.trackers.memory.measure import StepSources, measure_step
from bench.trackers.memory.tensors import TensorTracker
from bench.trackers.timing import Reference, StepTimer
from bench.trackers.work import WorkCounter, counted
from models.contract import check_workload_contract

BASELINE_METHOD = dp.nondp.NonDP.name  # every other method's timed rounds are paired with its step

# Characters actions/upload-artifact (v4) refuses in a path, and path separators: replaced in snapshot file names.
_UNSAFE_IN_FILE_NAMES = re.compile(r'[":<>|*?\\/\s]')


def snapshot_path(config: BenchConfig, spec: CaseSpec) -> str:
    """Where ``--snapshot`` writes this case's allocator snapshot: the case id with ``:`` (``cuda:0``, workload
    specs) and other characters CI artifact uploads refuse replaced by ``_``; the record names the case."""
    return f"{config.measure.snapshot_dir}/{_UNSAFE_IN_FILE_NAMES.sub('_', spec.case_id)}.pickle"


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA), so that a duration is the step's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str, device: torch.device) -> str | None:
    """Make ``optimizer`` use ``impl`` ("foreach", "for-loop" or "auto") and return the one it will run.

    ``auto`` keeps torch's default for the device (``_default_to_fused_or_foreach``: foreach when every parameter
    is on CUDA, the per-parameter loop on CPU), except on meta, where it is CUDA's: the prediction is for a GPU,
    and foreach AdamW holds a parameter-sized temporary (its ``_foreach_sqrt`` of the second moments) that the
    loop does not. Opacus' DPOptimizer is unwrapped to the optimizer that steps. None: not a torch.optim one."""
    optimizer = dp.base_optimizer(optimizer)
    groups = [g for g in optimizer.param_groups if "foreach" in g]
    if not groups:
        return None
    if impl == "auto" and device.type != "meta":
        from torch.optim.optimizer import _default_to_fused_or_foreach  # torch's own rule (private, stable API)

        params = [p for g in groups for p in g["params"]]
        foreach = all(g["foreach"] for g in groups if g["foreach"] is not None) and (
            any(g["foreach"] for g in groups) or _default_to_fused_or_foreach(params, False, False)[1]
        )
    else:
        foreach = impl in ("auto", "foreach")  # auto on meta: CUDA's default
        for group in groups:
            group["foreach"] = foreach
    return "foreach" if foreach else "for-loop"


def memory_cap_for(device: torch.device, config: BenchConfig) -> int | None:
    """The live-tensor-byte cap of a case: ``--memory-cap`` on CPU; none on a GPU (its capacity decides) or meta."""
    return config.measure.memory_cap_bytes if device.type == "cpu" else None


def warm_up(
    run: Callable[[], object], step, device: torch.device, cap_bytes: int | None, extra: Sequence[torch.Tensor] = ()
) -> float:
    """One untimed call of ``run`` (allocator pools, cuBLAS workspaces, optimizer state, Opacus' lazy state; the
    attention kernel observed); returns its duration. Under a CPU memory cap it runs under the capped tensor
    tracker (counting as the measured round counts; ``extra``: more state declared to it, e.g. a rank's batch),
    so a case too large for the machine becomes ``oom`` instead of taking the machine down."""
    start = time.perf_counter()
    if cap_bytes is not None:
        tracker = TensorTracker(device, cap_bytes=cap_bytes)  # its figures are discarded: only the cap matters here
        tracker.register_state(step.model, step.optimizer, extra=extra)
        with tracker:
            run()
    else:
        run()
    sync(device)
    return time.perf_counter() - start


# Methods whose first step builds state of its own (Opacus wraps the model and its optimizer and fills them
# lazily): on meta they get the full warm-up step. Every other method's step leaves only what the optimizer
# holds and the gradients it was given, which _meta_state_warm_up recreates without running the model
# (tests/bench/test_meta.py checks, for every other registered method, that both warm-ups give the same record).
FULL_WARM_UP_ON_META = ("opacus-hooks", "opacus-functorch", "opacus-ew", "opacus-ghost")


def _meta_state_warm_up(step) -> None:
    """What a warm-up step leaves behind, without running the model: every trainable parameter holds a
    gradient and the optimizer has stepped once on it (AdamW's moments exist); an amp-fp16 GradScaler holds its
    scale and growth tracker. On meta the values do not exist, so only the tensors' existence and shapes
    matter; this costs one optimizer step instead of a whole DP step (for the per-sample loop, instead of B
    forward/backward passes)."""
    optimizer = dp.base_optimizer(step.optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    scaler = getattr(step, "scaler", None)
    if scaler is not None:  # amp-fp16: a step leaves the GradScaler's scale and growth tracker (made lazily)
        scaler.scale(torch.ones((), device="meta"))


class _AttentionRun:
    """``step(batch, mark)`` under the ``--attention`` choice; remembers the kernels that ran."""

    def __init__(self, step, batch, config: BenchConfig, device: torch.device):
        self.step, self.batch, self.device = step, batch, device
        self.choice, self.sm = config.step.attention, config.step.attention_sm
        self.kernels: set[str] = set()

    def __call__(self, mark: PhaseMarker = no_mark, observe: bool = False):
        with attention_in_forward(self.step.model, self.choice, self.device.type, observe=observe, sm=self.sm) as mode:
            out = self.step(self.batch, mark)
        if mode is not None:
            self.kernels |= mode.kernels
        return out


def _new_step(method: str, spec: CaseSpec, config: BenchConfig, workload, model, noise_generator):
    """The fused step of ``method`` for the case's batch size and training mode (``model`` prepared for it)."""
    return dp.build_step(
        method,
        workload,
        model,
        privacy=config.step.privacy,
        batch_size=spec.batch_size,
        optimizer=config.step.optimizer,
        noise_generator=noise_generator,
        mode=spec.mode,
    )


class _NonDPReference:
    """The non-DP step a DP case's timed rounds are paired with (bench/trackers/timing.py): the same workload, batch
    case's own tensors), training mode, device, attention choice and optimizer implementation, on a model of its
    own. Built and warmed up only when the timer pairs rounds — after the measured round, so no memory figure
    sees it — and closed with the case. If it cannot run (e.g. no memory beside the method's model), the
    method's rounds are timed unpaired and a note says why."""

    def __init__(self, spec: CaseSpec, config: BenchConfig, workload, device: torch.device, batch, notes: list[str]):
        self.spec, self.config, self.workload, self.device = spec, config, workload, device
        self.batch, self.notes = batch, notes
        self.step = None

    def __call__(self) -> Reference | None:
        spec, config, device = self.spec, self.config, self.device
        try:
            model = self.workload.build_model(device)
            dp.prepare_model(model, self.workload, spec.mode, device)
            self.step = _new_step(BASELINE_METHOD, spec, config, self.workload, model, None)
            set_optimizer_impl(self.step.optimizer, config.step.optimizer_impl, device)
            run = _AttentionRun(self.step, self.batch, config, device)
            start = time.perf_counter()
            run()  # the warm-up: optimizer state, allocator pools
            sync(device)
            one_call_s = time.perf_counter() - start
        except Exception as exc:
            self.notes.append(f"timing: no non-DP step to pair the rounds with ({error_text(exc)}); unpaired rounds")
            for link in exception_chain(exc):
                link.__traceback__ = None
            self.close()
            return None
        return Reference(lambda: (run(), sync(device)), one_call_s)

    def close(self) -> None:
        if self.step is not None:
            self.step.close()
        self.step = self.batch = None


def _what_ranks_cannot_run(spec: CaseSpec, config: BenchConfig) -> str | None:
    """Why a many-rank case cannot honour a setting, or None. bench/ranks' workers build their own model and
    step: fp32 without checkpointing, torch's own attention kernel and optimizer implementation. Running the
    case anyway would measure something other than what was asked."""
    if spec.mode != dp.DEFAULT_MODE:
        return f"training mode {spec.mode.label}: cases on many ranks run fp32 full training without checkpointing only"
    if config.step.attention != "auto" or config.step.optimizer_impl != "auto":
        return (
            f"--attention {config.step.attention} --optimizer-impl {config.step.optimizer_impl}: cases on many ranks "
            "run torch's own attention kernel and optimizer implementation only (auto)"
        )
    return None


def run_case(spec: CaseSpec, config: BenchConfig, timer: StepTimer | None) -> CaseRecord:
    """Run the case (no timed rounds when ``timer`` is None, as in the max-batch search, or on meta); never
    raises for OOM or unsupported (the status says so); any other failure is recorded with status 'error'. A case
    on many ranks is launched by torchrun (bench/ranks), whose ranks time themselves."""
    if spec.world_size > 1:
        ranks_cannot = _what_ranks_cannot_run(spec, config)
        if ranks_cannot is not None:
            return dataclasses.replace(new_record(spec, config), status="unsupported", reason=ranks_cannot)
        return run_ranked_case(spec, config)
    base = new_record(spec, config)
    device = resolve_device(spec.device)
    workload = models.get_workload(spec.workload)
    if is_jax_method(spec.method):  # one XLA program, not torch ops: its own case kind (bench/case/jax_case.py)
        reference = partial(_NonDPReference, spec, config, workload, device)
        case = JaxCase(spec, config, workload, device, timer, reference)
    else:
        case = (_MetaCase if device.type == "meta" else _DeviceCase)(spec, config, workload, device, timer)
    notes = list(case.first_notes)
    outcome = run_measured(case, notes)
    record = finished_record(
        base,
        workload,
        case.facts,
        outcome,
        notes,
        attention=config.step.attention,
        attention_kernels=case.kernels,
        measurement=case.measurement,
    )
    if case.measurement == "predicted" and record.status == "ok":  # meta: its step time on --gpu, estimated
        record = dataclasses.replace(record, estimate=time_estimate(record.work, config.capacity.estimate_gpu))
    return record


# --- the one skeleton of a measured case: a one-process case here, a rank in bench/ranks/step.py ----------------


@dataclass
class ModelFacts:
    """What building a case learns of its model and step (the record's defaults until then)."""

    params_total: int | None = None
    params_trainable: int | None = None
    dtype: str = "float32"
    optimizer_impl: str | None = None


@dataclass(frozen=True)
class Outcome:
    """How a measured case ended, and its figures (defaults: nothing measured)."""

    status: str = "ok"
    reason: str = ""
    memory: StepMemory = dataclasses.field(default_factory=StepMemory)
    timing: Timing = dataclasses.field(default_factory=Timing)
    work: StepWork = dataclasses.field(default_factory=StepWork)


class MeasuredCase(Protocol):
    """The pieces of a case that differ by where it runs (a device, meta, one rank), handed to :func:`run_measured`.

    ``build`` makes the model, batch and step (learning ``facts`` as it goes: a later failure keeps them);
    ``warm_up`` returns the duration of its untimed call(s); ``measure`` runs the measured round; ``time`` the
    timed rounds (an empty Timing: none); ``close`` releases the step and drops every tensor of the case."""

    device: torch.device
    resident: bool  # its tensors hold real memory: the run starts and ends at a case boundary
    batch_text: str  # how an out-of-memory reason names the batch
    op_cache: MetaOpCache | None  # on meta: names a value-dependent op as the failure
    facts: ModelFacts
    work: StepWork  # the measured round's work counts (empty where nothing counts them: JAX, ranks)

    def context(self) -> AbstractContextManager: ...
    def build(self) -> None: ...
    def warm_up(self) -> float: ...
    def measure(self, nvml_baseline_bytes: int | None, notes: list[str]) -> StepMemory: ...
    def time(self, one_call_s: float, notes: list[str]) -> Timing: ...
    def close(self) -> None: ...


def run_measured(case: MeasuredCase, notes: list[str]) -> Outcome:
    """case boundary → build → warm-up → one measured round → timed rounds → release → case boundary.

    Out-of-memory and unsupported combinations are outcomes, not exceptions (:func:`failure_status`); so is any
    other failure (``error``), its traceback dropped so that it keeps no tensor alive. ``notes`` gets a line per
    problem a source or the timer saw."""
    # Before the case allocates anything. Cases that hold nothing resident (meta, fake tensors) skip the
    # boundaries' full garbage collections (~0.3 s each with torch imported: most of a small meta case).
    nvml_baseline = start_case(case.device, notes) if case.resident else None
    memory, timing, work, status, reason = StepMemory(), Timing(), StepWork(), "ok", ""
    try:
        with case.context():
            case.build()
            one_call_s = case.warm_up()
            memory = case.measure(nvml_baseline, notes)
            timing = case.time(one_call_s, notes)
        work = case.work
    except Exception as exc:  # classified here; the traceback must not keep tensors alive
        status, reason = failure_status(exc, case.batch_text, case.op_cache)
        for link in exception_chain(exc):
            link.__traceback__ = None
    finally:
        case.close()  # drop this case's tensors before the next case starts
        if case.resident:
            end_case(case.device)  # collects garbage first
    return Outcome(status, reason, memory, timing, work)


def finished_record(
    base: CaseRecord, workload, facts: ModelFacts, outcome: Outcome, notes: list[str], **fields
) -> CaseRecord:
    """The record of a measured case: ``base`` (the case before anything ran), the workload's and the model's
    facts, the outcome, the notes, and ``fields`` of the runner's own (attention, rank)."""
    return dataclasses.replace(
        base,
        tokens_per_sample=workload.tokens_per_sample,
        family=workload.family,
        overrides=dict(workload.overrides),
        params_total=facts.params_total,
        params_trainable=facts.params_trainable,
        dtype=facts.dtype,
        optimizer_impl=facts.optimizer_impl,
        status=outcome.status,
        reason=outcome.reason,
        memory=outcome.memory,
        timing=outcome.timing,
        work=outcome.work,
        notes=notes,
        **fields,
    )


class _DeviceCase:
    """A one-process case on a CPU or GPU: between case boundaries, warmed up under the CPU memory cap, timed by
    ``timer`` (paired with the non-DP step for a DP method)."""

    resident = True
    measurement = "measured"
    first_notes: tuple[str, ...] = ()

    def __init__(self, spec: CaseSpec, config: BenchConfig, workload, device: torch.device, timer: StepTimer | None):
        self.spec, self.config, self.workload, self.device, self.timer = spec, config, workload, device, timer
        self.batch_text = f"batch {spec.batch_size}"
        self.op_cache: MetaOpCache | None = None
        self.facts = ModelFacts()
        self.work = StepWork()
        self.kernels: list[str] = []  # the attention kernels of the warm-up and measured steps
        self.step = self.batch = self.run = self.reference = None

    def context(self) -> AbstractContextManager:
        return nullcontext()

    def _model(self):
        return self.workload.build_model(self.device)

    def _noise_generator(self) -> torch.Generator | None:
        return torch.Generator(device=self.device).manual_seed(self.config.step.seed + 1)

    def build(self) -> None:
        spec, config, workload, device, facts = self.spec, self.config, self.workload, self.device, self.facts
        model = self._model()
        # the user's bug, named once, before any method runs; checked where the model lives
        check_workload_contract(workload, model, next(model.parameters()).device)
        dp.prepare_model(model, workload, spec.mode, device)  # reads no values: the same on meta
        # after preparation: LoRA's adapters count, frozen parameters do not train
        facts.params_total, facts.params_trainable = models.parameter_counts(model)
        facts.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        generator = torch.Generator().manual_seed(config.step.seed)
        self.batch = workload.make_batch(spec.batch_size, generator=generator, device=device)
        self.step = _new_step(spec.method, spec, config, workload, model, self._noise_generator())
        facts.optimizer_impl = set_optimizer_impl(self.step.optimizer, config.step.optimizer_impl, device)
        self.run = _AttentionRun(self.step, self.batch, config, device)

    def warm_up(self) -> float:
        return warm_up(lambda: self.run(observe=True), self.step, self.device, memory_cap_for(self.device, self.config))

    def measure(self, nvml_baseline_bytes: int | None, notes: list[str]) -> StepMemory:
        config, spec, device = self.config, self.spec, self.device
        snapshot = config.measure.snapshot_case in (spec.case_id, "all")
        sources = StepSources(
            device,
            model=self.step.model,
            optimizer=self.step.optimizer,
            sample_interval_s=config.measure.sample_interval_s,
            nvml_baseline_bytes=nvml_baseline_bytes,
            snapshot_path=snapshot_path(config, spec) if snapshot else None,
            memory_cap_bytes=memory_cap_for(device, config),
        )
        counter = WorkCounter()  # entered inside the tensor tracker: it sees every op the tracker sees
        memory = measure_step(counted(self.run, counter), sources, notes)
        self.work = counter.work()
        self.kernels = sorted(self.run.kernels)
        return memory

    def time(self, one_call_s: float, notes: list[str]) -> Timing:
        if self.timer is None:
            return Timing()
        spec, run, device = self.spec, self.run, self.device
        if spec.method != BASELINE_METHOD:
            self.reference = _NonDPReference(spec, self.config, self.workload, device, self.batch, notes)
        return self.timer(lambda: (run(), sync(device)), one_call_s, self.reference, notes)

    def close(self) -> None:
        if self.reference is not None:
            self.reference.close()
        if self.step is not None:
            self.step.close()
        self.step = self.batch = self.run = self.reference = None


class _MetaCase(_DeviceCase):
    """A one-process case on meta tensors: nothing resident (no case boundaries, no samplers), the ops' outcomes
    cached, the state warm-up for most methods, no timed rounds; its figures are ``predicted``."""

    resident = False
    measurement = "predicted"

    def __init__(self, spec: CaseSpec, config: BenchConfig, workload, device: torch.device, timer: StepTimer | None):
        super().__init__(spec, config, workload, device, timer)
        self.op_cache = ValuedOpCache()  # the batch's integer tensors keep their values (meta_values.py)
        self.first_notes = (
            "meta device: predicted tensor bytes; no kernel ran, so no timing and no NVML/RSS",
            *config.output.meta_notes,
        )

    def context(self) -> AbstractContextManager:
        # amp's torch.autocast(device_type="meta") is emulated while the case runs (bench/dp/autocast_emulation.py)
        stack = ExitStack()
        stack.enter_context(meta_autocast())
        stack.enter_context(self.op_cache)
        return stack

    def _model(self):
        return meta_model(self.workload, self.spec.mode.trainable)

    def _noise_generator(self) -> None:
        return None  # meta tensors hold no values: nothing to draw noise with (the noise tensor is still made)

    def warm_up(self) -> float:
        if self.spec.method in FULL_WARM_UP_ON_META:
            return super().warm_up()
        _meta_state_warm_up(self.step)
        return 0.0

    def time(self, one_call_s: float, notes: list[str]) -> Timing:
        return Timing()


def failure_status(exc: BaseException, batch: str, op_cache: MetaOpCache | None = None) -> tuple[str, str]:
    """(status, reason) of a case that raised: oom (first: an OOM wins over any method's own wrapping of it;
    ``batch`` says which batch), unsupported (the method's, the training mode's or attention's refusal, or a
    value-dependent op on meta), else error. Shared with the ranks of a many-rank case (bench/ranks/step.py)."""
    oom = out_of_memory_in(exc)
    if oom is not None:
        return "oom", f"{batch}: {error_text(oom)}"
    if isinstance(exc, (dp.MethodUnsupported, dp.ModeUnsupported, AttentionUnsupported)):
        return "unsupported", str(exc)
    meta_reason = unsupported_reason(exc, op_cache.failed_op) if op_cache is not None else None
    if meta_reason is not None:
        return "unsupported", meta_reason
    return "error", error_text(exc)
