"""The torch CUDA caching allocator's own figures: peak allocated / reserved over a step, memory snapshots,
and the between-case reset. Every function is a no-op (or returns None) for a non-CUDA device."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Allocation events kept by the snapshot recorder; one fused step of a paper-size model fits easily.
SNAPSHOT_MAX_ENTRIES = 200_000


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def reset_peak(device: torch.device | str) -> None:
    """Start a new peak window: after this, max_memory_* report the peak of what follows."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_figures(device: torch.device | str) -> tuple[int | None, int | None]:
    """(max_memory_allocated, max_memory_reserved) since the last :func:`reset_peak`; (None, None) off CUDA."""
    if not _is_cuda(device):
        return None, None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def current_figures(device: torch.device | str) -> tuple[int | None, int | None]:
    """(memory_allocated, memory_reserved) now; (None, None) off CUDA."""
    if not _is_cuda(device):
        return None, None
    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))


def reset_between_cases(device: torch.device | str) -> None:
    """Isolate the next case as far as one process can: collect garbage, return cached blocks to the driver,
    reset peak and accumulated allocator statistics. What stays: the CUDA context, loaded kernels and library
    workspaces (cuBLAS/cuDNN), which is why cases measure after a warm-up step and report NVML peak − baseline."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.reset_accumulated_memory_stats(device)


@contextmanager
def memory_snapshot(device: torch.device | str, path: str | Path | None) -> Iterator[list[str]]:
    """Record allocator history while the block runs and dump it to ``path`` (open it at pytorch.org/memory_viz).

    Yields a list that receives one note if no snapshot could be written (CPU, or torch refused)."""
    notes: list[str] = []
    if path is None:
        yield notes
        return
    if not _is_cuda(device):
        notes.append("snapshot: allocator snapshots exist only on CUDA; none written")
        yield notes
        return
    try:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
    except Exception as exc:  # private API: surface its own error
        notes.append(f"snapshot: cannot record memory history ({type(exc).__name__}: {exc})")
        yield notes
        return
    try:
        yield notes
    finally:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
        except Exception as exc:
            notes.append(f"snapshot: cannot write {path} ({type(exc).__name__}: {exc})")
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
