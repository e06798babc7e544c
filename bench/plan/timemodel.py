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
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

from bench.plan.gpus import Gpu
from bench.results.record import CaseRecord, OpGroup, StepWork

__all__ = ["DEFAULT_EFFICIENCY", "Roofline", "TimeModelError", "estimate", "fit_scale", "gpu_roofline"]

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

    def op_seconds(self, group: OpGroup) -> float:
        """Seconds of one op of ``group``: the slower of its arithmetic and its memory traffic."""
        if group.op_class == "copy" or group.flops == 0:
            compute = 0.0
        elif group.op_class == "elementwise":
            compute = group.flops / self.elementwise_flops
        else:
            rates = self.matmul_flops if group.op_class == "matmul" else self.attention_flops
            compute = group.flops / rates.get(group.dtype, rates["float32"])
        return max(compute, group.bytes_accessed / self.bandwidth)

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


def gpu_roofline(gpu: Gpu, tf32: bool = False, efficiency: dict[str, float] | None = None) -> Roofline:
    """The uncalibrated roofline of a catalogue GPU: datasheet peaks × efficiencies (default
    :data:`DEFAULT_EFFICIENCY`). ``tf32``: float32 matmuls run on TF32 tensor cores
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
        launch_s=DEFAULT_LAUNCH_S,
        label=f"{gpu.name} datasheet peaks × default efficiencies (estimated, uncalibrated)",
    )


_WORK_FIELDS = ("flops", "bytes_accessed", "op_count", "op_groups")


def fit_scale(records: Iterable[CaseRecord], machine: Roofline) -> Roofline:
    """``machine`` scaled by the median over ``records`` of measured ÷ estimated step time (ok, timed records
    with work counts); TimeModelError naming the missing fields when none has work counts or a time."""
    ratios: list[float] = []
    timed = 0
    for record in records:
        if record.status != "ok" or record.timing.time_median_s is None:
            continue
        timed += 1
        if record.work.op_count is not None:
            ratios.append(record.timing.time_median_s / estimate(record.work, machine).seconds)
    if not ratios:
        missing = ", ".join(_WORK_FIELDS) if timed else "time_median_s"
        raise TimeModelError(f"no record to calibrate the time model from: the records lack {missing}")
    return replace(
        machine.scaled(statistics.median(ratios)), label=f"{machine.label}, fitted to {len(ratios)} record(s)"
    )
