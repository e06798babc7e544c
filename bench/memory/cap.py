"""A memory cap for CPU runs: the CPU analogue of a CUDA out-of-memory error.

On a GPU the device's capacity decides when a case runs out of memory. On CPU the machine would swap or the
kernel would kill the whole pytest process, so the bench counts live tensor bytes while a step runs and raises
:class:`MemoryCapExceeded` (classified as ``oom``) as soon as they pass the cap. Counting is by storage, once
per storage, with a weak reference to see it freed — the cheapest exact count; categories are the tensor
tracker's job (bench.memory.tensors), not this guard's.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MemoryCapExceeded(MemoryError):
    """Live tensor bytes passed the configured CPU memory cap (recorded as status ``oom``)."""


class LiveBytesCap(TorchDispatchMode):
    """Raise :class:`MemoryCapExceeded` when ``baseline_bytes`` + bytes of storages created inside the mode and
    still alive exceed ``cap_bytes``. ``baseline_bytes`` stands for what already exists (parameters...)."""

    def __init__(self, cap_bytes: int, baseline_bytes: int = 0):
        super().__init__()
        if cap_bytes < 1:
            raise ValueError(f"memory cap must be >= 1 byte, got {cap_bytes}")
        self.cap_bytes = int(cap_bytes)
        self.live_bytes = int(baseline_bytes)
        self.peak_bytes = self.live_bytes
        self._seen: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.live_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                if self.live_bytes > self.cap_bytes:
                    raise MemoryCapExceeded(
                        f"CPU memory cap exceeded: {self.live_bytes} live tensor bytes > cap {self.cap_bytes}"
                    )
        return out
