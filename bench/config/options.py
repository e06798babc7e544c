"""The bench's command-line options and their ``type=`` parsers (cheap: no torch, no registries).

Each parser turns one option's text into a typed value or raises ``argparse.ArgumentTypeError`` with one line
naming the problem; ``pytest bench/`` reports it as a one-line usage error (exit 4; :func:`add_bench_options`),
e.g. ``ERROR: argument --batch-sizes: batch size must be >= 1, got 0``, and the ``python -m`` tools that reuse
the parsers as ``PROG: error: argument --batch-size: ...`` (exit 2; bench/config/cli.py). Checks that need the
registries (workload and method names, devices) happen once the values are typed, in
:meth:`bench.config.settings.BenchConfig.from_pytest`.

Each option is declared once, as an :class:`Option` (name, the ``BenchConfig`` section field it fills, parser,
default, help) in :data:`OPTIONS`: pytest registers the declarations (:func:`add_bench_options`) and ``from_pytest``
reads them back by field.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.config.sizes import parse_byte_size
from bench.messages import did_you_mean
from bench.plan.gpus import DEFAULT_GPU, GPUS, Gpu, get_gpu
from bench.plan.overhead import parse_overhead
from bench.results.record import PARALLEL_STRATEGIES

__all__ = [
    "ATTENTION_CHOICES",
    "OPTIMIZER_IMPLS",
    "OPTIONS",
    "Option",
    "add_bench_options",
    "attention_choice",
    "batch_sizes",
    "byte_size",
    "byte_sizes",
    "check_names",
    "clip_norm",
    "comma_list",
    "estimate_gpu",
    "jobs",
    "optimizer_impl",
    "overhead_model",
    "parallel_strategies",
    "positive_int",
    "refused_option",
    "rendezvous_endpoint",
    "sample_interval",
    "seed",
    "world_sizes",
]

# --attention: the scaled-dot-product-attention kernel a step runs (bench/case/attention.py says what each means).
ATTENTION_CHOICES = ("auto", "math", "efficient", "flash", "cudnn")
# --optimizer-impl: torch.optim's per-parameter loop or its multi-tensor (foreach) kernels; auto = torch's default
# for the device (foreach on CUDA, the loop on CPU; meta predicts CUDA, so foreach).
OPTIMIZER_IMPLS = ("auto", "foreach", "for-loop")

BadValue = argparse.ArgumentTypeError


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` → ``("a", "b", "c")``; empty items are dropped, an empty list or a repeat is an error."""
    items = tuple(s.strip() for s in str(text).split(",") if s.strip())
    if not items:
        raise BadValue("empty list")
    repeated = sorted({s for s in items if items.count(s) > 1})
    if repeated:
        raise BadValue(f"{', '.join(repeated)} given more than once")
    return items


def trainables(text: str) -> tuple[str, ...]:
    """``"full,lora:r=8"`` → each value's canonical spelling (bench/dp/trainable.py; parsed there, imported on use)."""
    from bench.dp.trainable import parse_trainable

    try:
        return tuple(dict.fromkeys(parse_trainable(item).text for item in comma_list(text)))
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise BadValue(f"{text!r} is not an integer") from None
    if value < 1:
        raise BadValue(f"must be >= 1, got {value}")
    return value


def jobs(text: str) -> int | None:
    """``--jobs``: ``auto`` (None: chosen from the run, bench/case/pool.py) or a number of worker processes >= 1."""
    if str(text).strip() == "auto":
        return None
    try:
        return positive_int(text)
    except BadValue as exc:
        raise BadValue(f"{exc} (a number of processes, or auto)") from None


def seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**64 - 2]. torch's generators take 64-bit unsigned seeds, and a case seeds its
    DP noise with seed + 1 (a larger seed would pass here and then fail every case)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise BadValue(f"{text!r} is not an integer") from None
    if not 0 <= value <= 2**64 - 2:
        raise BadValue(f"must be in [0, 2**64 - 2] (64-bit generator seeds; the noise takes seed + 1), got {value}")
    return value


