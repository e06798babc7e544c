"""What one rank needs to run its share of a case: a plain, JSON-able :class:`RankJob` (no pickle)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.case.spec import CaseSpec, case_record
from bench.dp.base import DEFAULT_LR
from bench.dp.privacy import PrivacyParams
from bench.results.record import CaseRecord


@dataclass(frozen=True)
class RankJob:
    """A many-rank case and the settings its ranks run it with (from the parent's BenchConfig)."""

    case: CaseSpec  # world_size > 1, parallel set, fp32 without checkpointing
    privacy: PrivacyParams
    optimizer: str = "adamw"
    lr: float = DEFAULT_LR
    seed: int = 0
    rounds: int = 3  # timed rounds (0: none)
    sample_interval_s: float = 0.001
    memory_cap_bytes: int | None = None  # CPU: per rank
    runner_label: str | None = None
    workload_modules: tuple[str, ...] = ()
    torch_threads: int | None = None
    timeout_s: float = 900.0  # the process group's collective timeout

    @property
    def local_batch_size(self) -> int:
        return self.case.batch_size // self.case.world_size

    def new_record(self, device: torch.device | str | None = None, **fields: Any) -> CaseRecord:
        """A record of this job's case before anything ran on ``device`` (its facts; default the case's device
        type), with ``fields`` set (status, reason)."""
        record = case_record(self.case, self.privacy, self.optimizer, self.runner_label, device)
        return dataclasses.replace(record, **fields)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data)  # σ, ε may be inf: Python's JSON writes and reads Infinity

    @classmethod
    def from_json(cls, text: str) -> RankJob:
        data: dict[str, Any] = json.loads(text)
        data["case"] = CaseSpec(**data["case"])
        data["privacy"] = PrivacyParams(**data["privacy"])
        data["workload_modules"] = tuple(data.get("workload_modules", ()))
        return cls(**data)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> RankJob:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
