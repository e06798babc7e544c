"""Estimated step times of predicted (meta) records, for the paper tables and the report's predicted blocks.

    estimated step = the record's stored estimate (``estimated_step_s``) when it is for the GPU asked,
                     else estimate(record.work, gpu_roofline(gpu))     (bench/plan/timemodel.py)
    × nondp        = the method's estimate ÷ nondp's, same workload, batch, training mode and GPU

An estimate is a roofline over the step's exact op groups: datasheet peaks × default efficiencies unless the
record's estimate was calibrated, every op its own kernel (no fusion). A record without work counts, or a GPU
without datasheet peaks, has no estimate; :attr:`StepEstimate.reason` says why, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plan.gpus import DEFAULT_GPU, get_gpu
from bench.plan.timemodel import time_estimate
from bench.results.record import CaseRecord

__all__ = ["DEFAULT_GPU", "NO_WORK", "StepEstimate", "estimate_words", "step_estimate"]

NO_WORK = "no work counts"


@dataclass(frozen=True)
class StepEstimate:
    """One record's estimated step time on one GPU, or why there is none (``seconds`` None, ``reason`` set)."""

    seconds: float | None
    gpu: str
    calibrated: bool = False
    source: str = ""  # what the rates rest on (the Roofline's label, or the record's estimate_source)
    reason: str = ""

    def over(self, nondp: StepEstimate | None) -> float | None:
        """This estimate ÷ nondp's, when both exist on the same GPU under the same calibration."""
        if self.seconds is None or nondp is None or nondp.seconds is None:
            return None
        if (nondp.gpu, nondp.calibrated) != (self.gpu, self.calibrated):
            return None
        return self.seconds / nondp.seconds


def step_estimate(record: CaseRecord, gpu: str | None = None) -> StepEstimate:
    """``record``'s estimated step on ``gpu`` (default: the GPU its stored estimate is for, else
    :data:`DEFAULT_GPU`): the stored figure for that GPU, else computed from the record's work counts. ValueError
    (one line) for a GPU name not in the catalogue."""
    stored = record.estimate
    name = get_gpu(gpu or stored.estimate_gpu or DEFAULT_GPU).name
    if stored.estimated_step_s is not None and stored.estimate_gpu == name:
        return StepEstimate(stored.estimated_step_s, name, bool(stored.estimate_calibrated), stored.estimate_source)
    if record.work.op_count is None:
        return StepEstimate(None, name, reason=stored.estimate_reason or NO_WORK)
    computed = time_estimate(record.work, get_gpu(name))  # what the bench stores for a meta record on that GPU
    return StepEstimate(
        computed.estimated_step_s,
        name,
        bool(computed.estimate_calibrated),
        computed.estimate_source,
        computed.estimate_reason,
    )


def milliseconds_text(seconds: float) -> str:
    """An estimated step in ms, 3 significant digits or more: "1.29", "37.6", "1351"."""
    ms = seconds * 1e3
    return f"{ms:.{2 if ms < 10 else 1 if ms < 100 else 0}f}"


def estimate_words(estimates: list[StepEstimate]) -> str:
    """What a table's estimates rest on, for its caption: "estimated, uncalibrated, h100-80gb datasheet peaks ×
    default efficiencies; no fusion" (each GPU and calibration state of ``estimates`` once)."""
    kinds = dict.fromkeys((e.gpu, e.calibrated, e.source) for e in estimates if e.seconds is not None)
    if not kinds:
        return "no estimate"
    parts = []
    for gpu, calibrated, source in kinds:
        if calibrated:
            parts.append(f"estimated, calibrated, {gpu}: {source or 'fitted rates'}")
        else:
            parts.append(f"estimated, uncalibrated, {gpu} datasheet peaks × default efficiencies")
    return "; ".join(parts) + "; no fusion (every op its own kernel)"
