"""Which devices this process can measure on, and strict parsing of device strings.

``meta`` is always valid: a case there runs on meta tensors (shapes, no data) and *predicts* the exact live
tensor bytes of the step with nothing allocated (bench/case/meta_device.py; docs/meta-and-planner.md)."""

from __future__ import annotations

import torch


def visible_devices() -> list[str]:
    """``["cuda:0", "cuda:1", ...]`` for the GPUs torch sees (after CUDA_VISIBLE_DEVICES), else ``["cpu"]``."""
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def resolve_device(spec: str | torch.device) -> torch.device:
    """Parse ``spec`` ("cpu", "meta", "cuda", "cuda:1" or a torch.device) into a device that exists here.

    "cpu" and "meta" are always valid; "cuda" means the current CUDA device. Anything else (a missing GPU index,
    CUDA on a machine without it, another backend) raises ValueError naming the visible devices."""
    visible = visible_devices()
    listing = ", ".join(["cpu", "meta"] + [d for d in visible if d != "cpu"])
    try:
        device = spec if isinstance(spec, torch.device) else torch.device(str(spec).strip())
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {spec!r}; visible devices: {listing}") from None
    if device.type in ("cpu", "meta"):
        return torch.device(device.type)
    if device.type != "cuda":
        raise ValueError(f"device {spec!r} is not supported (cpu, meta or cuda only); visible devices: {listing}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} is not available: no CUDA GPU visible; visible devices: {listing}")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device {spec!r} does not exist; visible devices: {listing}")
    return torch.device("cuda", index)
