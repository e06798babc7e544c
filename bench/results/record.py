"""The result record and its JSON-lines codec: one case's status, memory figures, timing, privacy and provenance.

This is the single shape that flows from a bench case into pytest-benchmark's ``extra_info`` and the
JSON-lines file, and from either file into the reports. Every key is documented once, here.

A :class:`CaseRecord` is composed of typed parts — the case's identity and facts, the :class:`StepMemory`
that :func:`bench.trackers.memory.measure.measure_step` returns and the :class:`Timing` of the timed rounds — and is
written as *one flat JSON object* (the parts' keys side by side), so a result file reads as a plain table row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "unsupported", "error")
# How a record's figures were obtained (key ``measurement``): "measured" — the step ran on a real device (cpu,
# cuda); "predicted" — it ran on the meta device (bench/case/meta_device.py): the tensor figures are the exact live
# bytes of the step's tensor traffic with nothing allocated, and there are no allocator, NVML, RSS or timing
# figures; a max-batch answer on meta also rests on the overhead model (bench/plan/overhead.py).
# "xla-compiled": a JAX case (bench/case/jax_case.py): its tensor-byte figures are XLA's compiled buffer
# assignment of the jitted step (temp + arguments + outputs - aliases), not the tensor tracker's live bytes.
MEASUREMENTS = ("measured", "predicted", "xla-compiled")
# Training modes (bench.dp.modes, which documents them; defined here so that reading a record needs no torch).
PRECISIONS = ("fp32", "amp-bf16", "amp-fp16", "bf16")
CHECKPOINTINGS = ("none", "blocks")

# Breakdown categories of live tensor bytes at the peak (bench.trackers.memory.tensors).
# "frozen_parameters": parameters with requires_grad=False (fine-tuning, --trainable); "parameters" are the trainable
# ones and the buffers (an older record has no frozen_parameters key: everything trained).
CATEGORIES = ("parameters", "frozen_parameters", "gradients", "optimizer_state", "activations", "per_sample", "other")


# Work counts (bench/trackers/work.py): the op classes, and the phases ops are counted in: bench.trackers.channel's
# PHASES (repeated here so that reading a record needs no torch) and "outside" (before the first mark, after "end").
OP_CLASSES = ("matmul", "attention", "elementwise", "copy")
WORK_PHASES = ("forward", "backward", "clip", "noise", "optimizer", "outside")


class RecordError(ValueError):
    """A record that does not parse (wrong type, missing key, newer schema); the message is one line."""


@dataclass
class Phase:
    """One phase of the measured step: name in bench.dp.PHASES, start/end in seconds since the step began."""

    name: str
    start_s: float
    end_s: float


@dataclass
class Timeline:
    """Downsampled traces of the measured step; all lists have the length of ``t_s`` or are empty.

    ``tensor_bytes``: live tensor bytes (tracker); ``nvml_used_bytes``: device-wide NVML used;
    ``allocated_bytes``: torch allocator allocated (CUDA only); ``rss_bytes``: process RSS (CPU only)."""

    t_s: list[float] = field(default_factory=list)
    tensor_bytes: list[int] = field(default_factory=list)
    nvml_used_bytes: list[int] = field(default_factory=list)
    allocated_bytes: list[int] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)


@dataclass
class StepMemory:
    """Every memory figure of one measured step (what ``measure_step`` returns).

    Byte figures are ints, or ``None`` where that source does not apply (NVML on CPU) or failed (the record's
    ``notes`` say why)."""

    # --- exact live tensor bytes (any device; bench.trackers.memory.tensors) ------------------------------------
    peak_tensor_bytes: int | None = None  # peak of live tensor storage bytes during the step
    baseline_tensor_bytes: int | None = None  # live bytes when the step started (params, grads, opt state)
    breakdown: dict[str, int] = field(default_factory=dict)  # CATEGORIES -> bytes live at the peak
    peak_phase: str | None = None  # phase during which peak_tensor_bytes was reached
    # of baseline_tensor_bytes: storages the tracker first saw as op inputs during the step, declared nowhere
    # (the batch in a one-process case; on CPU ranks, gloo's own copies made in its thread), counted from the start
    adopted_tensor_bytes: int | None = None

    # --- torch CUDA caching allocator (bench.trackers.memory.allocator) -----------------------------------------
    peak_allocated_bytes: int | None = None  # torch.cuda.max_memory_allocated over the step
    peak_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved over the step
    snapshot_path: str | None = None  # memory_viz snapshot (pickle written by torch; never read by us)

    # --- NVML (bench.trackers.memory.nvml) ----------------------------------------------------------------------
    nvml_peak_used_bytes: int | None = None  # max device-wide "used" during the step
    nvml_baseline_bytes: int | None = None  # device "used" at case start, before the case allocated anything:
    #   CUDA context + other processes (None with a note when it could not be read)
    nvml_step_start_bytes: int | None = None  # device "used" just before the measured step (model, cache, ...)
    nvml_peak_minus_baseline_bytes: int | None = None  # what this case added on the device at its peak
    nvml_peak_reserved_bytes: int | None = None  # v2 struct "reserved" (driver-reserved), where available
    nvml_process_peak_bytes: int | None = None  # this process's usedGpuMemory, polled more slowly
    nvml_samples: int = 0
    nvml_interval_s: float | None = None

    # --- process (CPU) ---------------------------------------------------------------------------------
    peak_rss_bytes: int | None = None  # max sampled RSS during the step (psutil)
    baseline_rss_bytes: int | None = None

    # --- phases and timeline ---------------------------------------------------------------------------
    phases: list[Phase] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)


@dataclass
class Timing:
    """Seconds per fused step from the timed rounds (never the measured round); ``rounds == 0``: not timed.

    A DP method's rounds alternate with rounds of the non-DP step of the same workload, batch, training mode
    and device, run in the same case (bench/trackers/timing.py): ``paired_time_ratio`` compares rounds that saw the same
    load. The load figures cover the whole timed window; ``time_reliable`` is bench.trackers.timing's verdict on them
    (None: not judged — not timed, or a record written before the verdict existed)."""

    time_median_s: float | None = None
    time_mean_s: float | None = None
    time_min_s: float | None = None
    time_max_s: float | None = None
    time_stddev_s: float | None = None
    time_iqr_s: float | None = None  # interquartile range: the dispersion the reports weigh a ratio against
    rounds: int = 0
    iterations: int = 1  # step calls per round (pytest-benchmark's calibration); times are per call
    torch_threads: int | None = None  # torch.get_num_threads() while timing (intra-op CPU threads)
    # --- per round, per call, in the order they ran -------------------------------------------------------
    round_times_s: list[float] = field(default_factory=list)  # wall seconds (pytest-benchmark's rounds)
    round_cpu_s: list[float] = field(default_factory=list)  # this process's CPU seconds, all threads summed
    cpu_time_median_s: float | None = None  # median of round_cpu_s
    # --- the non-DP rounds interleaved with a DP method's (none for nondp itself) --------------------------
    # rounds + 1 of them: one before the first method round and one after each
    paired_nondp_round_times_s: list[float] = field(default_factory=list)
    paired_nondp_round_cpu_s: list[float] = field(default_factory=list)
    paired_nondp_iterations: int | None = None  # non-DP step calls per round (calibrated like ``iterations``)
    # median over the method's rounds of (its round ÷ the mean of the non-DP rounds either side of it)
    paired_time_ratio: float | None = None
    paired_time_ratio_iqr: float | None = None  # interquartile range of those per-round ratios
    # --- the machine while the rounds ran (bench/trackers/contention.py; None where the OS has no such figure) ---
    load_average_1m: float | None = None  # as the timed rounds began (this process's threads included)
    cpus_available: int | None = None  # CPUs this process may run on
    cpu_wait_fraction: float | None = None  # of the time this process's threads were runnable, the share waiting
    other_cpus_busy: float | None = None  # mean CPUs kept busy by every other process
    cpu_steal_fraction: float | None = None  # share of the machine's CPU time the hypervisor took
    time_reliable: bool | None = None  # bench.trackers.timing's rule
    time_unreliable_reason: str = ""  # why not, one line ("" when reliable or not judged)


@dataclass
class OpGroup:
    """Ops of one step with the same class, dtype, FLOPs and bytes (one aten op at one shape, usually), and how
    many ran: what a roofline time model needs per op, for any GPU (bench/plan/timemodel.py)."""

    op_class: str  # OP_CLASSES
    dtype: str  # the op's first floating-point input's dtype, e.g. "float32"
    flops: int  # of one op
    bytes_accessed: int  # of one op: its inputs' and outputs' bytes (no fusion)
    count: int


@dataclass
class StepWork:
    """Exact work of the measured step (bench/trackers/work.py, which states what is counted): floating-point
    operations and bytes moved (every op's inputs + outputs: no-fusion traffic), in total, per phase
    (WORK_PHASES) and per op class (OP_CLASSES), the number of kernel-launching ops, and the op groups.
    ``None`` / empty: not counted (a failed case, a case on many ranks, a record older than the counter)."""

    flops: int | None = None
    bytes_accessed: int | None = None
    op_count: int | None = None  # ops that launch a kernel (views and bare allocations excluded)
    flops_by_phase: dict[str, int] = field(default_factory=dict)
    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    flops_by_class: dict[str, int] = field(default_factory=dict)
    bytes_by_class: dict[str, int] = field(default_factory=dict)
    ops_by_class: dict[str, int] = field(default_factory=dict)
    op_groups: list[OpGroup] = field(default_factory=list)


@dataclass
class TimeEstimate:
    """The step time the roofline model (bench/plan/timemodel.py) gives for the record's work counts on one GPU of
    the catalogue (bench/plan/gpus.py): a *predicted* figure, never a measurement. ``None`` / empty: no estimate
    (a measured record, a case without work counts, a GPU without datasheet peaks — ``estimate_reason`` says)."""

    estimated_step_s: float | None = None
    estimate_gpu: str | None = None  # catalogue name of the GPU estimated for, e.g. "h100-80gb"
    estimate_calibrated: bool | None = None  # False: datasheet peaks x default efficiencies (uncalibrated)
    estimate_source: str = ""  # where the rates come from, one line (the Roofline's label)
    estimate_reason: str = ""  # why there is no estimate, one line ("" when there is one or none was asked)


# Per-rank figures of a case run on many ranks (``RankFigures``), summarised over the ranks in ``rank_max`` and
# ``rank_mean`` (the ranks that reported the figure).
RANK_FIGURES = (
    "peak_tensor_bytes",
    "baseline_tensor_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_minus_baseline_bytes",
    "nvml_process_peak_bytes",
    "peak_rss_bytes",
    "time_median_s",
)
PARALLEL_STRATEGIES = ("ddp", "fsdp")


@dataclass
class RankFigures:
    """What one rank of a many-rank case measured on its own step (bench/ranks): its device's figures only.

    ``status``/``reason`` are that rank's; byte figures as in :class:`StepMemory` (None where the source does
    not apply or the rank failed), ``time_median_s`` from the rank's own timed rounds."""

    rank: int  # global rank (0 … world_size − 1)
    status: str = "ok"
    reason: str = ""
    host: str | None = None  # the node it ran on (socket.gethostname())
    device: str | None = None  # its device, e.g. "cuda:3" (LOCAL_RANK) or "cpu"
    peak_tensor_bytes: int | None = None
    baseline_tensor_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    nvml_peak_minus_baseline_bytes: int | None = None
    nvml_process_peak_bytes: int | None = None
    peak_rss_bytes: int | None = None
    time_median_s: float | None = None


