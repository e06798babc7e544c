"""Capacity planner: which DP method trains this model at what batch on that GPU, before renting one.

    python -m bench.plan dit-xl-2-cond --gpu h100-80gb
    python -m bench.plan gpt2-large:seq_len=128 --memory 40GiB --methods nondp,bk,opacus-hooks
    python -m bench.plan dit-xl-2-cond --gpu a100-80gb --calibrate results/a100.jsonl

Every figure comes from real fused DP steps on the meta device (bench/case/meta_device.py: exact live tensor bytes,
allocated), turned into device bytes by the overhead model (bench/plan/overhead.py: defaults, ``--budget-overhead``,
or ``--calibrate`` from real GPU results). Per method it prints the largest batch that fits — exact under the
overhead model: that batch fits and the next one was run and does not (bench/plan/maxbatch.py, ``search_budgets``) —
the fixed and per-sample bytes (the line through those two steps), the breakdown of the peak at that batch, and
how the method compares with non-DP: its max batch over non-DP's, and its peak over non-DP's at the same batch
(non-DP is run at that batch too).

The per-sample loop (``microbatch``) is the exception: it runs B forward/backward passes, each as costly on meta
as a whole batched step, and its peak grows only by the batch and one loss scalar per sample, so its search
stops at ``--microbatch-limit`` (default 8) and reports "≥" that batch.

``--format md`` (the default) prints the Markdown table, reasons in full as notes under it; ``json`` and ``csv``
print the same plan for scripts: numbers as numbers (bytes, ratios), full reasons, the overhead model (and the
GPU a calibrated one was fitted to) and the torch / opacus / dpmem versions. ``--calibrate`` records must come
from the ``--gpu`` planned for; ``--calibrate-gpu NAME`` states their GPU explicitly and takes them anyway.

Under the memory table, per method at its max batch, the estimated step time on the GPU (bench/plan/timemodel.py:
a roofline over the meta step's op groups, datasheet peaks × default efficiencies, "estimated, uncalibrated"),
×nondp time at the same batch, samples/s and the FLOP and byte overheads. ``--calibrate FILES`` fits both models
from the same records: the overhead model from their memory figures, and the time model's efficiencies and launch
time from the ok CUDA records of that GPU that carry a measured step time (``time_median_s``) and work counts
(``flops``, ``bytes_accessed``, ``op_count``, ``op_groups``); records lacking them are skipped, and when none of
that GPU's records has them the plan is refused in one line naming the missing fields (exit 2) — records older
than the work counter can no longer calibrate a plan for a GPU. The efficiencies are shares of the datasheet
peaks, so records of one GPU (``--calibrate-gpu``) calibrate a plan for another; a plan for ``--memory`` has no
GPU and so no time estimate, and fits only the overhead model.

Exit status: 0 the plan was printed (unsupported methods are part of it), 1 a method failed unexpectedly,
2 a usage error (one line on stderr), 130 interrupted (Ctrl-C: one line).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import io
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from bench.config.cli import OneLineParser, usage_error
from bench.config.options import ATTENTION_CHOICES, byte_size, comma_list, positive_int
from bench.plan.gpus import DEFAULT_GPU, GPUS, Gpu, get_gpu, matching_gpus
from bench.plan.overhead import OverheadModel
from bench.results.record import CATEGORIES, HOST_OOM

PROG = "python -m bench.plan"
GIB = 2**30
MIB = 2**20
# The planner's default precision: bf16 autocast with fp32 weights, gradients and optimizer state — the common way
# DiTs and GPTs train on the GPUs a plan is for — on a GPU with bf16 (compute capability 8.0 on); fp32 on an older
# one (V100, T4: no bf16, and amp-fp16's GradScaler is what every Opacus mode refuses).
DEFAULT_PRECISION = "amp-bf16"
BF16_SM = (8, 0)


def default_precision(sm: tuple[int, int]) -> str:
    """The precision a plan for a GPU of compute capability ``sm`` runs unless ``--precision`` says otherwise."""
    return DEFAULT_PRECISION if sm >= BF16_SM else "fp32"


DEFAULT_MICROBATCH_LIMIT = 8
FORMATS = ("md", "json", "csv")


@dataclass
class PlanRow:
    """One method's answer for one memory budget."""

    method: str
    status: str = "ok"
    reason: str = ""
    max_batch: int | None = None
    at_limit: bool = False  # the search limit itself fits: the true max batch is at least max_batch
    host_limit_batch: int | None = None  # the host could not draw this batch: max_batch is a lower bound
    batch_over_nondp: float | None = None  # max_batch / non-DP's (None: either is a lower bound or missing)
    peak_tensor_bytes: int | None = None  # at max_batch
    device_bytes: int | None = None  # at max_batch, through the overhead model
    fixed_bytes: float | None = None  # the line through the probes at max_batch and max_batch + 1
    per_sample_bytes: float | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    nondp_peak_bytes: int | None = None  # non-DP's peak at the same batch
    peak_over_nondp: float | None = None  # peak_tensor_bytes / nondp_peak_bytes
    probes: int = 0
    seconds: float = 0.0
    # --- time at max batch (bench/plan/timemodel.py; None: no estimate — no GPU peaks, no work counts) ---------
    step_seconds: float | None = None  # estimated step time at max_batch
    time_over_nondp: float | None = None  # step_seconds / non-DP's estimated step at the same batch
    samples_per_s: float | None = None  # max_batch / step_seconds
    flops_over_nondp: float | None = None  # the step's FLOPs / non-DP's at the same batch
    bytes_over_nondp: float | None = None  # its bytes moved / non-DP's at the same batch

    @property
    def lower_bound(self) -> bool:
        """The true max batch may be larger: the search limit fits, or the host stopped the search."""
        return self.at_limit or self.host_limit_batch is not None


