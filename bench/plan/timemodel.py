"""How long a step takes, from its exact work counts: a roofline over its ops plus a launch overhead per op.

    estimated step time = Σ_ops max(flops / rate[class, dtype], bytes / bandwidth) + n_ops · launch_overhead

The work counter (bench/trackers/work.py) keeps a step's ops as *op groups*: every distinct (op class, dtype,
FLOPs, bytes) with its count. A max per op cannot be taken from sums, but ops of one group share both terms, so
the sum over groups is the sum over ops exactly, for any machine given later — the design choice: the record
holds the groups (tens to hundreds per step), not a verdict for one GPU.

A :class:`Roofline` is one machine's achieved rates: a matmul rate per dtype (tensor cores: TF32 for float32 only
if ``tf32`` is allowed, torch's default for matmuls is not), an attention rate (its kernels reach a lower share
of the matmul peak), an elementwise rate (CUDA-core FP32: elementwise and reductions count 1 FLOP per element),
the bandwidth, and the launch overhead. From a catalogue GPU (:func:`gpu_roofline`) the rates are its datasheet
peaks (bench/plan/gpus.py) times the default efficiencies :data:`DEFAULT_EFFICIENCY` — *estimated, uncalibrated*
figures; a GPU without peaks is refused ("no peak figures for this GPU"). On a CPU the rates are measured
(bench/plan/calibrate_cpu.py: a matmul, a copy and a tiny op of this machine).

:func:`fit_scale` fits one factor to records with measured step times (``Timing``) and work counts: the median
of measured ÷ estimated. Records without work counts are a one-line error naming the missing fields.

Calibration from GPU results (:func:`fit_efficiencies`, ``python -m bench.plan --calibrate FILES``). On a GPU of
datasheet peaks, write each op's two terms at the peaks, ``c`` = flops / peak[class, dtype] and ``m`` = bytes /
peak bandwidth, and the unknowns as inverse efficiencies ``u_k`` = 1 / efficiency_k for k in matmul, attention,
elementwise, bandwidth, plus the launch time ``L``. A record's estimate is then

    T(u, L) = Σ_groups count · max(c · u_class, m · u_bandwidth) + n_ops · L

which is linear in (u, L) once each group's binding term is chosen: T = A · (u, L), ``A`` summing the ``c`` of the
compute-bound groups per class, the ``m`` of the memory-bound ones, and n_ops. The fit alternates: assign each
group to the term that binds under the current (u, L) (from the default efficiencies), solve non-negative least
squares on the relative errors (each record's row and time divided by its measured time), and repeat until the
assignment no longer changes (at most :data:`FIT_ROUNDS` rounds; the round of least relative error is kept).
Non-negative least squares over five unknowns is solved exactly by trying every support: the least-squares
solution on each subset of the columns, the best of those that are non-negative (the optimum's support is one).

Only unknowns the records *constrain* are fitted: those whose terms hold at least :data:`MIN_SHARE` of some
record's measured time under the default efficiencies (on a GPU, elementwise ops are bound by bandwidth, not
FLOPs, so their FLOP rate is rarely constrained). The others keep their defaults, as does a rate class fitted to
zero (the records say it costs nothing: no rate to infer); the label names them. When the constrained columns
cannot be separated (fewer independent records than unknowns), the fit falls back to :func:`fit_scale`'s one
factor on the default efficiencies, and the label says so.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from bench.plan.gpus import Gpu
from bench.results.record import CaseRecord, OpGroup, StepWork, TimeEstimate

__all__ = [
    "DEFAULT_EFFICIENCY",
    "EfficiencyFit",
    "Roofline",
    "TimeModelError",
    "estimate",
    "fit_efficiencies",
    "fit_scale",
    "gpu_roofline",
    "time_estimate",
]

# Shares of the datasheet peaks a step's ops reach on a GPU, by default (uncalibrated): large GEMMs reach ~70 % of
# the tensor-core peak, fused attention kernels ~50 %, elementwise kernels are bandwidth-bound (their FLOP rate
# matters little), and streaming kernels reach ~80 % of the memory bandwidth. A kernel launch costs ~5 µs of
# host and queue time when the GPU is not ahead of the host.
DEFAULT_EFFICIENCY = {"matmul": 0.7, "attention": 0.5, "elementwise": 0.5, "bandwidth": 0.8}
DEFAULT_LAUNCH_S = 5e-6
_HALF = ("bfloat16", "float16")


class TimeModelError(ValueError):
    """The time model cannot estimate (no peaks for the GPU, records without work counts): one line."""


@dataclass(frozen=True)
class Roofline:
    """Achieved rates of one machine: FLOP/s by op class and dtype, bytes/s, seconds per op launch."""

    matmul_flops: dict[str, float]  # dtype -> FLOP/s of matmuls (conv included)
    attention_flops: dict[str, float]  # dtype -> FLOP/s of fused attention kernels
    elementwise_flops: float  # FLOP/s of elementwise ops and reductions (any dtype)
    bandwidth: float  # bytes/s
    launch_s: float
    label: str = ""  # where the figures come from, e.g. "h100-80gb datasheet × default efficiencies"
    calibrated: bool = False

    def op_terms(self, group: OpGroup) -> tuple[float, float]:
        """(seconds of arithmetic, seconds of memory traffic) of one op of ``group``; a copy has no arithmetic."""
        if group.op_class == "copy" or group.flops == 0:
            compute = 0.0
        elif group.op_class == "elementwise":
            compute = group.flops / self.elementwise_flops
        else:
            rates = self.matmul_flops if group.op_class == "matmul" else self.attention_flops
            compute = group.flops / rates.get(group.dtype, rates["float32"])
        return compute, group.bytes_accessed / self.bandwidth

    def op_seconds(self, group: OpGroup) -> float:
        """Seconds of one op of ``group``: the slower of its arithmetic and its memory traffic."""
        return max(self.op_terms(group))

    def scaled(self, factor: float) -> Roofline:
        """Every term ``factor`` times as long (rates divided by it, the launch time multiplied)."""
        return replace(
            self,
            matmul_flops={k: v / factor for k, v in self.matmul_flops.items()},
            attention_flops={k: v / factor for k, v in self.attention_flops.items()},
            elementwise_flops=self.elementwise_flops / factor,
            bandwidth=self.bandwidth / factor,
            launch_s=self.launch_s * factor,
            calibrated=True,
        )


@dataclass(frozen=True)
class Estimate:
    """A step's estimated seconds, and the share of each op class and of the launches."""

    seconds: float
    by_class: dict[str, float]  # op class -> seconds of its ops' roofline terms
    launch_s: float  # n_ops · launch overhead


