"""What a GPU needs beyond the live tensor bytes of a step: the overhead model behind every predicted capacity.

The tensor tracker counts live tensor storages exactly, on any device (on meta, without running anything).
A real GPU needs more, and none of it is a tensor:

* the CUDA context, loaded kernels and library handles — 300–700 MB per process (ANCHORS.md, "Measuring
  memory"), visible to NVML at case start (``nvml_baseline_bytes``) before the case allocates anything;
* library workspaces: cuBLAS (a few MiB per handle and stream; 32 MiB chunks on Hopper), cuBLASLt, cuDNN and
  the fused attention kernels' scratch;
* the caching allocator's rounding (every block to a multiple of 512 B, small requests in 2 MiB segments,
  large ones in 20 MiB or exact-size segments) and fragmentation: reserved ≥ allocated ≥ tensor bytes.

:class:`OverheadModel` states it as ``device bytes = fixed + (1 + fraction) · tensor bytes``. The defaults
(:data:`DEFAULT_OVERHEAD`) are conservative: ``fixed`` = 1 GiB (the context's upper 700 MB plus ~300 MB of
workspaces), ``fraction`` = 10 % (PyTorch's own MemTracker test accepts its tracked peak within 10 % of the
allocator's active peak; rounding and fragmentation are that order). ``--budget-overhead 1.5GiB+5%`` replaces
them; :func:`calibrate` measures them from real GPU results instead: a least-squares line of the allocator's
peak reserved bytes against the tracked peak tensor bytes over a GPU model's ``ok`` CUDA records gives the
fraction (slope − 1) and the allocator's own constant (intercept), to which the median NVML case-start baseline
(context + everything outside the allocator) is added as the fixed part. A fit under which device bytes would not
grow with tensor bytes (slope ≤ 0, a fraction of −100 % or below) is refused; the model names the GPU it came from.

Torch-free on purpose (``bench/config/options.py`` parses ``--budget-overhead`` with :func:`parse_overhead`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from bench.config.sizes import parse_byte_size

__all__ = [
    "DEFAULT_OVERHEAD",
    "CalibrationError",
    "OverheadModel",
    "calibrate",
    "parse_overhead",
]

GIB = 2**30


class CalibrationError(ValueError):
    """Calibration records that cannot give a model (none usable, several GPU models, ...); one line."""


@dataclass(frozen=True)
class OverheadModel:
    """device bytes = ``fixed_bytes`` + (1 + ``fraction``) · tensor bytes; ``source`` says where the numbers
    came from (recorded with every prediction), ``gpu`` the GPU model whose records a calibrated model was fitted
    to (None otherwise)."""

    fixed_bytes: int
    fraction: float
    source: str = "default"
    gpu: str | None = None

    def device_bytes(self, tensor_bytes: int) -> int:
        return self.fixed_bytes + math.ceil((1.0 + self.fraction) * tensor_bytes)

    def fits(self, tensor_bytes: int, budget_bytes: int) -> bool:
        return self.device_bytes(tensor_bytes) <= budget_bytes

    def tensor_capacity(self, budget_bytes: int) -> float:
        """The largest tensor peak a budget holds under this model (for affine guesses; may be negative)."""
        return (budget_bytes - self.fixed_bytes) / (1.0 + self.fraction)

    def describe(self) -> str:
        return f"{self.fixed_bytes / GIB:.2f} GiB + {self.fraction:.1%} of tensor bytes ({self.source})"


DEFAULT_OVERHEAD = OverheadModel(
    fixed_bytes=GIB,
    fraction=0.10,
    source="default: CUDA context <= 700 MB + ~300 MB workspaces; 10 % allocator rounding and fragmentation",
)


def parse_overhead(text: str) -> OverheadModel:
    """``"1GiB+10%"`` (fixed part, then the fraction of tensor bytes as a percentage) → an :class:`OverheadModel`;
    ``"0+0%"`` means none. The fixed part is a size as every size option takes it
    (:func:`bench.config.sizes.parse_byte_size`: a unit unless it is 0). ValueError (one line) for anything else."""
    usage = f"{text!r} is not FIXED+PERCENT (e.g. 1GiB+10%, 512MiB+5%, 0+0%)"
    fixed_text, plus, percent_text = str(text).rpartition("+")  # the percentage holds no '+'; 1e+9B may
    percent = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", percent_text)
    if not plus or not percent:
        raise ValueError(usage)
    try:
        fixed = parse_byte_size(fixed_text, allow_zero=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not FIXED+PERCENT: {exc}") from None
    fraction = float(percent.group(1)) / 100
    if not math.isfinite(fraction):
        raise ValueError(f"{text!r}: sizes must be finite")
    return OverheadModel(fixed, fraction, source=f"--budget-overhead {text.strip()}")


@dataclass(frozen=True)
class CalibrationPoint:
    """One ``ok`` CUDA case: what the tracker counted, what the allocator reserved, NVML before the case."""

    gpu: str
    tensor_bytes: int
    reserved_bytes: int
    baseline_bytes: int


def calibration_points(records: Iterable) -> list[CalibrationPoint]:
    """The usable points of ``records`` (CaseRecords): ok, on CUDA, with all three figures."""
    points = []
    for r in records:
        m = r.memory
        if (
            r.status == "ok"
            and str(r.device).startswith("cuda")
            and m.peak_tensor_bytes
            and m.peak_reserved_bytes
            and m.nvml_baseline_bytes is not None
        ):
            points.append(
                CalibrationPoint(
                    r.device_name or "unknown GPU", m.peak_tensor_bytes, m.peak_reserved_bytes, m.nvml_baseline_bytes
                )
            )
    return points


def calibrate(records: Iterable, gpu: str | None = None) -> OverheadModel:
    """Fit the overhead model of one GPU model from real results (module docstring). ``gpu`` picks the GPU model
    by a case-insensitive substring of its name when the records hold several."""
    points = calibration_points(records)
    models = sorted({p.gpu for p in points})
    if gpu is not None:
        models = [m for m in models if gpu.lower() in m.lower()]
    if not models:
        raise CalibrationError(
            "no ok CUDA record with peak_reserved_bytes, peak_tensor_bytes and nvml_baseline_bytes"
            + (f" for a GPU matching {gpu!r}" if gpu else "")
        )
    if len(models) > 1:
        raise CalibrationError(
            f"records from several GPU models ({'; '.join(models)}); choose one with --calibrate-gpu"
        )
    chosen = [p for p in points if p.gpu == models[0]]
    baseline = int(statistics.median(p.baseline_bytes for p in chosen))
    xs = [p.tensor_bytes for p in chosen]
    ys = [p.reserved_bytes for p in chosen]
    if len(set(xs)) >= 2:
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        intercept = mean_y - slope * mean_x
    else:  # one tensor size: all of the difference is proportional
        slope, intercept = statistics.fmean(y / x for x, y in zip(xs, ys)), 0.0
    fit = (
        f"calibrated on {len(chosen)} {models[0]} record(s): reserved = {intercept / GIB:+.3f} GiB + "
        f"{slope:.4f} x tensor bytes"
    )
    if slope <= 0:  # a model under which a larger step needs less memory: every capacity it gave would be wrong
        trend = "fall" if slope < 0 else "stay the same"
        raise CalibrationError(
            f"refused the fit {fit} (overhead fraction {slope - 1:.1%}): device bytes would {trend} as tensor "
            "bytes grow; the records disagree (other runs, settings or cards mixed in?)"
        )
    return OverheadModel(
        fixed_bytes=round(baseline + intercept),
        fraction=slope - 1.0,
        source=f"{fit}, NVML case-start baseline {baseline / GIB:.3f} GiB",
        gpu=models[0],
    )
