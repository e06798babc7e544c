"""Max-batch search (`pytest bench/ --max-batch`): the largest batch that fits, and an affine memory model.

Per workload × method × device: double the batch from 1 until a probe runs out of memory (or the limit),
then bisect between the last batch that fit and the first that did not. Every ok probe's peak feeds a least
squares fit peak(B) = fixed + per_sample·B, which predicts the max batch for any memory size ("would this fit
on an 80 GB card?"). What "fits" means: the GPU's own capacity, or on CPU the bench's memory cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bench.record import BatchProbe, MaxBatchRecord

Probe = Callable[[int], BatchProbe]


def search(
    probe: Probe, limit: int, say: Callable[[str], None] = lambda msg: None
) -> tuple[int | None, int | None, list[BatchProbe]]:
    """Return (largest ok batch, smallest failing batch, probes in the order run). ``limit`` caps the batch."""
    if limit < 1:
        raise ValueError(f"max-batch limit must be >= 1, got {limit}")
    probes: list[BatchProbe] = []

    def run(b: int) -> bool:
        result = probe(b)
        probes.append(result)
        say(f"batch {b}: {result.status}")
        return result.status == "ok"

    last_ok, first_fail, b = None, None, 1
    while b <= limit:
        if run(b):
            last_ok, b = b, b * 2
        else:
            first_fail = b
            break
    if first_fail is None and last_ok is not None and last_ok < limit:
        if run(limit):
            return limit, None, probes
        first_fail = limit
    if first_fail is None:
        return last_ok, None, probes
    lo, hi = (last_ok or 0), first_fail
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), hi, probes


def affine_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares (fixed, per_sample) of peak = fixed + per_sample·B; None with < 2 distinct batch sizes."""
    if len({b for b, _ in points}) < 2:
        return None
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in points)
    sxy = sum((b - mean_b) * (y - mean_y) for b, y in points)
    per_sample = sxy / sxx
    return mean_y - per_sample * mean_b, per_sample


def predict_max_batch(fixed: float, per_sample: float, memory_bytes: float) -> int | None:
    """Largest B with fixed + per_sample·B ≤ memory (0 if even the fixed part does not fit); None when the fit
    has no positive per-sample slope and so bounds nothing."""
    if per_sample <= 0:
        return None
    return max(0, math.floor((memory_bytes - fixed) / per_sample))


def build_record(
    workload: str,
    method: str,
    device: str,
    probes: list[BatchProbe],
    max_ok: int | None,
    first_fail: int | None,
    *,
    fit_metric: str,
    memory_limit_bytes: int | None,
    predict_for: list[int],
) -> MaxBatchRecord:
    record = MaxBatchRecord(
        workload=workload,
        method=method,
        device=device,
        memory_limit_bytes=memory_limit_bytes,
        max_batch_measured=max_ok,
        first_failing_batch=first_fail,
        fit_metric=fit_metric,
        probes=probes,
    )
    bad = next((p for p in probes if p.status in ("unsupported", "error")), None)
    if bad is not None:
        record.status = bad.status
        return record
    points = [(p.batch_size, getattr(p, fit_metric)) for p in probes if p.status == "ok" and getattr(p, fit_metric)]
    fit = affine_fit(points)
    if fit is not None:
        record.fit_fixed_bytes, record.fit_per_sample_bytes = fit
        sizes = sorted(set(predict_for) | ({memory_limit_bytes} if memory_limit_bytes else set()))
        record.predicted_max_batch = {str(m): predict_max_batch(*fit, m) for m in sizes}
    return record