def _positive_ints(text: str, what: str) -> tuple[int, ...]:
    """``"4,16"`` → ``(4, 16)``: integers >= 1 (``what`` names them in the error)."""
    values = []
    for item in comma_list(text):
        try:
            value = int(item)
        except ValueError:
            raise BadValue(f"{item!r} is not an integer") from None
        if value < 1:
            raise BadValue(f"{what} must be >= 1, got {value}")
        values.append(value)
    return tuple(values)


def batch_sizes(text: str) -> tuple[int, ...]:
    """``"4,16"`` → ``(4, 16)``: integers >= 1, each once."""
    return _positive_ints(text, "batch size")


def byte_size(text: str) -> int:
    """A size option's value in bytes (>= 1): :func:`parse_byte_size` as a ``type=`` parser."""
    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def byte_sizes(text: str) -> tuple[int, ...]:
    return tuple(byte_size(item) for item in comma_list(text))


def world_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,8"`` → ``(1, 2, 8)``: ranks per case, integers >= 1, each once (1: one process, no strategy)."""
    return _positive_ints(text, "world size")


def parallel_strategies(text: str) -> tuple[str, ...]:
    """``"ddp,fsdp"``: the data-parallel strategies of the cases with a world size > 1."""
    items = comma_list(text)
    for item in items:
        if item not in PARALLEL_STRATEGIES:
            valid = ", ".join(PARALLEL_STRATEGIES)
            raise BadValue(f"unknown strategy {item!r}{did_you_mean(item, PARALLEL_STRATEGIES)}; valid: {valid}")
    return items


def rendezvous_endpoint(text: str) -> str:
    """``HOST:PORT`` of torchrun's c10d rendezvous (the node every node can reach)."""
    host, _, port = str(text).strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadValue(f"{text!r} is not HOST:PORT (e.g. node0.cluster:29500)")
    return f"{host}:{port}"


