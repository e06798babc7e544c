"""Bench settings: presets, option parsing and validation. Knows names, not measurement.

A :class:`BenchConfig` is built once per pytest session from the command line (root ``conftest.py``) or
from the ``bench.maxbatch`` / ``bench.multi_gpu`` CLIs, and every case reads it.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for the annotation: keeps this module free of the opacus import
    from bench.dp import PrivacyParams


class BenchUsageError(ValueError):
    """A bad option value; one line, naming the option and the valid values."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    workloads: tuple[str, ...]
    methods: tuple[str, ...] | None  # None: every registered method
    batch_sizes: tuple[int, ...]
    rounds: int  # timed rounds per case


_GPU_WORKLOADS = (
    "dit-s-2-cond",
    "dit-s-2-uncond",
    "dit-b-2-cond",
    "dit-b-2-uncond",
    "dit-l-2-cond",
    "dit-l-2-uncond",
    "dit-xl-2-cond",
    "dit-xl-2-uncond",
    "dit-xl-2-cond-512",
    "gpt2",
    "gpt2-untied",
    "gpt2-medium",
    "gpt2-medium-untied",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "cpu-smoke",
            "tiny workloads, every method, two batch sizes (default without a GPU)",
            ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny"),
            None,
            (4, 16),
            3,
        ),
        Preset(
            "gpu-small",
            "paper-size DiT-S/B/L/XL-2 (256 px, cond+uncond), DiT-XL/2 512 px, gpt2(-medium) tied+untied; "
            "batch 1..256 by ×4 until OOM (default with a GPU)",
            _GPU_WORKLOADS,
            None,
            (1, 4, 16, 64, 256),
            5,
        ),
        Preset(
            "gpu-full",
            "as gpu-small with every power of two from 1 to 1024 until OOM and more timed rounds",
            _GPU_WORKLOADS,
            None,
            tuple(2**i for i in range(11)),
            10,
        ),
    )
}


def default_preset() -> str:
    return "gpu-small" if torch.cuda.is_available() else "cpu-smoke"


@dataclass(frozen=True)
class BenchConfig:
    """Every setting a case needs. Lists are the *resolved* matrix (preset narrowed by explicit options)."""

    preset: str
    workloads: tuple[str, ...]
    methods: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    devices: tuple[str, ...]
    rounds: int
    privacy: PrivacyParams  # clip norm, σ, ε, δ, accountant, sample rate, steps: resolved once per session
    sample_interval_s: float = 0.001
    optimizer: str = "adamw"
    lr: float = 1e-4
    memory_cap_bytes: int | None = None  # CPU: live tensor bytes above this count as OOM
    snapshot_case: str | None = None  # case id ("all" for every case) whose CUDA memory snapshot is exported
    snapshot_dir: str = "results/snapshots"
    results_path: str = "results/dpmem.jsonl"
    runner_label: str | None = None
    seed: int = 0
    max_batch: bool = False  # max-batch mode instead of the matrix
    max_batch_limit: int = 4096
    predict_memory_bytes: tuple[int, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# parsing helpers: each raises BenchUsageError with a one-line message


def split_list(option: str, text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise BenchUsageError(f"{option}: empty list")
    return items


def check_names(option: str, names: list[str], valid: list[str]) -> list[str]:
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            shown = ", ".join(valid) if len(valid) <= 20 else ", ".join(valid[:20]) + ", ..."
            raise BenchUsageError(f"{option}: unknown value {name!r}{hint}; valid: {shown}")
    return names


def parse_batch_sizes(text: str) -> list[int]:
    out = []
    for item in split_list("--batch-sizes", text) or []:
        try:
            value = int(item)
        except ValueError:
            raise BenchUsageError(f"--batch-sizes: {item!r} is not an integer") from None
        if value < 1:
            raise BenchUsageError(f"--batch-sizes: batch size must be >= 1, got {value}")
        out.append(value)
    return out


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(option: str, text: str) -> int:
    """'8GiB', '512MB', '1e9' → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise BenchUsageError(f"{option}: {text!r} is not a size (e.g. 8GiB, 512MB, 1e9)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise BenchUsageError(f"{option}: size must be >= 1 byte, got {text!r}")
    return int(value)


def check_sample_interval(seconds: float) -> float:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)) or seconds <= 0 or seconds > 1.0:
        raise BenchUsageError(f"--sample-interval: must be in (0, 1] seconds, got {seconds!r}")
    return float(seconds)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
