"""Facts about the machine a run happened on: GPUs (via NVML, else torch), driver/CUDA, versions, CPU, RAM.

Recorded with every result so runs on different GPUs or runners can be told apart and compared."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

from bench.trackers.memory.nvml import init_note, load_nvml

PACKAGES = ("torch", "opacus", "nvidia-ml-py", "psutil", "pytest-benchmark")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _gpus_from_nvml(nvml: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpu: dict[str, Any] = {
            "nvml_index": index,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "total_memory_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        }
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            gpu["mig_mode"] = bool(current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))
        except Exception:  # NotSupported on GPUs without MIG
            gpu["mig_mode"] = None
        gpus.append(gpu)
    facts: dict[str, Any] = {"driver_version": _text(nvml.nvmlSystemGetDriverVersion())}
    try:
        version = int(nvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 -> "12.4"
        facts["cuda_driver_version"] = f"{version // 1000}.{(version % 1000) // 10}"
    except Exception:
        facts["cuda_driver_version"] = None
    return gpus, facts


def _gpus_from_torch() -> list[dict[str, Any]]:
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "torch_index": index,
                    "name": props.name,
                    "total_memory_bytes": int(props.total_memory),
                    "uuid": str(getattr(props, "uuid", "")) or None,
                    "mig_mode": None,
                }
            )
    return gpus


def machine_info(nvml_module: Any = None) -> dict[str, Any]:
    """Every GPU (name, memory, UUID, MIG mode), driver/CUDA versions, package versions, CPU, RAM, runner label."""
    info: dict[str, Any] = {
        "gpus": [],
        "driver_version": None,
        "cuda_driver_version": None,
        "cuda_runtime_version": torch.version.cuda,
        "gpu_source": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": ram_bytes(),
        "packages": package_versions(),
        "runner_label": os.environ.get("DPMEM_RUNNER_LABEL") or None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "notes": [],
    }
    nvml, note = load_nvml(nvml_module)
    if nvml is not None:
        try:
            nvml.nvmlInit()
        except Exception as exc:
            info["notes"].append(init_note(nvml, exc))
        else:
            try:
                gpus, facts = _gpus_from_nvml(nvml)
                info.update(facts, gpus=gpus, gpu_source="nvml")
            except Exception as exc:
                info["notes"].append(f"NVML: query failed ({type(exc).__name__}: {exc})")
            finally:
                try:
                    nvml.nvmlShutdown()
                except Exception:
                    pass
    elif note:
        info["notes"].append(note)
    if not info["gpus"]:
        torch_gpus = _gpus_from_torch()
        if torch_gpus:
            info.update(gpus=torch_gpus, gpu_source="torch")
    return info


def device_facts(device: torch.device | str) -> tuple[str, int | None]:
    """(device_name, device_memory_bytes): the GPU's name and total memory, the CPU model and RAM, or for meta
    ("meta", None) — a prediction is the same on every machine, so results compare across machines."""
    device = torch.device(device)
    if device.type == "meta":
        return "meta", None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        return props.name, int(props.total_memory)
    return cpu_model(), ram_bytes()