@dataclass
class Plan:
    """Everything a plan prints, in every format: what was planned, under which model, with what, and the rows."""

    workload: str
    memory_bytes: int
    gpu: Gpu | None  # the catalogue GPU planned for (None: --memory)
    training_mode: str  # bench.dp.TrainingMode label, e.g. "fp32", "bf16+blocks"
    precision: str
    checkpointing: str
    trainable: str
    attention: str
    optimizer: str
    overhead: OverheadModel
    calibration_gpu_stated: str | None  # --calibrate-gpu: the source GPU the user stated
    versions: dict[str, str | None]
    rows: list[PlanRow]
    time_model: str = ""  # what the time estimates rest on, or why there are none
    time_calibrated: bool = False  # the estimates' rates were fitted to --calibrate records


class _Prober:
    """Runs meta cases of one workload and remembers them by (method, batch)."""

    def __init__(self, workload: str, config):
        self.workload, self.config = workload, config
        self.records: dict[tuple[str, int], object] = {}

    def __call__(self, method: str, batch_size: int):
        from bench.case.runner import run_case
        from bench.case.spec import CaseSpec

        key = (method, batch_size)
        if key not in self.records:
            matrix = self.config.matrix
            modes = dict(precision=matrix.precisions[0], checkpointing=matrix.checkpointings[0])
            spec = CaseSpec(self.workload, method, batch_size, "meta", **modes, trainable=matrix.trainables[0])
            self.records[key] = run_case(spec, self.config, None)
        return self.records[key]


def plan_method(prober: _Prober, method: str, budget: int, limit: int) -> PlanRow:
    """Search ``method``'s exact max batch for ``budget`` and describe it (see the module docstring)."""
    from bench.plan import maxbatch
    from bench.results.record import BatchProbe

    start = time.perf_counter()
    row = PlanRow(method)

    def probe(b: int):
        record = prober(method, b)
        status = HOST_OOM if record.status == "oom" else record.status  # nothing on meta runs out but the host
        return BatchProbe(b, status, record.memory.peak_tensor_bytes), dict(record.memory.breakdown)

    (answer,), probes = maxbatch.search_budgets(probe, [budget], prober.config.capacity.overhead, limit)
    row.probes, row.seconds = len(probes), time.perf_counter() - start
    failed = next((p for p in probes if p.status in ("unsupported", "error")), None)
    if failed is not None:
        record = prober(method, failed.batch_size)
        row.status, row.reason = record.status, record.reason
        return row
    row.max_batch, row.at_limit = answer.max_batch, answer.max_batch == limit and answer.first_failing_batch is None
    row.host_limit_batch = answer.host_limit_batch
    if answer.host_limit_batch is not None:
        row.reason = maxbatch.answer_text(answer) + ": " + prober(method, answer.host_limit_batch).reason
    row.peak_tensor_bytes, row.device_bytes, row.breakdown = (
        answer.peak_tensor_bytes,
        answer.device_bytes,
        answer.breakdown,
    )
    if answer.max_batch is not None:
        ran = prober.records
        near = [
            b
            for b in (answer.max_batch - 1, answer.max_batch, answer.max_batch + 1)
            if (method, b) in ran and ran[(method, b)].status == "ok"  # not a batch the host could not draw
        ]
        if len(near) >= 2:
            b0, b1 = near[-2], near[-1]
            y0, y1 = prober(method, b0).memory.peak_tensor_bytes, prober(method, b1).memory.peak_tensor_bytes
            row.per_sample_bytes = (y1 - y0) / (b1 - b0)
            row.fixed_bytes = y0 - row.per_sample_bytes * b0
    return row


