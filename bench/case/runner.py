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

import re
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

import models
from bench import dp
from bench.case.attention import AttentionUnsupported, attention_in_forward
from bench.case.meta_device import MetaOpCache, meta_model, unsupported_reason
from bench.case.spec import CaseSpec, new_record
from bench.config.settings import BenchConfig
from bench.dp.errors import error_text, exception_chain, out_of_memory_in
from bench.ranks.launch import run_ranked_case
from bench.results.record import CaseRecord
from bench.system.devices import resolve_device
from bench.trackers.channel import PhaseMarker, no_mark
from bench.trackers.memory.isolation import end_case, start_case
from bench.trackers.memory.measure import measure_step
from bench.trackers.memory.tensors import TensorTracker
from bench.trackers.timing import Reference, StepTimer
from models.contract import check_workload_contract

BASELINE_METHOD = dp.nondp.NonDP.name  # every other method's timed rounds are paired with its step

# Characters actions/upload-artifact (v4) refuses in a path, and path separators: replaced in snapshot file names.
_UNSAFE_IN_FILE_NAMES = re.compile(r'[":<>|*?\\/\s]')


def snapshot_path(config: BenchConfig, spec: CaseSpec) -> str:
    """Where ``--snapshot`` writes this case's allocator snapshot: the case id with ``:`` (``cuda:0``, workload
    specs) and other characters CI artifact uploads refuse replaced by ``_``; the record names the case."""
    return f"{config.measure.snapshot_dir}/{_UNSAFE_IN_FILE_NAMES.sub('_', spec.case_id)}.pickle"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_optimizer_impl(optimizer: torch.optim.Optimizer, impl: str, device: torch.device) -> str | None:
    """Make ``optimizer`` use ``impl`` ("foreach", "for-loop" or "auto") and return the one it will run.

    ``auto`` keeps torch's default for the device (``_default_to_fused_or_foreach``: foreach when every parameter
    is on CUDA, the per-parameter loop on CPU), except on meta, where it is CUDA's: the prediction is for a GPU,
    and foreach AdamW holds a parameter-sized temporary (its ``_foreach_sqrt`` of the second moments) that the
    loop does not. Opacus' DPOptimizer is unwrapped to the optimizer that steps. None: not a torch.optim one."""
    while hasattr(optimizer, "original_optimizer"):
        optimizer = optimizer.original_optimizer
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


def _warm_up(run: Callable[..., object], step, device: torch.device, config: BenchConfig) -> float:
    """One untimed step (allocator pools, cuBLAS workspaces, optimizer state, Opacus' lazy state; the attention
    kernel observed); returns its duration. On CPU with a memory cap it runs under the capped tensor tracker
    (counting as the measured round counts), so a case too large for the machine becomes ``oom`` instead of
    taking the machine down."""
    cap = memory_cap_for(device, config)
    start = time.perf_counter()
    if cap is not None:
        tracker = TensorTracker(device, cap_bytes=cap)  # its figures are discarded: only the cap matters here
        tracker.register_state(step.model, step.optimizer)
        with tracker:
            run(observe=True)
    else:
        run(observe=True)
    _sync(device)
    return time.perf_counter() - start


# Methods whose first step builds state of its own (Opacus wraps the model and its optimizer and fills them
# lazily): on meta they get the full warm-up step. Every other method's step leaves only what the optimizer
# holds and the gradients it was given, which _meta_state_warm_up recreates without running the model
# (tests/bench/test_meta.py checks, for every other registered method, that both warm-ups give the same record).
FULL_WARM_UP_ON_META = ("opacus-hooks", "opacus-functorch", "opacus-ew", "opacus-ghost")


def _meta_state_warm_up(step) -> None:
    """What a warm-up step leaves behind, without running the model: every trainable parameter holds a
    gradient and the optimizer has stepped once on it (AdamW's moments exist). On meta the values do not exist,
    so only the tensors' existence and shapes matter; this costs one optimizer step instead of a whole DP step
    (for the per-sample loop, instead of B forward/backward passes)."""
    optimizer = step.optimizer
    while hasattr(optimizer, "original_optimizer"):
        optimizer = optimizer.original_optimizer
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()


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


