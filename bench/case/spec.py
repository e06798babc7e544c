"""What a bench case is: a :class:`CaseSpec` (workload × method × batch size × device × training mode, and its
ranks), and the record it starts with before anything runs (:func:`new_record`).

Its own module because both runners build on it: the one-process case (bench/case/runner.py) and the many-rank
launcher (bench/ranks/launch.py), which bench/case/runner.py hands its many-rank cases to.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import dp
from bench.config.settings import BenchConfig
from bench.results.record import CaseRecord
from bench.system.machine import device_facts

__all__ = ["CaseSpec", "case_record", "new_record"]


@dataclass(frozen=True)
class CaseSpec:
    """One case of the matrix: its identity, the same in pytest's case id, its record and its results row."""

    workload: str
    method: str
    batch_size: int  # the global logical batch (split evenly over the ranks when world_size > 1)
    device: str  # with world_size > 1: "cpu" or "cuda" (rank r uses its node's GPU LOCAL_RANK)
    world_size: int = 1
    parallel: str | None = None  # "ddp" or "fsdp" when world_size > 1 (bench/ranks)
    precision: str = "fp32"
    checkpointing: str = "none"
    trainable: str = "full"  # canonical (bench.dp.trainable): full, bitfit, attention, lora:r=R[:alpha=A]

    @property
    def mode(self) -> dp.TrainingMode:
        return dp.TrainingMode(self.precision, self.checkpointing, self.trainable)

    @property
    def case_id(self) -> str:
        """The id of the case in pytest (``test_dp_step[<case_id>]``), ``-k`` and ``--snapshot``; a non-default
        training mode appends its parts (``dit-tiny-cond-bk-bs4-cpu-amp-bf16-ckpt-lora-r8``), and a case on many ranks
        ends with its strategy and world size, e.g. ``-ddp2``."""
        ranks = [f"{self.parallel}{self.world_size}"] if self.world_size > 1 else []
        parts = (self.workload, self.method, f"bs{self.batch_size}", self.device, *self.mode.id_parts, *ranks)
        return "-".join(parts)

    def params(self, ranks: bool) -> dict[str, object]:
        """The case's ``params`` in the benchmark JSON: the training mode's keys always (results group by them),
        the ranks' (``world_size``, ``parallel``) when ``ranks``."""
        names = ["workload", "method", "batch_size", "device", "precision", "checkpointing", "trainable"]
        return {name: getattr(self, name) for name in names + (["world_size", "parallel"] if ranks else [])}


def new_record(spec: CaseSpec, config: BenchConfig) -> CaseRecord:
    """The record of ``spec`` before anything ran: the case, its privacy settings and the device's facts."""
    return case_record(spec, config.step.privacy, config.step.optimizer, config.output.runner_label)


def case_record(spec: CaseSpec, privacy, optimizer: str, runner_label: str | None, device=None) -> CaseRecord:
    """:func:`new_record` from the settings it reads; ``device``: whose facts (a rank's own GPU), default the case's."""
    device_name, device_memory = device_facts(spec.device if device is None else device)
    return CaseRecord(
        workload=spec.workload,
        method=spec.method,
        batch_size=spec.batch_size,
        device=spec.device,
        precision=spec.precision,
        checkpointing=spec.checkpointing,
        trainable=spec.trainable,
        microbatch_size=dp.get_method(spec.method).microbatch_size,
        **privacy.to_dict(),  # noise_multiplier, epsilon, delta, accountant, max_grad_norm, sample_rate, steps
        optimizer=optimizer,
        device_name=device_name,
        device_memory_bytes=device_memory,
        runner_label=runner_label,
        world_size=spec.world_size,
        parallel=spec.parallel,
    )