def set_time_figures(row: PlanRow, work, nondp_work, machine) -> None:
    """``row``'s estimated time at its max batch (``work``: its step's counts there, ``nondp_work``: non-DP's at
    the same batch) under the roofline ``machine``."""
    from bench.plan.timemodel import estimate

    if work.op_count is None:
        return
    row.step_seconds = estimate(work, machine).seconds
    row.samples_per_s = row.max_batch / row.step_seconds
    if nondp_work is not None and nondp_work.op_count is not None:
        row.time_over_nondp = row.step_seconds / estimate(nondp_work, machine).seconds
        row.flops_over_nondp = work.flops / nondp_work.flops
        row.bytes_over_nondp = work.bytes_accessed / nondp_work.bytes_accessed


def set_ratios(rows: list[PlanRow]) -> None:
    """Each ok row's max batch over non-DP's (where neither is a lower bound) and peak over non-DP's peak at the
    same batch (``nondp_peak_bytes``)."""
    nondp = next((r for r in rows if r.method == "nondp" and r.status == "ok"), None)
    for r in rows:
        if nondp is not None and nondp.max_batch and r.max_batch and not (nondp.lower_bound or r.lower_bound):
            r.batch_over_nondp = r.max_batch / nondp.max_batch
        if r.peak_tensor_bytes is not None and r.nondp_peak_bytes:
            r.peak_over_nondp = r.peak_tensor_bytes / r.nondp_peak_bytes


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def _ratio(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _one_line(text: str) -> str:
    """A reason on one line (a library's message and its diagnosis may span several), in full."""
    return " ".join(text.split())


def _memory_text(plan: Plan) -> str:
    if plan.gpu is not None:
        return f"{plan.gpu.name} ({plan.gpu.memory_bytes / GIB:.0f} GiB)"
    return f"{plan.memory_bytes / GIB:.2f} GiB"


def _calibration_words(plan: Plan) -> str | None:
    """Which GPU a calibrated overhead model was fitted to, and whether that was stated for another card."""
    if plan.overhead.gpu is None:
        return None
    words = f"Calibrated on: {plan.overhead.gpu} records"
    if plan.calibration_gpu_stated is not None:
        words += f" (--calibrate-gpu {plan.calibration_gpu_stated}"
        words += f"; the plan is for {plan.gpu.name})" if plan.gpu is not None else ")"
    return words


def plan_markdown(plan: Plan) -> str:
    """The plan as a Markdown table, the lines that say what it rests on above it and, under it, the notes: the
    full reason of each row that has one (unsupported, error, the host's limit)."""
    lines = [
        f"Capacity plan: {plan.workload} on {_memory_text(plan)} (predicted on the meta device; "
        f"{plan.training_mode}; attention {plan.attention})",
        f"Overhead model: {plan.overhead.describe()}",
        *([words] if (words := _calibration_words(plan)) else []),
        "",
        "| method | max batch | × nondp batch | peak tensor GiB | device GiB | fixed GiB | per sample MiB "
        "| peak × nondp @ batch | breakdown at max batch (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []

    def note(r: PlanRow) -> str:
        reason = _one_line(r.reason)
        notes.append(f"{len(notes) + 1}. " + (reason if reason.startswith(f"{r.method}:") else f"{r.method}: {reason}"))
        return f"note {len(notes)}"

    for r in plan.rows:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.status} | | | | | | | {note(r)} |")
            continue
        batch = "none" if r.max_batch is None else (f"≥{r.max_batch}" if r.lower_bound else str(r.max_batch))
        if r.reason:
            batch += f" ({note(r)})"
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.breakdown.items() if v >= 0.005 * GIB)
        per_sample = "—" if r.per_sample_bytes is None else f"{r.per_sample_bytes / MIB:.1f}"
        lines.append(
            f"| {r.method} | {batch} | {_ratio(r.batch_over_nondp, 2)} | {_gib(r.peak_tensor_bytes)} "
            f"| {_gib(r.device_bytes)} | {_gib(r.fixed_bytes)} | {per_sample} | {_ratio(r.peak_over_nondp, 3)} "
            f"| {parts} |"
        )
    timed = [r for r in plan.rows if r.step_seconds is not None]
    lines += ["", f"Time at max batch: {plan.time_model}"]
    if timed:
        lines += [
            "",
            "| method | batch | est. step ms | × nondp time | samples/s | FLOPs × nondp | bytes × nondp |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            lines.append(
                f"| {r.method} | {r.max_batch} | {r.step_seconds * 1e3:.0f} | {_ratio(r.time_over_nondp, 2)} "
                f"| {r.samples_per_s:.1f} | {_ratio(r.flops_over_nondp, 2)} | {_ratio(r.bytes_over_nondp, 2)} |"
            )
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _row_fields(r: PlanRow) -> dict:
    """A row's figures as JSON/CSV values: numbers stay numbers, the reason in full."""
    fields = dataclasses.asdict(r)
    fields["max_batch_is_lower_bound"] = r.lower_bound
    fields["meta_steps"] = fields.pop("probes")
    return fields