def estimate(work: StepWork, machine: Roofline) -> Estimate:
    """The step time the roofline gives for ``work`` (module docstring)."""
    if work.op_count is None:
        raise TimeModelError(
            "no work counts in this record (flops, bytes_accessed, op_groups): a record older than them"
        )
    by_class: dict[str, float] = {}
    for group in work.op_groups:
        by_class[group.op_class] = by_class.get(group.op_class, 0.0) + group.count * machine.op_seconds(group)
    launch = work.op_count * machine.launch_s
    return Estimate(sum(by_class.values()) + launch, by_class, launch)


def gpu_roofline(
    gpu: Gpu, tf32: bool = False, efficiency: dict[str, float] | None = None, launch_s: float = DEFAULT_LAUNCH_S
) -> Roofline:
    """The uncalibrated roofline of a catalogue GPU: datasheet peaks × efficiencies (default
    :data:`DEFAULT_EFFICIENCY`) and ``launch_s`` per op. ``tf32``: float32 matmuls run on TF32 tensor cores
    (``torch.backends.cuda.matmul.allow_tf32``)."""
    peaks = gpu.peaks
    if peaks is None:
        raise TimeModelError(f"no peak figures for this GPU ({gpu.name}): no time estimate")
    eff = DEFAULT_EFFICIENCY | (efficiency or {})
    fp32_matmul = peaks.tf32_flops if tf32 and peaks.tf32_flops else peaks.fp32_flops
    half = peaks.bf16_flops or peaks.fp32_flops
    matmul = {"float32": fp32_matmul, **dict.fromkeys(_HALF, half)}
    if gpu.sm < (8, 0):  # V100, T4: FP16 tensor cores, no BF16
        matmul["bfloat16"] = peaks.fp32_flops
    return Roofline(
        matmul_flops={k: v * eff["matmul"] for k, v in matmul.items()},
        attention_flops={k: v * eff["attention"] for k, v in matmul.items()},
        elementwise_flops=peaks.fp32_flops * eff["elementwise"],
        bandwidth=peaks.memory_bandwidth * eff["bandwidth"],
        launch_s=launch_s,
        label=f"{gpu.name} datasheet peaks × default efficiencies (estimated, uncalibrated)",
    )