def _number(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise BadValue(f"{text!r} is not a number") from None


def sample_interval(text: str) -> float:
    """Seconds in (0, 1]."""
    value = _number(text)
    if not (math.isfinite(value) and 0 < value <= 1.0):
        raise BadValue(f"must be in (0, 1] seconds, got {text!r}")
    return value


def clip_norm(text: str) -> float:
    """The per-sample clipping norm C: finite and > 0 (C = inf would mean no clipping, i.e. no privacy)."""
    value = _number(text)
    if math.isinf(value):
        raise BadValue("must be finite: an infinite clipping norm clips nothing, so the step is not private")
    if not value > 0:
        raise BadValue(f"must be > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise BadValue(f"must be a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise BadValue(f"must be a finite number > 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A probability in (0, 1] (the sampling rate) or (0, 1) for δ — the caller's check narrows it."""
    value = _number(text)
    if not (0 < value <= 1):
        raise BadValue(f"must be in (0, 1], got {text!r}")
    return value


def _choice(text: str, valid: Sequence[str]) -> str:
    value = str(text).strip()
    if value not in valid:
        raise BadValue(f"{text!r} is not one of {', '.join(valid)}")
    return value


def attention_choice(text: str) -> str:
    return _choice(text, ATTENTION_CHOICES)


def optimizer_impl(text: str) -> str:
    return _choice(text, OPTIMIZER_IMPLS)


def estimate_gpu(text: str) -> Gpu:
    """``--gpu NAME``: the catalogue GPU (bench/plan/gpus.py) meta records estimate their step time on; a name
    not in the catalogue is refused naming it (close matches, every valid name)."""
    try:
        return get_gpu(text)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def overhead_model(text: str):
    """``"1GiB+10%"`` → :class:`bench.plan.overhead.OverheadModel` (fixed bytes + a fraction of tensor bytes)."""
    try:
        return parse_overhead(text)
    except ValueError as exc:
        raise BadValue(str(exc)) from None


def check_names(option: str, names: Sequence[str], valid: Sequence[str]) -> None:
    """Raise ValueError (one line: the option, the bad name, close matches, the valid names) for an unknown name."""
    for name in names:
        if name not in valid:
            hint = did_you_mean(name, valid)
            shown = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + ", ..."
            raise ValueError(f"{option}: unknown value {name!r}{hint}; valid: {shown}")


@dataclass(frozen=True)
class Option:
    """One option of ``pytest bench/``, declared once: pytest registers it from this, and
    :meth:`bench.config.settings.BenchConfig.from_pytest` puts its parsed value at ``field``."""

    name: str  # e.g. "--batch-sizes"
    # "section.field": a BenchConfig section and its field ("matrix.batch_sizes"), or an input its section is resolved
    # from ("privacy.*": the PrivacyParams, "overhead.*": the overhead model); None: read only by a check
    field: str | None
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    action: str | None = None
    metavar: str | None = None

    def register(self, group) -> None:
        """Add the option to pytest's option ``group``; a value ``type`` refuses is kept as a :class:`RefusedValue`."""
        given = {"default": self.default, "action": self.action, "metavar": self.metavar}
        kwargs = {key: value for key, value in given.items() if value is not None}
        if self.type is not None:
            kwargs["type"] = _refused_later(self.name, self.type)
        group.addoption(self.name, help=self.help, **kwargs)


@dataclass(frozen=True)
class RefusedValue:
    """An option value its ``type=`` parser refused, kept as the parsed value for :func:`refused_option`."""

    message: str  # e.g. "argument --batch-sizes: batch size must be >= 1, got 0"


def _refused_later(option: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, returning a :class:`RefusedValue` instead of raising: pytest prints an argparse error after its
    whole usage line and its ini file and rootdir (4 lines); the root conftest raises it as one line instead."""

    def parse_or_refuse(text: str) -> Any:
        try:
            return parse(text)
        except BadValue as exc:
            return RefusedValue(f"argument {option}: {exc}")

    return parse_or_refuse


def refused_option(values: Iterable[Any]) -> str | None:
    """The message of the first :class:`RefusedValue` among parsed option values, or None."""
    return next((value.message for value in values if isinstance(value, RefusedValue)), None)


# Options of the case matrix: what runs (workloads, methods, batch sizes, devices, modes).
_MATRIX_OPTIONS = (
    Option(
        "--preset",
        "matrix.preset",
        help="case matrix preset: cpu-smoke, gpu-small, gpu-full, paper (default: gpu-small with a GPU; cpu-smoke)",
    ),
    Option("--workloads", "matrix.workloads", type=comma_list, help="comma list of workloads (replaces the preset's)"),
    Option("--methods", "matrix.methods", type=comma_list, help="comma list of DP methods (replaces the preset's)"),
    Option(
        "--batch-sizes",
        "matrix.batch_sizes",
        type=batch_sizes,
        help="comma list of batch sizes (replaces the preset's)",
    ),
    Option(
        "--devices",
        "matrix.devices",
        type=comma_list,
        help="comma list of devices, e.g. cuda:0,cuda:1, cpu, or meta (predicted tensor bytes, nothing allocated) "
        "(default: the preset's, else every GPU, else cpu)",
    ),
    Option(
        "--precision",
        "matrix.precisions",
        type=comma_list,
        help="comma list of precisions: fp32, amp-bf16 (autocast, fp32 weights), amp-fp16 (autocast + GradScaler), "
        "bf16 (bf16 weights, gradients, optimizer state) (replaces the preset's)",
    ),
    Option(
        "--checkpointing",
        "matrix.checkpointings",
        type=comma_list,
        help="comma list: none, blocks (activation checkpointing of every transformer block) (replaces the preset's)",
    ),
    Option(
        "--trainable",
        "matrix.trainables",
        type=trainables,
        help="comma list of what trains: full, bitfit (biases only), attention (the attention projections), "
        "lora:r=R[:alpha=A] (LoRA adapters on them, alpha default R; needs dpmem[lora]) (replaces the preset's)",
    ),
    Option(
        "--workload-module",
        "matrix.workload_modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE, which registers workloads with models.register_workload (repeatable)",
    ),
)


# Options of how a step runs: privacy, optimizer, attention kernel.
_STEP_OPTIONS = (
    Option(
        "--target-epsilon",
        "privacy.target_epsilon",
        type=positive_float,
        help="resolve the noise multiplier for this ε (Opacus accountant)",
    ),
    Option(
        "--target-delta",
        "privacy.target_delta",
        type=unit_interval,
        default=1e-5,
        help="δ of the privacy guarantee (default 1e-5)",
    ),
    Option(
        "--noise-multiplier",
        "privacy.noise_multiplier",
        type=non_negative_float,
        help="noise multiplier σ (default 1.0 unless --target-epsilon)",
    ),
    Option("--accountant", "privacy.accountant", default="prv", help="Opacus accountant: prv, rdp, gdp (default prv)"),
    Option(
        "--sample-rate",
        "privacy.sample_rate",
        type=unit_interval,
        default=0.01,
        help="Poisson sampling rate q for the accountant (0.01)",
    ),
    Option(
        "--privacy-steps",
        "privacy.steps",
        type=positive_int,
        default=1000,
        help="training steps the guarantee covers (default 1000)",
    ),
    Option(
        "--max-grad-norm",
        "privacy.max_grad_norm",
        type=clip_norm,
        default=1.0,
        help="per-sample clipping norm C (default 1.0)",
    ),
    Option("--optimizer", "step.optimizer", default="adamw", help="adamw (default), adam or sgd"),
    Option(
        "--optimizer-impl",
        "step.optimizer_impl",
        type=optimizer_impl,
        default="auto",
        help="torch.optim implementation: auto (torch's default for the device; foreach on cuda and meta, the "
        "per-parameter loop on cpu), foreach or for-loop",
    ),
    Option(
        "--attention",
        "step.attention",
        type=attention_choice,
        default="auto",
        help="scaled-dot-product-attention kernel: auto (torch's choice; on meta what CUDA would pick: efficient for "
        "fp32, flash for fp16/bf16), math, efficient, flash or cudnn",
    ),
)


# Options of timing, memory sources and where results go.
_MEASUREMENT_OPTIONS = (
    Option(
        "--sample-interval",
        "measure.sample_interval_s",
        type=sample_interval,
        default=0.001,
        help="NVML/RSS sampling interval, s (default 0.001)",
    ),
    Option("--rounds", "measure.rounds", type=positive_int, help="timed rounds per case (default: the preset's)"),
    Option(
        "--torch-threads",
        "measure.torch_threads",
        type=positive_int,
        help="pin torch's intra-op CPU threads for the run (default: torch's choice; recorded either way)",
    ),
    Option(
        "--jobs",
        "measure.jobs",
        type=jobs,
        help="processes that run meta cases: auto (default: one per core in a meta-only run, fewer when it has few "
        "cases; 1 when cpu or cuda cases run) or N; measured (cpu, cuda) cases run one at a time, so N > 1 needs "
        "--devices meta",
    ),
    Option(
        "--memory-cap",
        "measure.memory_cap_bytes",
        type=byte_size,
        help="CPU only: live tensor bytes above this are an OOM, e.g. 8GiB (default: 75%% of RAM)",
    ),
    Option(
        "--results",
        "output.results_path",
        help="JSON-lines file each finished case is appended to (default: results/dpmem-<time>.jsonl)",
    ),
    Option(
        "--snapshot",
        "measure.snapshot_case",
        metavar="CASE_ID",
        help="export a CUDA memory snapshot for this case id (e.g. dit-s-2-cond-bk-bs16-cuda:0) into --snapshot-dir",
    ),
    Option(
        "--snapshot-dir",
        "measure.snapshot_dir",
        default="results/snapshots",
        help="where --snapshot writes (default results/snapshots)",
    ),
    Option(
        "--runner-label", "output.runner_label", help="label of this machine in results (default: $DPMEM_RUNNER_LABEL)"
    ),
    Option("--seed", "step.seed", type=seed, default=0, help="seed of batches and DP noise, 0 … 2**64 - 2 (default 0)"),
)


# Options of cases on many ranks (torchrun).
_RANKS_OPTIONS = (
    Option(
        "--world-sizes",
        "matrix.world_sizes",
        type=world_sizes,
        help="comma list of ranks per case, e.g. 1,2,8 (default 1); a case with more is launched by torchrun, "
        "batch sizes are global (split evenly over the ranks)",
    ),
    Option(
        "--parallel",
        "matrix.parallel",
        type=parallel_strategies,
        help="strategies of the cases with world size > 1: ddp, fsdp (default both)",
    ),
    Option(
        "--rank-timeout",
        "ranks.rank_timeout_s",
        type=positive_float,
        default=900.0,
        help="seconds a many-rank case may take before its ranks are killed and it is an error (default 900)",
    ),
    Option(
        "--nnodes",
        "ranks.nnodes",
        type=positive_int,
        default=1,
        help="nodes a many-rank case spans (torchrun --nnodes; default 1)",
    ),
    Option(
        "--rdzv-endpoint",
        "ranks.rdzv_endpoint",
        type=rendezvous_endpoint,
        help="HOST:PORT of torchrun's c10d rendezvous when --nnodes > 1 (the same on every node)",
    ),
    Option(
        "--oversubscribe",
        None,
        action="store_true",
        help="run more CPU ranks per node than the node has cores (refused otherwise)",
    ),
)


# Options of the max-batch search and memory budgets.
_MAX_BATCH_OPTIONS = (
    Option(
        "--max-batch",
        "capacity.max_batch",
        action="store_true",
        help="max-batch mode: per workload × method × device, find the largest batch that fits (doubling, then "
        "bisection) and fit peak(B) = fixed + per_sample·B",
    ),
    Option(
        "--max-batch-limit",
        "capacity.max_batch_limit",
        type=positive_int,
        default=4096,
        help="largest batch size the max-batch search tries",
    ),
    Option(
        "--memory-budget",
        "capacity.memory_budgets",
        type=byte_sizes,
        help="meta max-batch: memory sizes to find the exact largest batch for, e.g. 24GiB,40GiB,80GiB,141GiB "
        "(default: those four)",
    ),
    Option(
        "--budget-overhead",
        "overhead.given",
        type=overhead_model,
        help="memory a GPU needs beyond tensor bytes, FIXED+PERCENT of tensor bytes (default 1GiB+10%%; see "
        "bench/plan/overhead.py)",
    ),
    Option(
        "--calibrate",
        "overhead.calibration_files",
        type=comma_list,
        metavar="FILES",
        help="fit --budget-overhead from real GPU results (comma list of .json/.jsonl result files)",
    ),
    Option(
        "--calibrate-gpu",
        "overhead.gpu",
        metavar="NAME",
        help="with --calibrate: the GPU model to use (substring of its name)",
    ),
    Option(
        "--gpu",
        "capacity.estimate_gpu",
        type=estimate_gpu,
        metavar="NAME",
        help=f"the GPU every ok meta record estimates its step time on (datasheet peaks × default efficiencies, "
        f"bench/plan/timemodel.py; default {DEFAULT_GPU}): {', '.join(GPUS)}",
    ),
    Option(
        "--predict-memory",
        "capacity.predict_memory_bytes",
        type=byte_sizes,
        default=byte_sizes("16GiB,24GiB,40GiB,80GiB,141GiB"),
        help="memory sizes the max-batch fit predicts a max batch for (comma list)",
    ),
)


OPTIONS = (*_MATRIX_OPTIONS, *_STEP_OPTIONS, *_MEASUREMENT_OPTIONS, *_RANKS_OPTIONS, *_MAX_BATCH_OPTIONS)


def add_bench_options(parser) -> None:
    """Register every option of ``pytest bench/`` (called by the root conftest's ``pytest_addoption``). A value a
    ``type=`` parser refuses becomes a :class:`RefusedValue`, which the root conftest's ``pytest_configure``
    raises as a one-line ``pytest.UsageError`` (``ERROR: argument --batch-sizes: ...``, exit 4)."""
    group = parser.getgroup("dpmem", "dpmem benchmark matrix (see docs/running.md: options and presets)")
    for option in OPTIONS:
        option.register(group)