def summarize_ranks(ranks: list[RankFigures]) -> tuple[dict[str, int | float], dict[str, float]]:
    """(max, mean) of every :data:`RANK_FIGURES` figure over the ranks that have it (a figure no rank has is left
    out of both)."""
    maxima: dict[str, int | float] = {}
    means: dict[str, float] = {}
    for name in RANK_FIGURES:
        values = [v for v in (getattr(r, name) for r in ranks) if v is not None]
        if values:
            maxima[name] = max(values)
            means[name] = sum(values) / len(values)
    return maxima, means


@dataclass
class CaseRecord:
    """Everything measured for one bench case (workload × method × batch size × device × training mode [×
    world size × parallel strategy]).

    A case on many ranks (``world_size`` > 1, bench/ranks) holds one :class:`RankFigures` per rank in
    ``ranks``; its ``memory`` and ``timing`` are those of ``peak_rank``, the rank with the highest peak tensor
    bytes (its breakdown, phases and timeline belong together), so ``peak_tensor_bytes`` is the per-rank peak
    that decides whether the case fits."""

    # --- the case -------------------------------------------------------------------------------------
    workload: str  # the workload spec: registered name[:key=value...] (e.g. "gpt2-large:seq_len=128")
    method: str
    batch_size: int
    device: str
    precision: str = "fp32"  # PRECISIONS: fp32, amp-bf16, amp-fp16 (with a GradScaler), bf16 (bf16 weights)
    checkpointing: str = "none"  # CHECKPOINTINGS: none, blocks (activation checkpointing of every block)
    # which parameters train (bench/dp/trainable.py): full, bitfit, attention or lora:r=R[:alpha=A]; an older
    # record without the key trained them all (full)
    trainable: str = "full"
    # jax-privacy's microbatch size (method spec jax-privacy:microbatch=K: K examples vmapped at a time, B/K chunks
    # in sequence); None: the whole batch at once, or a method without one
    microbatch_size: int | None = None
    status: str = "ok"  # one of STATUSES
    reason: str = ""  # why not ok: the library's real error (+ diagnosis), or the OOM message

    memory: StepMemory = field(default_factory=StepMemory)
    timing: Timing = field(default_factory=Timing)
    work: StepWork = field(default_factory=StepWork)  # FLOPs and bytes of the measured step (an older record: none)
    estimate: TimeEstimate = field(default_factory=TimeEstimate)  # predicted step time on a GPU (meta records)

    # --- many ranks (bench/ranks; docs/ranks.md) --------------------------------------------------------
    world_size: int = 1  # ranks the case ran on; 1: one process, no parallel strategy
    parallel: str | None = None  # PARALLEL_STRATEGIES: "ddp" or "fsdp" (None when world_size == 1)
    # batch_size is the *global* logical batch: each rank steps on batch_size / world_size samples
    ranks: list[RankFigures] = field(default_factory=list)  # one per rank that reported, by rank
    rank_max: dict[str, int | float] = field(default_factory=dict)  # RANK_FIGURES name -> max over ranks
    rank_mean: dict[str, float] = field(default_factory=dict)  # RANK_FIGURES name -> mean over ranks
    peak_rank: int | None = None  # the rank whose memory and timing the record carries

    # --- privacy, optimizer and model facts ------------------------------------------------------------
    overrides: dict[str, Any] = field(default_factory=dict)  # the spec's workload overrides, parsed
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    optimizer: str | None = None
    params_total: int | None = None
    params_trainable: int | None = None
    tokens_per_sample: int | None = None
    family: str | None = None  # workload family: "dit", "gpt" or "custom" (bring-your-own)
    dtype: str = "float32"  # the weights' dtype (bfloat16 under precision bf16)
    measurement: str = "measured"  # one of MEASUREMENTS: "predicted" for a meta-device case
    attention: str = "auto"  # --attention: the SDPA kernel asked for (bench/case/attention.py)
    # SDPA kernels that ran ("math", "efficient", "flash", "cudnn"): routed to, emulated on meta, or observed
    # in the warm-up step for auto on cpu/cuda; [] when the model calls no scaled_dot_product_attention
    attention_kernels: list[str] = field(default_factory=list)
    optimizer_impl: str | None = None  # "foreach" or "for-loop": the torch.optim implementation the step used

    # --- provenance ------------------------------------------------------------------------------------
    device_name: str | None = None  # e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    device_memory_bytes: int | None = None  # total memory of the device (GPU) or machine (CPU)
    runner_label: str | None = None  # $DPMEM_RUNNER_LABEL (CI runner), compares GPUs across machines
    notes: list[str] = field(default_factory=list)  # one line each: e.g. "NVML: library not found"
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """One flat JSON-able dict (the memory and timing keys beside the case's own); non-finite floats become
        the strings "inf"/"nan" so strict JSON parsers read it."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _PARTS}
        flat = {**own, **{k: v for part in _PARTS for k, v in dataclasses.asdict(getattr(self, part)).items()}}
        return _jsonable({k: _plain(v) for k, v in flat.items()})

    @classmethod
    def from_dict(cls, data: Any) -> CaseRecord:
        """The record of one flat JSON object, every field checked (:func:`_decoded`) and its ranks against its
        world size; RecordError naming the first bad field otherwise."""
        record = _decode(cls, _checked("record", data), "")
        if (record.world_size == 1) != (record.parallel is None):
            need = "no parallel strategy" if record.world_size == 1 else f"one of {', '.join(PARALLEL_STRATEGIES)}"
            raise RecordError(f"parallel {_shown(record.parallel)} with world_size {record.world_size}: needs {need}")
        ranks = [(f"ranks[{i}].rank", r.rank) for i, r in enumerate(record.ranks)]
        for where, rank in [*ranks, *([("peak_rank", record.peak_rank)] if record.peak_rank is not None else [])]:
            if rank >= record.world_size:
                raise RecordError(f"{where} {rank} is not below world_size {record.world_size}")
        seen = [rank for _, rank in ranks]
        if len(set(seen)) != len(seen):
            raise RecordError(f"ranks: rank {max(seen, key=seen.count)} appears more than once")
        return record


_PARTS = ("memory", "timing", "work", "estimate")  # CaseRecord fields written flat, their keys beside the record's own


@functools.cache
def cell_fields(cls: type) -> tuple[str, ...]:
    """The fields of a record type or part that hold one value each, a table's cells, in declaration order: not a
    part, a list or a dict (a table built from records takes its columns from here)."""
    hints = _hints(cls)
    return tuple(
        f.name
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) not in (list, dict) and not dataclasses.is_dataclass(hints[f.name])
    )


# Which status a many-rank case takes from its ranks: the worst one.
_SEVERITY = {"ok": 0, "unsupported": 1, "oom": 2, "error": 3}


def combine_rank_records(parts: list[CaseRecord]) -> CaseRecord:
    """One record of a many-rank case from records that each hold some of its ranks: one per rank (the
    launcher), or one per node (``python -m reports`` merging the nodes' result files).

    ``ranks`` is the union, by rank; the status is the worst rank's (error > oom > unsupported > ok) with its
    reason as ``"rank r: ..."``; ``memory``, ``timing`` and the model facts are those of the part holding the
    rank with the highest peak tensor bytes (``peak_rank``); ``rank_max``/``rank_mean`` are recomputed; notes
    are kept once each."""
    if not parts:
        raise ValueError("no records to combine")
    ranks = sorted({r.rank: r for part in parts for r in part.ranks}.values(), key=lambda r: r.rank)
    worst = max(ranks, key=lambda r: _SEVERITY.get(r.status, 3), default=None)
    measured = [r for r in ranks if r.peak_tensor_bytes is not None]
    peak = max(measured, key=lambda r: (r.peak_tensor_bytes, -r.rank), default=None)
    holder = next((p for p in parts if peak is not None and any(r.rank == peak.rank for r in p.ranks)), parts[0])
    maxima, means = summarize_ranks(ranks)
    status = worst.status if worst is not None else holder.status
    return dataclasses.replace(
        holder,
        status=status,
        reason=f"rank {worst.rank}: {worst.reason}" if worst is not None and status != "ok" else "",
        ranks=ranks,
        rank_max=maxima,
        rank_mean=means,
        peak_rank=peak.rank if peak is not None else None,
        notes=list(dict.fromkeys(note for part in parts for note in part.notes)),
    )


# A probe's status: a case status, or HOST_OOM — on meta, where the device never runs out of memory, the host
# (the batch is drawn on CPU, then moved to meta) could not allocate the batch: the machine's limit, not the budget's.
HOST_OOM = "host-oom"
PROBE_STATUSES = (*STATUSES, HOST_OOM)


@dataclass
class BatchProbe:
    """One batch size tried by the max-batch search: its status (PROBE_STATUSES) and peak figures."""

    batch_size: int
    status: str
    peak_tensor_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None


@dataclass
class BudgetAnswer:
    """The exact largest batch that fits one memory budget (meta max-batch): the step's tracked peak tensor bytes,
    taken through the overhead model to device bytes, at ``max_batch`` fit and at ``first_failing_batch`` do not."""

    budget_bytes: int
    max_batch: int | None = None  # None: not even batch 1 fits (or the method failed, or the host stopped it)
    first_failing_batch: int | None = None  # None: the search limit fits too, or the host stopped the search
    peak_tensor_bytes: int | None = None  # at max_batch
    device_bytes: int | None = None  # at max_batch: overhead model applied to peak_tensor_bytes
    breakdown: dict[str, int] = field(default_factory=dict)  # at max_batch, CATEGORIES -> bytes
    first_failing_device_bytes: int | None = None  # at first_failing_batch: what it would need ("batch 1 needs …")
    # the host could not draw this batch (a HOST_OOM probe) and the search stopped there: max_batch is only the
    # largest batch found to fit so far, a lower bound (None: the host never stopped the search)
    host_limit_batch: int | None = None


@dataclass
class MaxBatchRecord:
    """Result of the max-batch search for one workload × method × device.

    The affine fit peak(B) = fit_fixed_bytes + fit_per_sample_bytes · B uses the ok probes' peak figure named
    by ``fit_metric``; ``predicted_max_batch`` maps each memory size (bytes, as a string key) to the largest B
    the fit says fits in it (the device's own capacity included)."""

    workload: str
    method: str
    device: str
    precision: str = "fp32"  # the training mode every probe ran in (as CaseRecord's)
    checkpointing: str = "none"
    trainable: str = "full"
    memory_limit_bytes: int | None = None  # what "fits" meant: device capacity or the CPU memory cap
    max_batch_measured: int | None = None  # largest ok batch size (None: even batch 1 failed)
    first_failing_batch: int | None = None  # smallest batch that failed (OOM), if one was reached
    fit_metric: str = "peak_tensor_bytes"
    fit_fixed_bytes: float | None = None
    fit_per_sample_bytes: float | None = None
    predicted_max_batch: dict[str, int | None] = field(default_factory=dict)  # None: no positive slope
    probes: list[BatchProbe] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    device_name: str | None = None
    runner_label: str | None = None
    # CUDA: NVML "used" at case start (CUDA context + other processes): not available to the allocator, so it
    # is subtracted from every memory size before the fit predicts a max batch for it (None: not read)
    non_allocator_bytes: int | None = None
    # --- meta: exact answers per memory budget (bench/plan/maxbatch.py, search_budgets) -----------------------
    measurement: str = "measured"  # MEASUREMENTS; "predicted" on meta
    attention: str = "auto"
    budgets: list[BudgetAnswer] = field(default_factory=list)
    overhead_fixed_bytes: int | None = None  # the overhead model the budgets were judged with (bench/plan/overhead.py)
    overhead_fraction: float | None = None
    overhead_source: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> MaxBatchRecord:
        """The record of one JSON object, every field checked (:func:`_decoded`); RecordError otherwise."""
        return _decode(cls, _checked("max-batch record", data), "")


# JSON-lines files hold one object per line: {"record_type": "case"|"max_batch", ...the record's keys}.
RECORD_TYPES = {"case": CaseRecord, "max_batch": MaxBatchRecord}


def to_jsonl_line(record: CaseRecord | MaxBatchRecord, data: dict[str, Any] | None = None) -> str:
    """The record's JSON line; ``data``: its ``to_dict()`` where the caller made it already (the bench puts the
    same dict in pytest-benchmark's JSON), so a record is turned into JSON once."""
    kind = "case" if isinstance(record, CaseRecord) else "max_batch"
    data = record.to_dict() if data is None else data
    return json.dumps({"record_type": kind, **data}, sort_keys=True, allow_nan=False)


def from_jsonl_line(line: str) -> CaseRecord | MaxBatchRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"not JSON: {exc.msg} at column {exc.colno}") from exc
    return from_record_dict(data)


def from_record_dict(data: Any) -> CaseRecord | MaxBatchRecord:
    """A record from one parsed JSON-lines object (``record_type`` says which kind; "case" when absent)."""
    if not isinstance(data, dict):
        raise RecordError(f"line is a JSON {type(data).__name__}, not an object")
    data = dict(data)
    kind = data.pop("record_type", "case")
    if kind not in RECORD_TYPES:
        raise RecordError(f"unknown record_type {kind!r}")
    return RECORD_TYPES[kind].from_dict(data)


def _checked(kind: str, data: Any) -> dict[str, Any]:
    """``data`` if it is a dict of this or an older schema; else RecordError."""
    if not isinstance(data, dict):
        raise RecordError(f"{kind} must be a JSON object, got {type(data).__name__}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"{kind} schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise RecordError(f"{kind} schema_version {version} is newer than this suite's ({SCHEMA_VERSION})")
    return data


# ---------------------------------------------------------------------------------------------------------------
# Reading a record: every field checked against its annotated type, and against its domain below
# ---------------------------------------------------------------------------------------------------------------
# The names a text field takes, by field name (in every record type and part that has the field).
_CHOICES: dict[str, tuple[str, ...]] = {
    "status": STATUSES,
    "measurement": MEASUREMENTS,
    "precision": PRECISIONS,
    "checkpointing": CHECKPOINTINGS,
    "parallel": PARALLEL_STRATEGIES,
    "op_class": OP_CLASSES,
    "BatchProbe.status": PROBE_STATUSES,  # a meta probe the host could not draw, beside the case statuses
}
# The keys a dict field takes, by field name.
_KEYS: dict[str, tuple[str, ...]] = {
    "breakdown": CATEGORIES,
    "rank_max": RANK_FIGURES,
    "rank_mean": RANK_FIGURES,
    "flops_by_phase": WORK_PHASES,
    "bytes_by_phase": WORK_PHASES,
    "flops_by_class": OP_CLASSES,
    "bytes_by_class": OP_CLASSES,
    "ops_by_class": OP_CLASSES,
}
# Numbers are finite, not negative and an int64 at most (what a DataFrame column holds exactly), except: the
# privacy facts, infinite for a noise-free step (ε of nondp), and a fit's intercept, slope or overhead model,
# which a least-squares fit may make negative. A batch size and a world size are 1 or more.
_MAY_BE_INFINITE = {"noise_multiplier", "epsilon", "delta", "max_grad_norm", "sample_rate"}
_SIGNED = {"fit_fixed_bytes", "fit_per_sample_bytes", "overhead_fixed_bytes", "overhead_fraction"}
_AT_LEAST_ONE = {"batch_size", "world_size"}
_INT64_MAX = 2**63 - 1
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(cls: type, data: Any, path: str) -> Any:
    """An instance of the dataclass ``cls`` from its JSON object ``data`` (at ``path`` in the record), each field
    read by :func:`_decoded`. A key the class lacks is ignored (a newer minor version); a part in ``_PARTS``
    reads its keys from the same, flat, object."""
    if not isinstance(data, dict):
        raise RecordError(f"{path} {_shown(data)} is not an object")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name not in _PARTS and _required(f)]
    if missing:
        raise RecordError(f"{path or 'record'} lacks key(s) {missing}")
    values = {}
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if f.name in _PARTS:
            values[f.name] = _decode(hint, data, path)
        elif f.name in data:
            qualified = f"{cls.__name__}.{f.name}"  # a class's own rule for a field name (a probe's status)
            name = qualified if qualified in _CHOICES else f.name
            values[f.name] = _decoded(data[f.name], hint, f"{path}.{f.name}" if path else f.name, name)
    return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _decoded(value: Any, hint: Any, path: str, name: str) -> Any:
    """``value`` read as the annotated type ``hint`` of field ``name``: its type, and its domain (_CHOICES, _KEYS,
    the number rules above) checked, the strings "inf"/"nan" read back as floats; RecordError naming ``path``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _decoded(value, option, path, name)
            except RecordError as exc:
                errors.append(exc)
        raise errors[0]
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _decode(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{path} {_shown(value)} is not a list")
        return [_decoded(v, args[0], f"{path}[{i}]", name) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{path} {_shown(value)} is not an object")
        unknown = [k for k in value if name in _KEYS and k not in _KEYS[name]]
        if unknown:
            raise RecordError(f"{path} key {unknown[0]!r:.40} is not one of {', '.join(_KEYS[name])}")
        return {k: _decoded(v, args[1], f"{path}.{k}", name) for k, v in value.items()}
    if hint is str:
        if not isinstance(value, str):
            raise RecordError(f"{path} {_shown(value)} is not a string")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise RecordError(f"{path} {value!r:.40} is not one of {', '.join(_CHOICES[name])}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{path} {_shown(value)} is not true or false")
        return value
    if hint is float and isinstance(value, str) and value in _NONFINITE:
        value = _NONFINITE[value]
    problem = _number_problem(value, name)
    if problem is None and hint is int and not isinstance(value, int):
        problem = f"{value!r} is not an integer"
    if problem is None and name in _AT_LEAST_ONE and value < 1:
        problem = f"{value} is not 1 or more"
    if problem is not None:
        raise RecordError(f"{path} {problem}")
    return value


def _number_problem(value: Any, name: str) -> str | None:
    """Why ``value`` is not a number field ``name`` may hold, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{_shown(value)} is not a number"
    if isinstance(value, float) and not math.isfinite(value):
        return None if name in _MAY_BE_INFINITE else f"is {value}"
    if abs(value) > _INT64_MAX:
        return f"{len(str(int(value)))}-digit number is out of range" if isinstance(value, int) else "is out of range"
    if value < 0 and name not in _SIGNED:
        return f"{value} is negative"
    return None


def _shown(value: Any) -> str:
    """A JSON value for a one-line message: null, or its repr cut to 40 characters."""
    return "null" if value is None else f"{value!r:.40}"


def _plain(value: Any) -> Any:
    """A dataclass (or a list of them, e.g. ``ranks``) as plain dicts; anything else unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