def _plan_fields(plan: Plan) -> dict:
    """What the plan rests on, as JSON values (``rows`` apart)."""
    gpu = plan.gpu
    return {
        "workload": plan.workload,
        "memory_bytes": plan.memory_bytes,
        "gpu": None
        if gpu is None
        else {"name": gpu.name, "product": gpu.product, "memory_bytes": gpu.memory_bytes, "sm": list(gpu.sm)},
        "measurement": "predicted",
        "training_mode": plan.training_mode,
        "precision": plan.precision,
        "checkpointing": plan.checkpointing,
        "trainable": plan.trainable,
        "attention": plan.attention,
        "optimizer": plan.optimizer,
        "overhead": {
            "fixed_bytes": plan.overhead.fixed_bytes,
            "fraction": plan.overhead.fraction,
            "source": plan.overhead.source,
            "calibration_gpu": plan.overhead.gpu,
            "calibration_gpu_stated": plan.calibration_gpu_stated,
        },
        "versions": plan.versions,
        "time_model": plan.time_model,
        "time_calibrated": plan.time_calibrated,
    }


def plan_json(plan: Plan) -> str:
    return json.dumps({**_plan_fields(plan), "rows": [_row_fields(r) for r in plan.rows]}, indent=2)


def plan_csv(plan: Plan) -> str:
    """One CSV row per method: its figures (the breakdown as ``breakdown_<category>`` bytes), then the plan's facts
    repeated on every row (``gpu_*``, ``overhead_*``, ``*_version``) so each row stands alone."""
    facts = _plan_fields(plan)
    gpu = facts.pop("gpu") or dict.fromkeys(("name", "product", "memory_bytes", "sm"))
    overhead, versions = facts.pop("overhead"), facts.pop("versions")
    common = {
        **facts,
        **{f"gpu_{k}": ".".join(map(str, v)) if k == "sm" and v else v for k, v in gpu.items()},
        **{f"overhead_{k}": v for k, v in overhead.items()},
        **{f"{name}_version": v for name, v in versions.items()},
    }
    rows = []
    for r in plan.rows:
        fields = _row_fields(r)
        breakdown = fields.pop("breakdown")
        rows.append({**fields, **{f"breakdown_{c}": breakdown.get(c) for c in CATEGORIES}, **common})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else list(common), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


PRINTERS = {"md": plan_markdown, "json": plan_json, "csv": plan_csv}