_WORK_FIELDS = ("flops", "bytes_accessed", "op_count", "op_groups")


def _timed_with_work(records: Iterable[CaseRecord]) -> list[CaseRecord]:
    """The ok records with a measured step time and work counts; TimeModelError naming the missing fields when
    there is none (no timed record: time_median_s; timed ones without counts: the work fields)."""
    timed = [r for r in records if r.status == "ok" and r.timing.time_median_s is not None]
    usable = [r for r in timed if r.work.op_count is not None]
    if not usable:
        missing = ", ".join(_WORK_FIELDS) if timed else "time_median_s"
        raise TimeModelError(f"no record to calibrate the time model from: the records lack {missing}")
    return usable


def _median_ratio(records: list[CaseRecord], machine: Roofline) -> float:
    return statistics.median(r.timing.time_median_s / estimate(r.work, machine).seconds for r in records)


def fit_scale(records: Iterable[CaseRecord], machine: Roofline) -> Roofline:
    """``machine`` scaled by the median over ``records`` of measured ÷ estimated step time (ok, timed records
    with work counts); TimeModelError naming the missing fields when none has work counts or a time."""
    usable = _timed_with_work(records)
    return replace(
        machine.scaled(_median_ratio(usable, machine)), label=f"{machine.label}, fitted to {len(usable)} record(s)"
    )


# The fit's unknowns: inverse efficiencies of the rate classes (1 / share of the peak), then seconds per launch.
RATE_CLASSES = ("matmul", "attention", "elementwise", "bandwidth")
UNKNOWNS = (*RATE_CLASSES, "launch")
MIN_SHARE = 0.01  # an unknown is fitted where its terms hold ≥ 1 % of some record's measured time
FIT_ROUNDS = 50


