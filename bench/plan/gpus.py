"""A small catalogue of common CUDA GPUs: the memory a capacity plan budgets against, and the compute capability
that decides which attention kernel torch runs there (bench/case/attention.py).

Memory is the vendor's datasheet figure (NVIDIA product pages and datasheets: "40GB HBM2", "80GB HBM3", "141GB
HBM3e", "24GB GDDR6", ...), read as GiB. What CUDA reports as a card's ``total_memory`` is a little lower (the
driver keeps some; an "80 GB" card shows about 79.2–79.6 GiB), and the CUDA context takes its share of what is
left: both belong to the overhead model's fixed part (bench/plan/overhead.py), and ``--memory`` with a card's own
``torch.cuda.get_device_properties(i).total_memory`` is exact where the datasheet figure is not.

Peak rates (:class:`Peaks`, for the time model, bench/plan/timemodel.py) are the datasheets' *dense* figures: FP32
(CUDA cores), TF32, BF16/FP16 tensor-core FLOP/s and memory bandwidth. Where a datasheet states tensor figures
"with sparsity" only, the dense figure is half of it. Each entry cites its datasheet and figures in ``_PEAK_SOURCES``;
a GPU without a cited datasheet has ``peaks = None`` and the time model says "no peak figures for this GPU"
rather than guess (the A10G: AWS publishes no datasheet of its own; the GeForce and RTX A6000 cards: their
tensor figures depend on the accumulate precision and are not stated dense).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.messages import did_you_mean

__all__ = ["DEFAULT_GPU", "GPUS", "Gpu", "Peaks", "get_gpu", "matching_gpus"]

GIB = 2**30
TERA = 10**12
DEFAULT_GPU = "h100-80gb"  # what a plan is for, and the GPU meta records estimate their step time on, by default


@dataclass(frozen=True)
class Peaks:
    """A GPU's datasheet peaks: dense FLOP/s per precision (None: no tensor cores for it) and bytes/s."""

    fp32_flops: float  # CUDA-core FP32 (elementwise ops, and fp32 matmuls without TF32)
    tf32_flops: float | None  # tensor-core TF32 (fp32 matmuls when TF32 is allowed)
    bf16_flops: float | None  # tensor-core BF16 / FP16 with FP32 accumulate (FP16 only on V100/T4: no BF16)
    memory_bandwidth: float  # bytes/s
    source: str  # the datasheet and the figures read from it


def _peaks(fp32: float, tf32: float | None, bf16: float | None, gb_s: float, source: str) -> Peaks:
    """From datasheet units: TFLOPS and GB/s."""
    return Peaks(
        fp32 * TERA, None if tf32 is None else tf32 * TERA, None if bf16 is None else bf16 * TERA, gb_s * 1e9, source
    )


_V100 = _peaks(
    15.7, None, 125, 900, "NVIDIA V100 datasheet (SXM2): FP32 15.7 TFLOPS, Tensor (FP16) 125 TFLOPS, 900 GB/s"
)
_A100_SOURCE = "NVIDIA A100 datasheet: FP32 19.5 TFLOPS, TF32 156, BF16/FP16 312 TFLOPS (dense)"
_H100_SOURCE = "NVIDIA H100 datasheet (SXM): FP32 67 TFLOPS, TF32 989, BF16 1979 TFLOPS with sparsity"
_PEAK_SOURCES: dict[str, Peaks] = {
    "v100-16gb": _V100,
    "v100-32gb": _V100,
    "t4-16gb": _peaks(8.1, None, 65, 320, "NVIDIA T4 datasheet: FP32 8.1 TFLOPS, mixed FP16/FP32 65 TFLOPS, 320 GB/s"),
    "a10-24gb": _peaks(31.2, 62.5, 125, 600, "NVIDIA A10 datasheet: FP32 31.2 TFLOPS, TF32 62.5, BF16 125, 600 GB/s"),
    "a100-40gb": _peaks(19.5, 156, 312, 1555, f"{_A100_SOURCE}, 1,555 GB/s (40GB)"),
    "a100-80gb": _peaks(19.5, 156, 312, 2039, f"{_A100_SOURCE}, 2,039 GB/s (80GB SXM)"),
    "l4-24gb": _peaks(
        30.3, 60, 121, 300, "NVIDIA L4 datasheet: FP32 30.3 TFLOPS, TF32 120, BF16 242 with sparsity, 300 GB/s"
    ),
    "l40s-48gb": _peaks(
        91.6, 183, 366, 864, "NVIDIA L40S datasheet: FP32 91.6 TFLOPS, TF32 366, BF16 733 with sparsity, 864 GB/s"
    ),
    "h100-80gb": _peaks(67, 494.5, 989.5, 3350, f"{_H100_SOURCE}, 3.35 TB/s"),
    "h100-nvl-94gb": _peaks(
        60, 417.5, 835.5, 3900, "NVIDIA H100 NVL datasheet: FP32 60 TFLOPS, TF32 835, BF16 1671 with sparsity, 3.9 TB/s"
    ),
    "h200-141gb": _peaks(
        67,
        494.5,
        989.5,
        4800,
        "NVIDIA H200 datasheet (SXM): FP32 67 TFLOPS, TF32 989, BF16 1979 with sparsity, 4.8 TB/s",
    ),
}


@dataclass(frozen=True)
class Gpu:
    name: str  # the catalogue key, e.g. "h100-80gb"
    product: str  # the vendor's product name
    memory_bytes: int  # datasheet memory, read as GiB
    sm: tuple[int, int]  # CUDA compute capability
    peaks: Peaks | None = None  # datasheet peak rates (None: no cited datasheet figures)

    @property
    def model(self) -> str:
        """The model in the catalogue key, letters and digits only: "h100" (h100-80gb), "h100nvl", "rtxa6000"."""
        return re.sub(r"[^a-z0-9]", "", re.sub(r"-[0-9]+gb$", "", self.name))


def _gpu(name: str, product: str, gib: int, sm: tuple[int, int]) -> tuple[str, Gpu]:
    return name, Gpu(name, product, gib * GIB, sm, _PEAK_SOURCES.get(name))


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
