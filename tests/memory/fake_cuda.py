"""A fake CUDA device for the bench's GPU paths on a machine without one.

:func:`install` patches the ``torch.cuda`` functions the bench calls (availability, device count, sync, the
caching allocator's figures and resets, device properties, the memory-snapshot recorder), makes ``import
pynvml`` return a :class:`tests.memory.fake_nvml.FakeNvml`, and makes workloads build their model and batch on
the CPU whatever device they are given. A case on ``cuda:0`` then runs its step on the CPU while every
measurement takes its CUDA path: NVML sampler and case-start baseline, allocator peaks, snapshots, device
warm-up. ``FakeCuda.events`` records the order of the calls tests care about.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import models
from bench.trackers.memory import isolation

MiB = 2**20


class _CpuWorkload:
    """A workload whose model and batch live on the CPU whatever device they are asked for."""

    def __init__(self, workload):
        self._workload = workload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._workload, name)

    def build_model(self, device):
        return self._workload.build_model("cpu")

    def make_batch(self, batch_size, generator=None, device=None):
        return self._workload.make_batch(batch_size, generator=generator, device="cpu")


@dataclass
class FakeCuda:
    nvml: Any
    allocated_bytes: int = 10 * MiB
    reserved_bytes: int = 12 * MiB
    events: list[str] = field(default_factory=list)
    snapshot_paths: list[str] = field(default_factory=list)
    warmed: list[torch.device] = field(default_factory=list)

    # --- torch.cuda ------------------------------------------------------------------------------------
    def synchronize(self, device=None) -> None:
        self.events.append("synchronize")

    def memory_allocated(self, device=None) -> int:
        self.events.append("memory_allocated")
        return self.allocated_bytes

    def record_memory_history(self, enabled="all", **kwargs) -> None:
        self.events.append("record_history" if enabled else "stop_history")

    def dump_snapshot(self, path) -> None:
        self.events.append("dump_snapshot")
        self.snapshot_paths.append(str(path))

    def warm_device(self, device) -> list[str]:
        self.events.append("warm_device")
        self.warmed.append(device)
        return []


def install(monkeypatch: pytest.MonkeyPatch, nvml: Any) -> FakeCuda:
    """Patch torch.cuda, pynvml, the workload registry and the device warm-up for one test (undone after)."""
    fake = FakeCuda(nvml)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "synchronize", fake.synchronize)
    for name in ("empty_cache", "reset_peak_memory_stats", "reset_accumulated_memory_stats"):
        monkeypatch.setattr(cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(cuda, "memory_allocated", fake.memory_allocated)
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: fake.reserved_bytes)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: fake.allocated_bytes)
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda device=None: fake.reserved_bytes)
    # No uuid / PCI attributes: the NVML handle is found through CUDA_VISIBLE_DEVICES (unset: the index).
    props = SimpleNamespace(name="Fake GPU", total_memory=80 * 2**30)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(cuda.memory, "_record_memory_history", fake.record_memory_history)
    monkeypatch.setattr(cuda.memory, "_dump_snapshot", fake.dump_snapshot)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    # CUDA generators cannot exist without CUDA: the case's noise generator is a CPU one.
    real_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device="cpu": real_generator())
    real_get_workload = models.get_workload
    monkeypatch.setattr(models, "get_workload", lambda spec: _CpuWorkload(real_get_workload(spec)))
    monkeypatch.setattr(isolation, "warm_device", fake.warm_device)
    monkeypatch.setattr(isolation, "_WARMED", set())
    return fake