def _build(spec: CaseSpec, config: BenchConfig, workload, device: torch.device, record: CaseRecord):
    """(batch, fused step) of the case, on ``device``; the record gets the model's facts."""
    model = meta_model(workload) if device.type == "meta" else workload.build_model(device)
    record.params_total, record.params_trainable = models.parameter_counts(model)
    # the user's bug, named once, before any method runs; checked where the model lives
    check_workload_contract(workload, model, next(model.parameters()).device)
    dp.prepare_model(model, workload, spec.mode, device)  # reads no values: the same on meta
    record.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    generator = torch.Generator().manual_seed(config.step.seed)
    batch = workload.make_batch(spec.batch_size, generator=generator, device=device)
    # meta tensors hold no values: nothing to draw noise with (the noise tensor is still made, and counted)
    noise = None if device.type == "meta" else torch.Generator(device=device).manual_seed(config.step.seed + 1)
    step = _new_step(spec.method, spec, config, workload, model, noise)
    record.optimizer_impl = set_optimizer_impl(step.optimizer, config.step.optimizer_impl, device)
    return batch, step


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
            _sync(device)
            one_call_s = time.perf_counter() - start
        except Exception as exc:
            self.notes.append(f"timing: no non-DP step to pair the rounds with ({error_text(exc)}); unpaired rounds")
            for link in exception_chain(exc):
                link.__traceback__ = None
            self.close()
            return None
        return Reference(lambda: (run(), _sync(device)), one_call_s)

    def close(self) -> None:
        if self.step is not None:
            self.step.close()
        self.step = self.batch = None


def _what_ranks_cannot_run(spec: CaseSpec, config: BenchConfig) -> str | None:
    """Why a many-rank case cannot honour a setting, or None. bench/ranks' workers build their own model and
    step: fp32 without checkpointing, torch's own attention kernel and optimizer implementation. Running the
    case anyway would measure something other than what was asked."""
    if spec.mode != dp.DEFAULT_MODE:
        return f"training mode {spec.mode.label}: cases on many ranks run fp32 without checkpointing only"
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
    ranks_cannot = _what_ranks_cannot_run(spec, config) if spec.world_size > 1 else None
    if ranks_cannot is not None:
        record = new_record(spec, config)
        record.status, record.reason = "unsupported", ranks_cannot
        return record
    if spec.world_size > 1:
        return run_ranked_case(spec, config)
    record = new_record(spec, config)
    device = resolve_device(spec.device)
    on_meta = device.type == "meta"
    workload = models.get_workload(spec.workload)
    record.tokens_per_sample, record.family = workload.tokens_per_sample, workload.family
    record.overrides = dict(workload.overrides)
    record.attention = config.step.attention
    if on_meta:
        record.measurement = "predicted"
        record.notes.append("meta device: predicted tensor bytes; no kernel ran, so no timing and no NVML/RSS")
        record.notes.extend(config.output.meta_notes)
    # Before the case allocates anything. Meta cases hold nothing resident, so they skip the boundaries' full
    # garbage collections (~0.3 s each with torch imported: most of a small meta case).
    nvml_baseline = start_case(device, record.notes) if not on_meta else None
    step = batch = run = reference = None
    op_cache = MetaOpCache() if on_meta else None
    try:
        with op_cache if op_cache is not None else nullcontext():
            batch, step = _build(spec, config, workload, device, record)
            run = _AttentionRun(step, batch, config, device)
            if on_meta and spec.method not in FULL_WARM_UP_ON_META:
                _meta_state_warm_up(step)
                one_call_s = 0.0
            else:
                one_call_s = _warm_up(run, step, device, config)
            snapshot = config.measure.snapshot_case in (spec.case_id, "all")
            record.memory = measure_step(
                run,
                device=device,
                model=step.model,
                optimizer=step.optimizer,
                sample_interval_s=config.measure.sample_interval_s,
                nvml_baseline_bytes=nvml_baseline,
                snapshot_path=snapshot_path(config, spec) if snapshot else None,
                memory_cap_bytes=memory_cap_for(device, config),
                notes=record.notes,
            )
            record.attention_kernels = sorted(run.kernels)
            if timer is not None and not on_meta:
                if spec.method != BASELINE_METHOD:
                    reference = _NonDPReference(spec, config, workload, device, batch, record.notes)
                record.timing = timer(lambda: (run(), _sync(device)), one_call_s, reference, record.notes)
    except Exception as exc:  # classified below; the traceback must not keep tensors alive
        record.status, record.reason = failure_status(exc, f"batch {spec.batch_size}", op_cache)
        for link in exception_chain(exc):
            link.__traceback__ = None
    finally:
        if reference is not None:
            reference.close()
        if step is not None:
            step.close()
        step = batch = run = reference = None  # drop this case's tensors before the next case starts
        if not on_meta:
            end_case(device)  # collects garbage first
    return record


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
