"""Bench settings: the presets and the typed, nested :class:`BenchConfig` every case reads. Knows names, not
measurement.

:class:`BenchConfig` has one frozen section per concern (matrix, step, measure, ranks, capacity, output). It is built
once per pytest session by :meth:`BenchConfig.from_pytest` from the option declarations of
``bench/config/options.py`` (:data:`~bench.config.options.OPTIONS`: each names the section field its value fills,
typed there by its ``type=`` parser); the fallbacks to the preset and the checks that need the workload, method and
device registries happen here.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bench.plan.gpus import DEFAULT_GPU, GPUS, Gpu
from bench.plan.overhead import DEFAULT_OVERHEAD, OverheadModel, calibrate
from bench.results.files import ResultFileError, read_result_file
from bench.results.record import PARALLEL_STRATEGIES, CaseRecord
from bench.trackers.contention import available_cpu_cores

if TYPE_CHECKING:  # only for the annotations: keeps this module free of the opacus and pytest imports
    import pytest

    from bench.dp import PrivacyParams


class BenchUsageError(ValueError):
    """A bad option value; one line, naming the option and the valid values."""


@dataclass(frozen=True)
class Preset:
    """A named case matrix; every dimension can be replaced by its option (``--workloads`` ...)."""

    workloads: tuple[str, ...]
    methods: tuple[str, ...] | None  # None: every registered method
    batch_sizes: tuple[int, ...]
    rounds: int  # timed rounds per case
    precisions: tuple[str, ...] = ("fp32",)  # bench.dp.PRECISIONS
    checkpointings: tuple[str, ...] = ("none",)  # bench.dp.CHECKPOINTINGS
    trainables: tuple[str, ...] = ("full",)  # bench.dp.trainable: full, bitfit, attention, lora:r=R
    # where the fine-tuning (non-full) trainables run: in these (precision, checkpointing) pairs and on these
    # workloads only; None: all of them (both are dropped, like batch_caps, when the dimensions are given)
    fine_tuning_modes: tuple[tuple[str, str], ...] | None = None
    fine_tuning_workloads: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None  # None: every visible GPU, else cpu
    # (method, largest batch size) pairs: the method's cases above that size are left out of the matrix
    batch_caps: tuple[tuple[str, int], ...] = ()


_GPU_WORKLOADS = (
    "dit-s-2-cond",
    "dit-s-2-uncond",
    "dit-b-2-cond",
    "dit-b-2-uncond",
    "dit-l-2-cond",
    "dit-l-2-uncond",
    "dit-xl-2-cond",
    "dit-xl-2-uncond",
    "dit-xl-2-cond-512",
    "gpt2",
    "gpt2-untied",
    "gpt2-medium",
    "gpt2-medium-untied",
)

_PAPER_WORKLOADS = (
    *_GPU_WORKLOADS[:9],
    "gpt2",
    "gpt2-untied",
    "gpt2-medium",
    "gpt2-medium-untied",
    "gpt2-large",
    "gpt2-large-untied",
    "gpt2-xl",
    "gpt2-xl-untied",
)
# The per-sample loop runs B forward+backward passes; on meta each costs as much as a whole batched step, so its
# paper-preset cases stop at 16 (docs/meta-and-planner.md, "Paper-scale answers without a GPU").
PAPER_MICROBATCH_CAP = 16

# paper-size DiT-S/B/L/XL-2 (256 px, cond + uncond), DiT-XL/2 512 px, gpt2(-medium) tied + untied; batch 1..256
# by ×4 until OOM; fp32, amp-bf16 and bf16, with and without activation checkpointing (the default with a GPU);
# DP fine-tuning (BiTFiT, LoRA rank 8) in fp32 and amp-bf16 without checkpointing
_GPU_SMALL = Preset(
    _GPU_WORKLOADS,
    None,
    (1, 4, 16, 64, 256),
    rounds=5,
    precisions=("fp32", "amp-bf16", "bf16"),
    checkpointings=("none", "blocks"),
    trainables=("full", "bitfit", "lora:r=8"),
    fine_tuning_modes=(("fp32", "none"), ("amp-bf16", "none")),
)

PRESETS: dict[str, Preset] = {
    # tiny workloads, every method, two batch sizes, fp32 and amp-bf16, with and without activation
    # checkpointing (the default without a GPU)
    "cpu-smoke": Preset(
        ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny"),
        None,
        (4, 16),
        rounds=3,
        precisions=("fp32", "amp-bf16"),
        checkpointings=("none", "blocks"),
        # DP fine-tuning in fp32 without checkpointing only (in every mode it would take the preset past 5 min)
        trainables=("full", "bitfit", "lora:r=8"),
        fine_tuning_modes=(("fp32", "none"),),
    ),
    "gpu-small": _GPU_SMALL,
    # as gpu-small with every power of two from 1 to 1024 until OOM and more timed rounds
    "gpu-full": dataclasses.replace(_GPU_SMALL, batch_sizes=tuple(2**i for i in range(11)), rounds=10),
    # paper-size models on the meta device (predicted tensor bytes, nothing allocated): DiT-S/B/L/XL-2 cond and
    # uncond at 256 px, DiT-XL/2 at 512 px, GPT-2 S/M/L/XL tied and untied; every method, batch 1..256 by ×4
    "paper": Preset(
        _PAPER_WORKLOADS,
        None,
        (1, 4, 16, 64, 256),
        rounds=1,
        devices=("meta",),
        batch_caps=(("microbatch", PAPER_MICROBATCH_CAP),),
        # DP-LoRA (rank 8) on the largest DiT and GPT-2 the fine-tuning tables compare (docs/methods.md)
        trainables=("full", "lora:r=8"),
        fine_tuning_workloads=("dit-xl-2-cond", "gpt2-large", "gpt2-large-untied"),
    ),
}


GIB = 2**30
# Meta max-batch budgets by default: the memory of the common 24, 40, 80 and 141 GB cards (bench/plan/gpus.py).
DEFAULT_MEMORY_BUDGETS = (24 * GIB, 40 * GIB, 80 * GIB, 141 * GIB)


def _checked_workload(spec: str) -> str:
    """The canonical spec of ``spec`` (``name[:key=value...]``); ValueError naming the option when it is bad."""
    import models

    try:
        return models.get_workload(spec).name
    except models.WorkloadError as exc:
        raise ValueError(f"--workloads: {exc}") from None


def default_preset() -> str:
    return "gpu-small" if torch.cuda.is_available() else "cpu-smoke"


@dataclass(frozen=True)
class MatrixSettings:
    """What runs: the *resolved* matrix (the preset narrowed by explicit options)."""

    preset: str
    workloads: tuple[str, ...] = ()  # a dimension left empty: a matrix without cases (a planner's, a test's)
    methods: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32",)  # training precisions of the matrix (bench.dp.PRECISIONS)
    checkpointings: tuple[str, ...] = ("none",)  # activation checkpointing settings (bench.dp.CHECKPOINTINGS)
    trainables: tuple[str, ...] = ("full",)  # which parameters train (bench.dp.trainable), canonical spellings
    fine_tuning_modes: tuple[tuple[str, str], ...] | None = None  # the preset's (see Preset); None: every mode
    fine_tuning_workloads: tuple[str, ...] | None = None  # the preset's (see Preset); None: every workload
    workload_modules: tuple[str, ...] = ()  # --workload-module: imported again by every rank of a many-rank case
    world_sizes: tuple[int, ...] = (1,)  # ranks per case; 1: one process
    parallel: tuple[str, ...] = PARALLEL_STRATEGIES  # strategies of the cases with world size > 1
    batch_caps: tuple[tuple[str, int], ...] = ()  # the preset's per-method largest batch sizes

    def includes(self, method: str, batch_size: int) -> bool:
        """Whether the matrix has this method at this batch size (the preset's per-method caps)."""
        return all(batch_size <= cap for name, cap in self.batch_caps if name == method)

    def includes_mode(self, workload: str, precision: str, checkpointing: str, trainable: str) -> bool:
        """Whether the matrix has this training mode on ``workload`` (a preset may fine-tune in some modes, on some
        workloads only)."""
        if trainable == "full":
            return True
        modes, workloads = self.fine_tuning_modes, self.fine_tuning_workloads
        return (modes is None or (precision, checkpointing) in modes) and (workloads is None or workload in workloads)

    def case_strategies(self) -> list[tuple[int, str | None]]:
        """(world size, strategy) of every case kind: (1, None) for one process, one per strategy otherwise."""
        return [(w, None) for w in self.world_sizes if w == 1] + [
            (w, p) for w in self.world_sizes if w > 1 for p in self.parallel
        ]


@dataclass(frozen=True)
class StepSettings:
    """How a step runs: its privacy, optimizer, attention kernel and seed."""

    privacy: PrivacyParams  # clip norm, σ, ε, δ, accountant, sample rate, steps: resolved once per session
    optimizer: str = "adamw"
    optimizer_impl: str = "auto"  # torch.optim implementation: auto, foreach, for-loop
    attention: str = "auto"  # SDPA kernel (bench/case/attention.py)
    attention_sm: tuple[int, int] = (8, 0)  # meta: compute capability of the GPU whose auto choice is emulated
    seed: int = 0


@dataclass(frozen=True)
class MeasureSettings:
    """How a case is measured: timed rounds, memory sampling, the CPU memory cap, snapshots."""

    rounds: int  # timed rounds per case
    sample_interval_s: float = 0.001
    memory_cap_bytes: int | None = None  # CPU: live tensor bytes above this count as OOM
    torch_threads: int | None = None  # pinned intra-op CPU threads (None: torch's choice)
    jobs: int | None = None  # --jobs: processes running the meta cases (None: auto, :func:`meta_workers`)
    snapshot_case: str | None = None  # case id ("all" for every case) whose CUDA memory snapshot is exported
    snapshot_dir: str = "results/snapshots"


@dataclass(frozen=True)
class RanksSettings:
    """Where the many-rank cases (bench/ranks) run."""

    rank_timeout_s: float = 900.0  # a many-rank case running longer is killed and recorded as error
    nnodes: int = 1  # nodes a many-rank case spans (torchrun --nnodes)
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous when nnodes > 1


@dataclass(frozen=True)
class CapacitySettings:
    """The max-batch search and the memory it answers for."""

    max_batch: bool = False  # max-batch mode instead of the matrix
    max_batch_limit: int = 4096
    predict_memory_bytes: tuple[int, ...] = ()
    memory_budgets: tuple[int, ...] = DEFAULT_MEMORY_BUDGETS  # meta max-batch: exact largest batch per budget
    overhead: OverheadModel = DEFAULT_OVERHEAD  # what a GPU needs beyond tensor bytes (bench/plan/overhead.py)
    estimate_gpu: Gpu = GPUS[DEFAULT_GPU]  # --gpu: the GPU a meta record's step time is estimated on


@dataclass(frozen=True)
class OutputSettings:
    """Where results go and what the run says about itself."""

    results_path: str = "results/dpmem.jsonl"
    runner_label: str | None = None
    meta_notes: tuple[str, ...] = ()  # options that have no effect on meta cases (shown in the run's header)


@dataclass(frozen=True)
class BenchConfig:
    """Every setting a case needs, one section per concern; each section is filled from its own option group
    (``field`` of the declarations in bench/config/options.py)."""

    matrix: MatrixSettings
    step: StepSettings
    measure: MeasureSettings
    ranks: RanksSettings = RanksSettings()
    capacity: CapacitySettings = CapacitySettings()
    output: OutputSettings = OutputSettings()

    @classmethod
    def from_fields(cls, **fields: Any) -> BenchConfig:
        """A config from its fields by name, whatever their section (each name is in one section): for tests and
        tools that build one by hand; TypeError for a name no section has or a required field not given."""
        sections = {}
        for name, section in typing.get_type_hints(cls).items():
            own = {field.name for field in dataclasses.fields(section)}
            sections[name] = section(**{key: fields.pop(key) for key in own & fields.keys()})
        if fields:
            raise TypeError(f"BenchConfig has no field {', '.join(sorted(fields))}")
        return cls(**sections)

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> BenchConfig:
        """The session's settings from pytest's parsed options; :class:`BenchUsageError` names a bad value."""
        import models
        from bench import dp
        from bench.config.options import check_names

        given = _given_options(config)
        try:
            for module in given["matrix"]["workload_modules"]:
                models.load_workload_module(module)
            matrix = _matrix(given["matrix"])
            check_names("--optimizer", [given["step"]["optimizer"]], list(dp.OPTIMIZERS))
            step = StepSettings(privacy=_privacy(given["privacy"]), **given["step"])
            overhead = resolve_overhead(**given["overhead"])
        except (ValueError, models.WorkloadError, dp.DPConfigError) as exc:
            raise BenchUsageError(str(exc)) from None
        ranks = RanksSettings(**_without_none(given["ranks"]))
        _check_jobs(given["measure"]["jobs"], matrix.devices, given["capacity"]["max_batch"])
        _check_ranks(
            matrix.world_sizes,
            ranks.nnodes,
            ranks.rdzv_endpoint,
            matrix.devices,
            given["capacity"]["max_batch"],
            config.getoption("--oversubscribe"),
        )
        measure = given["measure"] | {
            "rounds": given["measure"]["rounds"] or PRESETS[matrix.preset].rounds,
            "memory_cap_bytes": _memory_cap(given["measure"]["memory_cap_bytes"]),
        }
        output = OutputSettings(
            results_path=given["output"]["results_path"] or f"results/dpmem-{time.strftime('%Y%m%d-%H%M%S')}.jsonl",
            runner_label=given["output"]["runner_label"] or os.environ.get("DPMEM_RUNNER_LABEL") or None,
            meta_notes=_meta_notes(config, matrix.devices),
        )
        capacity = CapacitySettings(**_without_none(given["capacity"]), overhead=overhead)
        return cls(matrix, step, MeasureSettings(**measure), ranks, capacity, output)


def _given_options(config: pytest.Config) -> dict[str, dict[str, Any]]:
    """Every declared option's parsed value (None where not given and without a default), by section and field."""
    from bench.config.options import OPTIONS

    sections: dict[str, dict[str, Any]] = {}
    for option in OPTIONS:
        if option.field is not None:
            section, field = option.field.split(".")
            value = config.getoption(option.name)
            sections.setdefault(section, {})[field] = tuple(value) if isinstance(value, list) else value
    return sections


def _without_none(given: dict[str, Any]) -> dict[str, Any]:
    """The options given (or defaulted by their declaration); the section's own defaults fill the rest."""
    return {field: value for field, value in given.items() if value is not None}


def _matrix(given: dict[str, Any]) -> MatrixSettings:
    """The matrix: the preset's dimensions replaced by those given, names checked against the registries."""
    from bench import dp
    from bench.config.options import check_names

    preset_name = given["preset"] or default_preset()
    check_names("--preset", [preset_name], list(PRESETS))
    preset = PRESETS[preset_name]
    names_modes = bool(given["precisions"] or given["checkpointings"])
    resolved = {
        "preset": preset_name,
        "workloads": tuple(_checked_workload(spec) for spec in given["workloads"] or preset.workloads),
        "methods": tuple(given["methods"] or preset.methods or dp.available_methods()),
        "batch_sizes": given["batch_sizes"] or preset.batch_sizes,
        "precisions": tuple(given["precisions"] or preset.precisions),
        "checkpointings": tuple(given["checkpointings"] or preset.checkpointings),
        # A run that names its training modes (--precision, --checkpointing) trains full unless it names --trainable
        # too: the preset's fine-tuning cases come with the preset's modes.
        "trainables": tuple(given["trainables"] or (("full",) if names_modes else preset.trainables)),
        # like batch_caps: the preset's restrictions, dropped when the dimensions they restrict are given
        "fine_tuning_modes": None if names_modes or given["trainables"] else preset.fine_tuning_modes,
        "fine_tuning_workloads": None if given["workloads"] or given["trainables"] else preset.fine_tuning_workloads,
        "batch_caps": preset.batch_caps if not given["methods"] and not given["batch_sizes"] else (),
    }
    # a method spec is a registered name, then its options (jax-privacy:microbatch=4), kept in canonical spelling
    check_names(
        "--methods", [m.partition(":")[0] for m in resolved["methods"]], dp.available_methods(include_opt_in=True)
    )
    try:
        resolved["methods"] = tuple(dict.fromkeys(dp.get_method(m).name for m in resolved["methods"]))
    except dp.DPConfigError as exc:
        raise ValueError(f"--methods: {exc}") from None
    check_names("--precision", resolved["precisions"], dp.PRECISIONS)
    check_names("--checkpointing", resolved["checkpointings"], dp.CHECKPOINTINGS)
    resolved["devices"] = _checked_devices(given["devices"] or preset.devices)
    return MatrixSettings(**(_without_none(given) | resolved))


def _checked_devices(given: tuple[str, ...] | None) -> tuple[str, ...]:
    """``--devices`` (default: every visible device); ValueError for one that does not exist here."""
    from bench.system.devices import visible_devices

    devices = given or tuple(visible_devices())
    usable = list(dict.fromkeys(["cpu", "meta", *visible_devices()]))
    for device in devices:
        if device not in usable:
            raise ValueError(f"--devices: {device!r} does not exist here; visible devices: {', '.join(usable)}")
    return tuple(devices)


def _privacy(given: dict[str, Any]) -> PrivacyParams:
    """The privacy options resolved (σ from a target ε where one is given); DPConfigError names a bad value."""
    from bench import dp
    from bench.config.options import check_names

    check_names("--accountant", [given["accountant"]], list(dp.ACCOUNTANTS))
    return dp.resolve_privacy(**given)


def _memory_cap(given: int | None) -> int | None:
    """``--memory-cap``, else 75 % of RAM; no cap where RAM cannot be read."""
    from bench.system.machine import ram_bytes

    if given is not None:
        return given
    ram = ram_bytes()
    return int(ram * 0.75) if ram else None


# A meta worker process costs ~10 s of CPU to start (torch and opacus imported again, each workload's meta model
# built and its ops' layouts learnt again): the CI meta gate's 18 paper-size cases took 45 s of CPU on two workers,
# 26 s in one process. --jobs auto starts one worker per this many meta cases.
MIN_CASES_PER_WORKER = 32


def meta_workers(jobs: int | None, meta_cases: int, devices: tuple[str, ...], cores: int | None) -> int:
    """How many worker processes run the session's ``meta_cases`` (<= 1: the pytest process runs them itself).

    ``--jobs N``: N, but no more than there are cases. ``auto`` (None): in a meta-only run one per core (a meta
    case is single-threaded Python), and no more than one per :data:`MIN_CASES_PER_WORKER` cases, so a short run
    does not wait for workers to start; 1 when cpu or cuda cases run too, since a busy core would disturb their
    measured time and memory."""
    if jobs is not None:
        return min(jobs, meta_cases)
    if any(device != "meta" for device in devices):
        return 1
    return max(1, min(cores or 1, meta_cases // MIN_CASES_PER_WORKER))


def _check_jobs(jobs: int | None, devices: tuple[str, ...], max_batch: bool) -> None:
    """BenchUsageError for ``--jobs`` above 1 where cases must run one at a time."""
    if jobs is None or jobs == 1:
        return
    measured = [device for device in devices if device != "meta"]
    if measured:
        raise BenchUsageError(
            f"--jobs {jobs}: {', '.join(measured)} cases are measured one at a time (concurrent cases would disturb "
            "each other's memory and time); --jobs above 1 needs --devices meta"
        )
    if max_batch:
        raise BenchUsageError(f"--jobs {jobs}: --max-batch searches in one process; run it without --jobs")


def _check_ranks(
    world_sizes: tuple[int, ...],
    nnodes: int,
    rdzv: str | None,
    devices: tuple[str, ...],
    max_batch: bool,
    oversubscribe: bool = False,
) -> None:
    """BenchUsageError for a many-rank setting that cannot run here: nodes without a rendezvous, a world size
    the nodes do not divide, more ranks per node than GPUs, more CPU ranks per node than cores (unless
    ``oversubscribe``), a rendezvous host that does not resolve, or the max-batch search (one process only)."""
    ranked = [w for w in world_sizes if w > 1]
    if ranked and max_batch:
        raise BenchUsageError("--max-batch searches one process; run it without --world-sizes above 1")
    if nnodes > 1 and rdzv is None:
        raise BenchUsageError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    for w in ranked:
        if w % nnodes:
            raise BenchUsageError(f"--world-sizes: {w} ranks do not split evenly over --nnodes {nnodes}")
    if not ranked:
        return
    per_node = max(ranked) // nnodes
    if any(d.startswith("cuda") for d in devices):
        gpus = torch.cuda.device_count()
        if per_node > gpus:
            raise BenchUsageError(
                f"--world-sizes: {max(ranked)} ranks on {nnodes} node(s) need {per_node} GPUs per node (one per "
                f"rank), this node has {gpus}"
            )
    cores = available_cpu_cores() if "cpu" in devices and not oversubscribe else None
    if cores is not None and per_node > cores:
        # Each CPU rank is a torch process stepping in lockstep with the others: more ranks than cores only
        # time-slice, and a few dozen of them exhaust the machine's memory before the first step.
        raise BenchUsageError(
            f"--world-sizes: {max(ranked)} ranks on {nnodes} node(s) start {per_node} CPU processes per node, "
            f"this node has {cores} cores; pass --oversubscribe to run them anyway"
        )
    if nnodes > 1:
        _check_rendezvous_host(rdzv)


def _check_rendezvous_host(endpoint: str) -> None:
    """Resolve the rendezvous host now: torchrun would otherwise retry a name that does not exist until
    --rank-timeout, then die with only its own "gai error" in its log."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise BenchUsageError(f"--rdzv-endpoint {endpoint}: host {host!r} does not resolve ({why})") from None


def resolve_overhead(given: OverheadModel | None, calibration_files, gpu: str | None) -> OverheadModel:
    """--budget-overhead, or the model fitted from --calibrate files, or the default; ValueError names the problem."""
    if given is not None and calibration_files:
        raise ValueError("--budget-overhead and --calibrate: give one of them")
    if gpu is not None and not calibration_files:
        raise ValueError("--calibrate-gpu needs --calibrate FILES")
    if not calibration_files:
        return given or DEFAULT_OVERHEAD
    return calibrate(calibration_records(calibration_files), gpu)


def calibration_records(calibration_files) -> list[CaseRecord]:
    """Every record of the ``--calibrate`` result files; ValueError (one line) for a file that cannot be read."""
    records = []
    for path in calibration_files:
        try:
            records.extend(case.record for case in read_result_file(path).cases)
        except ResultFileError as exc:
            raise ValueError(f"--calibrate: {exc}") from None
    return records


def _meta_notes(config: pytest.Config, devices: tuple[str, ...]) -> tuple[str, ...]:
    """One line per given option that a meta case ignores (nothing fails because of them)."""
    if "meta" not in devices:
        return ()
    notes = []
    if config.getoption("--rounds"):
        notes.append("--rounds: meta cases are not timed (no kernel runs on meta); they run one measured step")
    if config.getoption("--snapshot"):
        notes.append("--snapshot: meta cases allocate nothing, so they have no CUDA memory snapshot")
    if any(w > 1 for w in config.getoption("--world-sizes") or ()):
        notes.append(
            "--world-sizes: meta cases run in one process (world size 1); predict a rank of many with "
            "python -m bench.ranks.predict"
        )
    return tuple(notes)
