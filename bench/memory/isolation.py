"""Case boundaries on one device: what runs before a case allocates anything and after it released everything.

In-process isolation (README, "Isolation"): garbage collection, the caching allocator emptied and its statistics
reset at both ends of a case, and at the start the NVML reading every later ``nvml_peak_minus_baseline_bytes``
is taken against (CUDA context, loaded kernels and library handles, other processes).
"""

from __future__ import annotations

import torch

from . import allocator
from .nvml import read_used_bytes

__all__ = ["end_case", "start_case"]


def start_case(device: torch.device, notes: list[str]) -> int | None:
    """Reset the device's allocator state; on CUDA return NVML ``used`` now (None with a note if unreadable)."""
    allocator.reset_between_cases(device)
    if device.type != "cuda":
        return None
    used, nvml_notes = read_used_bytes(device.index)
    notes.extend(f"case-start baseline: {note}" for note in nvml_notes)
    return used


def end_case(device: torch.device) -> None:
    """Release what the case left in the allocator's cache; its tensors must be unreferenced already."""
    allocator.reset_between_cases(device)
