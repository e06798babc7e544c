"""A small catalogue of common CUDA GPUs: the memory a capacity plan budgets against, and the compute capability
that decides which attention kernel torch runs there (bench/case/attention.py).

Memory is the vendor's datasheet figure (NVIDIA product pages and datasheets: "40GB HBM2", "80GB HBM3", "141GB
HBM3e", "24GB GDDR6", ...), read as GiB. What CUDA reports as a card's ``total_memory`` is a little lower (the
driver keeps some; an "80 GB" card shows about 79.2–79.6 GiB), and the CUDA context takes its share of what is
left: both belong to the overhead model's fixed part (bench/plan/overhead.py), and ``--memory`` with a card's own
``torch.cuda.get_device_properties(i).total_memory`` is exact where the datasheet figure is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.messages import did_you_mean

__all__ = ["GPUS", "Gpu", "get_gpu", "matching_gpus"]

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str  # the catalogue key, e.g. "h100-80gb"
    product: str  # the vendor's product name
    memory_bytes: int  # datasheet memory, read as GiB
    sm: tuple[int, int]  # CUDA compute capability

    @property
    def model(self) -> str:
        """The model in the catalogue key, letters and digits only: "h100" (h100-80gb), "h100nvl", "rtxa6000"."""
        return re.sub(r"[^a-z0-9]", "", re.sub(r"-[0-9]+gb$", "", self.name))


def _gpu(name: str, product: str, gib: int, sm: tuple[int, int]) -> tuple[str, Gpu]:
    return name, Gpu(name, product, gib * GIB, sm)


GPUS: dict[str, Gpu] = dict(
    [
        _gpu("v100-16gb", "NVIDIA V100 16GB HBM2", 16, (7, 0)),
        _gpu("v100-32gb", "NVIDIA V100 32GB HBM2", 32, (7, 0)),
        _gpu("t4-16gb", "NVIDIA T4 16GB GDDR6", 16, (7, 5)),
        _gpu("a10-24gb", "NVIDIA A10 24GB GDDR6", 24, (8, 6)),
        _gpu("a10g-24gb", "NVIDIA A10G 24GB GDDR6 (AWS)", 24, (8, 6)),
        _gpu("rtx3090-24gb", "NVIDIA GeForce RTX 3090 24GB GDDR6X", 24, (8, 6)),
        _gpu("rtx-a6000-48gb", "NVIDIA RTX A6000 48GB GDDR6", 48, (8, 6)),
        _gpu("a100-40gb", "NVIDIA A100 40GB HBM2", 40, (8, 0)),
        _gpu("a100-80gb", "NVIDIA A100 80GB HBM2e", 80, (8, 0)),
        _gpu("l4-24gb", "NVIDIA L4 24GB GDDR6", 24, (8, 9)),
        _gpu("l40s-48gb", "NVIDIA L40S 48GB GDDR6", 48, (8, 9)),
        _gpu("rtx4090-24gb", "NVIDIA GeForce RTX 4090 24GB GDDR6X", 24, (8, 9)),
        _gpu("h100-80gb", "NVIDIA H100 80GB HBM3 (SXM) / HBM2e (PCIe)", 80, (9, 0)),
        _gpu("h100-nvl-94gb", "NVIDIA H100 NVL 94GB HBM3", 94, (9, 0)),
        _gpu("h200-141gb", "NVIDIA H200 141GB HBM3e", 141, (9, 0)),
    ]
)


def get_gpu(name: str) -> Gpu:
    """The catalogue entry ``name``; ValueError (one line, close matches and every valid name) otherwise."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    raise ValueError(f"unknown GPU {name!r}{did_you_mean(key, list(GPUS))}; known: {', '.join(GPUS)}")


def matching_gpus(device_name: str) -> list[Gpu]:
    """The catalogue entries a CUDA device's name (NVML / ``torch.cuda.get_device_name``: "NVIDIA A100-SXM4-80GB",
    "NVIDIA H100 80GB HBM3", "Tesla T4") may be: those of the longest catalogue model the name holds ("a100", not
    "a10"; "h100nvl", not "h100"), of the memory the name states if it states one; [] when none."""
    text = device_name.lower()
    compact = re.sub(r"[^a-z0-9]", "", text)
    held = [gpu for gpu in GPUS.values() if gpu.model in compact]
    longest = max((len(gpu.model) for gpu in held), default=0)
    held = [gpu for gpu in held if len(gpu.model) == longest]
    stated = re.search(r"(?<![a-z0-9])([0-9]+)\s*gb\b", text)
    if stated:
        held = [gpu for gpu in held if gpu.memory_bytes == int(stated.group(1)) * GIB]
    return held