@dataclass(frozen=True)
class EfficiencyFit:
    """Efficiencies (shares of the datasheet peaks) and the launch time fitted to one GPU model's timed records,
    applicable to any catalogue GPU with peaks (:meth:`roofline`)."""

    efficiency: dict[str, float]  # RATE_CLASSES -> share of the peak
    launch_s: float
    records: int
    device_name: str  # the records' GPU, e.g. "NVIDIA H100 80GB HBM3"
    fitted: tuple[str, ...] = ()  # UNKNOWNS the records constrain and the fit set
    single_factor: float | None = None  # the fallback: one factor on every default term
    relative_error: float = 0.0  # RMS of (estimated − measured) / measured over the records

    @property
    def label(self) -> str:
        where = f"calibrated from {self.records} record(s) of {self.device_name}"
        if self.single_factor is not None:
            return (
                f"{where}: one factor ×{self.single_factor:.3g} on the default efficiencies (the records cannot "
                f"separate the op classes); RMS error {self.relative_error:.1%}"
            )
        parts = [f"{k} {self.efficiency[k]:.0%} of peak" for k in RATE_CLASSES if k in self.fitted]
        if "launch" in self.fitted:
            parts.append(f"launch {self.launch_s * 1e6:.3g} µs")
        left = [k for k in UNKNOWNS if k not in self.fitted]
        if left:
            parts.append(f"{', '.join(left)} at default (no record constrains {'it' if len(left) == 1 else 'them'})")
        return f"{where}: {'; '.join(parts)}; RMS error {self.relative_error:.1%}"

    def roofline(self, gpu: Gpu, tf32: bool = False) -> Roofline:
        """``gpu``'s datasheet peaks × the fitted efficiencies, labelled as calibrated."""
        machine = gpu_roofline(gpu, tf32, self.efficiency, self.launch_s)
        return replace(machine, label=f"{gpu.name} datasheet peaks, {self.label}", calibrated=True)


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ‖a·x − b‖ over x ≥ 0, exactly for a few columns: the best non-negative least-squares solution on
    any subset of the columns (the optimum's support is one of them)."""
    n = a.shape[1]
    best, best_residual = np.zeros(n), float(b @ b)
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (x < 0).any():
                continue
            residual = float(np.sum((a[:, cols] @ x - b) ** 2))
            if residual < best_residual:
                best, best_residual = np.zeros(n), residual
                best[cols] = x
    return best


def _design_row(work: StepWork, peak: Roofline, u: dict[str, float]) -> dict[str, float]:
    """The record's row of A under the binding terms that ``u`` (inverse efficiencies, launch) picks."""
    row = dict.fromkeys(UNKNOWNS, 0.0)
    for group in work.op_groups:
        compute, memory = peak.op_terms(group)
        if compute > 0 and compute * u[group.op_class] >= memory * u["bandwidth"]:  # a copy has no compute
            row[group.op_class] += group.count * compute
        else:
            row["bandwidth"] += group.count * memory
    row["launch"] = float(work.op_count)
    return row


def fit_efficiencies(
    records: Iterable[CaseRecord], gpu: Gpu, device_name: str, start: dict[str, float] | None = None
) -> EfficiencyFit:
    """Fit the efficiencies and launch time (module docstring) to the ok, timed records with work counts of
    ``device_name``, a GPU of ``gpu``'s datasheet peaks; ``start``: the efficiencies (and ``"launch"`` seconds)
    to start from and keep where unconstrained (default :data:`DEFAULT_EFFICIENCY`, :data:`DEFAULT_LAUNCH_S`).
    TimeModelError (one line) when no record has a time and work counts, or ``gpu`` has no peaks."""
    chosen = _timed_with_work(r for r in records if r.device_name == device_name)
    given = {**DEFAULT_EFFICIENCY, "launch": DEFAULT_LAUNCH_S, **(start or {})}
    u0 = {k: 1.0 / given[k] for k in RATE_CLASSES} | {"launch": given["launch"]}
    peak = gpu_roofline(gpu, efficiency=dict.fromkeys(RATE_CLASSES, 1.0))
    times = np.array([r.timing.time_median_s for r in chosen])

    def result(u: dict[str, float], fitted: tuple[str, ...], error: float, factor: float | None = None):
        efficiency = {k: 1.0 / u[k] for k in RATE_CLASSES}
        return EfficiencyFit(efficiency, u["launch"], len(chosen), device_name, fitted, factor, error)

    def rms_error(u: dict[str, float]) -> float:
        machine = gpu_roofline(gpu, efficiency={k: 1.0 / u[k] for k in RATE_CLASSES}, launch_s=u["launch"])
        estimated = np.array([estimate(r.work, machine).seconds for r in chosen])
        return float(np.sqrt(np.mean(((estimated - times) / times) ** 2)))

    u, best, seen, pinned = dict(u0), None, set(), set()
    for _ in range(FIT_ROUNDS):
        rows = [_design_row(r.work, peak, u) for r in chosen]
        free = [
            k
            for k in UNKNOWNS
            if k not in pinned and max(row[k] * u0[k] / t for row, t in zip(rows, times)) >= MIN_SHARE
        ]
        key = (tuple(tuple(row.values()) for row in rows), tuple(free))
        if key in seen:  # a fixed point (or a cycle): nothing new to learn
            break
        seen.add(key)
        if not free:
            break
        a = np.array([[row[k] for k in free] for row in rows]) / times[:, None]
        rest = np.array([sum(row[k] * u0[k] for k in UNKNOWNS if k not in free) for row in rows])
        b = (times - rest) / times
        if np.linalg.matrix_rank(a) < len(free):  # the records cannot separate these unknowns
            factor = _median_ratio(chosen, gpu_roofline(gpu, efficiency=given, launch_s=given["launch"]))
            scaled = {k: u0[k] * factor for k in UNKNOWNS}
            return result(scaled, (), rms_error(scaled), factor)
        x = dict(zip(free, map(float, _nnls(a, b))))
        zero_rates = {k for k in free if k in RATE_CLASSES and x[k] == 0.0}
        if zero_rates:  # no rate to infer for a class the records say costs nothing: its default, fit again
            pinned |= zero_rates
            u = dict(u0)
            continue
        u = u0 | x
        error = rms_error(u)
        if best is None or error < best[0]:
            best = (error, dict(u), tuple(free))
    if best is None:
        return result(u0, (), rms_error(u0))
    error, u, fitted = best
    return result(u, fitted, error)


def time_estimate(work: StepWork, gpu: Gpu) -> TimeEstimate:
    """A record's :class:`TimeEstimate` on ``gpu``'s uncalibrated roofline; an empty one with the reason when
    ``gpu`` has no peak figures or ``work`` has no counts."""
    try:
        machine = gpu_roofline(gpu)
        seconds = estimate(work, machine).seconds
    except TimeModelError as exc:
        return TimeEstimate(estimate_gpu=gpu.name, estimate_reason=str(exc))
    return TimeEstimate(seconds, gpu.name, machine.calibrated, machine.label)
