"""What one rank needs to run its share of a case: a plain, JSON-able :class:`RankJob` (no pickle)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dp.base import DEFAULT_LR
from bench.dp.privacy import PrivacyParams
from bench.results.record import CaseRecord


@dataclass(frozen=True)
class RankJob:
    """A many-rank case and the settings its ranks run it with (from the parent's BenchConfig)."""

    workload: str
    method: str
    batch_size: int  # global
    device: str  # "cpu" or "cuda"
    world_size: int
    parallel: str
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
        return self.batch_size // self.world_size

    def new_record(self, **fields: Any) -> CaseRecord:
        """A record of this job's case (identity and ranks), with ``fields`` set (status, privacy, device facts)."""
        return CaseRecord(
            workload=self.workload,
            method=self.method,
            batch_size=self.batch_size,
            device=self.device,
            world_size=self.world_size,
            parallel=self.parallel,
            **fields,
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data)  # σ, ε may be inf: Python's JSON writes and reads Infinity

    @classmethod
    def from_json(cls, text: str) -> RankJob:
        data: dict[str, Any] = json.loads(text)
        data["privacy"] = PrivacyParams(**data["privacy"])
        data["workload_modules"] = tuple(data.get("workload_modules", ()))
        return cls(**data)

    def write(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> RankJob:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