def plan_versions() -> dict[str, str | None]:
    """The torch, opacus and dpmem versions the plan was made with (dpmem from a source checkout's
    pyproject.toml when it is not installed)."""
    import torch

    found: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("opacus", "dpmem"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    if found["dpmem"] is None:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        found["dpmem"] = match.group(1) if match else None
    return found


def check_calibration_gpu(gpu: Gpu | None, overhead: OverheadModel, stated: str | None) -> None:
    """ValueError (one line) when a calibrated overhead model comes from another GPU than the one planned for,
    unless ``--calibrate-gpu`` stated the source GPU."""
    if gpu is None or overhead.gpu is None or stated is not None or gpu in matching_gpus(overhead.gpu):
        return
    theirs = matching_gpus(overhead.gpu)
    instead = f"plan --gpu {theirs[0].name} with them, or " if len(theirs) == 1 else ""
    raise ValueError(
        f"--calibrate: the records are from {overhead.gpu}, not {gpu.name} ({gpu.product}); {instead}state their "
        f"GPU with --calibrate-gpu NAME to plan {gpu.name} with them anyway"
    )


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("workload", help="workload spec, e.g. dit-xl-2-cond or gpt2-large:seq_len=128")
    parser.add_argument("--methods", type=comma_list, help="comma list of DP methods (default: every one)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", help=f"a GPU from the catalogue (default {DEFAULT_GPU}): {', '.join(GPUS)}")
    where.add_argument("--memory", type=byte_size, help="the memory to plan for instead, e.g. 80GiB")
    parser.add_argument("--attention", default="auto", help=f"attention kernel: {', '.join(ATTENTION_CHOICES)}")
    parser.add_argument("--budget-overhead", help="FIXED+PERCENT beyond tensor bytes (default 1GiB+10%%)")
    parser.add_argument("--calibrate", type=comma_list, metavar="FILES", help="fit the overhead from GPU results")
    parser.add_argument(
        "--calibrate-gpu",
        metavar="NAME",
        help="with --calibrate: the GPU the records come from (a substring of its name); needed to use records "
        "of another GPU than --gpu",
    )
    parser.add_argument("--optimizer", default="adamw", help="adamw (default), adam or sgd")
    parser.add_argument(
        "--precision",
        help=f"{DEFAULT_PRECISION} (default on a GPU with bf16: how DiTs and GPTs are trained; fp32 on V100/T4), "
        "amp-fp16 (autocast, emulated on meta by CUDA's op lists), fp32, or bf16 (weights, gradients, optimizer "
        "state in bf16)",
    )
    parser.add_argument("--checkpointing", default="none", help="none (default) or blocks (every block checkpointed)")
    parser.add_argument(
        "--trainable",
        default="full",
        help="full (default), bitfit, attention or lora:r=R[:alpha=A]: which parameters train (DP fine-tuning)",
    )
    parser.add_argument("--max-batch-limit", type=positive_int, default=4096, help="largest batch searched (4096)")
    parser.add_argument(
        "--microbatch-limit",
        type=positive_int,
        default=DEFAULT_MICROBATCH_LIMIT,
        help=f"largest batch searched for the per-sample loop (default {DEFAULT_MICROBATCH_LIMIT})",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="md",
        help="md: the Markdown table (default); json or csv: the same plan for scripts, numbers as numbers",
    )
    return parser


def _config(args: argparse.Namespace, gpu: Gpu | None):
    """The BenchConfig of the plan's meta cases; ValueError (one line) for a bad value."""
    import models
    from bench import dp
    from bench.config.options import check_names, overhead_model
    from bench.config.settings import (
        BenchConfig,
        CapacitySettings,
        MatrixSettings,
        MeasureSettings,
        StepSettings,
        resolve_overhead,
    )

    sm = gpu.sm if gpu else (8, 0)
    workload = models.get_workload(args.workload).name
    methods = tuple(args.methods or dp.available_methods())
    check_names("--methods", methods, dp.available_methods())
    check_names("--attention", [args.attention], ATTENTION_CHOICES)
    check_names("--optimizer", [args.optimizer], list(dp.OPTIMIZERS))
    precision = args.precision or default_precision(sm)
    check_names("--precision", [precision], dp.PRECISIONS)
    check_names("--checkpointing", [args.checkpointing], dp.CHECKPOINTINGS)
    given = overhead_model(args.budget_overhead) if args.budget_overhead else None
    trainable = dp.parse_trainable(args.trainable).text
    modes = {"precisions": (precision,), "checkpointings": (args.checkpointing,), "trainables": (trainable,)}
    return BenchConfig(
        MatrixSettings("plan", (workload,), methods, (), ("meta",), **modes),
        StepSettings(dp.resolve_privacy(1.0), args.optimizer, attention=args.attention, attention_sm=sm),
        MeasureSettings(rounds=1),
        capacity=CapacitySettings(
            overhead=resolve_overhead(given, args.calibrate, args.calibrate_gpu),
            **({"estimate_gpu": gpu} if gpu else {}),
        ),
    )


def _reference_gpu(gpu: Gpu, device_name: str) -> Gpu:
    """The catalogue GPU whose datasheet peaks the records of ``device_name`` were measured against: the planned
    ``gpu`` when the name may be it, else the one catalogue entry (or entries of one set of peaks) the name matches;
    TimeModelError when it matches none with peak figures."""
    from bench.plan.timemodel import TimeModelError

    theirs = matching_gpus(device_name)
    if gpu in theirs:
        return gpu
    with_peaks = [g for g in theirs if g.peaks is not None]
    if not with_peaks or len({g.peaks for g in with_peaks}) > 1:
        names = ", ".join(g.name for g in theirs) or "no catalogue GPU"
        raise TimeModelError(
            f"--calibrate: records of {device_name} ({names}): no one set of datasheet peaks to fit the time "
            "model's efficiencies against"
        )
    return with_peaks[0]


def _time_model(gpu: Gpu | None, calibration_records: list, overhead: OverheadModel):
    """(the roofline of the GPU planned for, or None; the words saying what estimates rest on or why none).
    With ``--calibrate`` records (of the GPU the overhead model was fitted to) its efficiencies and launch time
    are fitted to their measured step times (bench/plan/timemodel.py, :func:`fit_efficiencies`); records without
    a step time or work counts are a TimeModelError naming the missing fields."""
    from bench.plan.timemodel import TimeModelError, fit_efficiencies, gpu_roofline

    if gpu is None:
        return None, "no GPU named (--memory): no time estimate"
    try:
        machine = gpu_roofline(gpu)
    except TimeModelError as exc:
        return None, str(exc)
    if calibration_records:
        device_name = overhead.gpu
        try:
            fit = fit_efficiencies(calibration_records, _reference_gpu(gpu, device_name), device_name)
        except TimeModelError as exc:
            text = str(exc)
            raise TimeModelError(text if text.startswith("--calibrate") else f"--calibrate: {text}") from None
        machine = fit.roofline(gpu)
    return machine, f"{machine.label}; no fusion (every op its own kernel)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import models
    from bench import dp
    from bench.config.settings import calibration_records

    try:
        gpu = get_gpu(args.gpu or DEFAULT_GPU) if args.memory is None else None
        config = _config(args, gpu)
        check_calibration_gpu(gpu, config.capacity.overhead, args.calibrate_gpu)
        records = calibration_records(args.calibrate) if args.calibrate else []
        machine, time_model = _time_model(gpu, records, config.capacity.overhead)
    except (ValueError, argparse.ArgumentTypeError, models.WorkloadError, dp.DPConfigError) as exc:
        return usage_error(PROG, str(exc))
    budget = gpu.memory_bytes if gpu else args.memory
    warnings.filterwarnings("ignore")  # Opacus' and torch's UserWarnings would bury the table
    prober = _Prober(config.matrix.workloads[0], config)
    rows = []
    for method in config.matrix.methods:
        limit = min(args.max_batch_limit, args.microbatch_limit) if method == "microbatch" else args.max_batch_limit
        rows.append(plan_method(prober, method, budget, limit))
        print(f"  {method}: {rows[-1].status}, {rows[-1].probes} meta steps, {rows[-1].seconds:.1f} s", file=sys.stderr)
    for row in rows:  # non-DP's peak at each method's max batch: one more meta step per distinct batch
        if row.status == "ok" and row.max_batch is not None:
            nondp = prober("nondp", row.max_batch)
            row.nondp_peak_bytes = nondp.memory.peak_tensor_bytes if nondp.status == "ok" else None
            if machine is not None:
                nondp_work = nondp.work if nondp.status == "ok" else None
                set_time_figures(row, prober(row.method, row.max_batch).work, nondp_work, machine)
    set_ratios(rows)
    plan = Plan(
        workload=config.matrix.workloads[0],
        memory_bytes=budget,
        gpu=gpu,
        training_mode=dp.TrainingMode(
            config.matrix.precisions[0], config.matrix.checkpointings[0], config.matrix.trainables[0]
        ).label,
        precision=config.matrix.precisions[0],
        checkpointing=config.matrix.checkpointings[0],
        trainable=config.matrix.trainables[0],
        attention=config.step.attention,
        optimizer=config.step.optimizer,
        overhead=config.capacity.overhead,
        calibration_gpu_stated=args.calibrate_gpu,
        versions=plan_versions(),
        rows=rows,
        time_model=time_model,
        time_calibrated=machine is not None and machine.calibrated,
    )
    print(PRINTERS[args.format](plan))
    return 1 if any(r.status == "error" for r in rows) else 0
