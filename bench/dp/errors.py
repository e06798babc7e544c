"""The two ways a DP method can refuse — bad settings (a usage error) or a model it cannot run (a result) — and
the one failure no method may turn into either: running out of memory.

:func:`is_out_of_memory` is the one classifier of OOM for the methods and the case runner. It imports nothing
from the measurement code: the CPU memory cap raises a :class:`MemoryError` subclass, which counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bench.messages import first_line

__all__ = [
    "DPConfigError",
    "MethodUnsupported",
    "ModeUnsupported",
    "error_text",
    "exception_chain",
    "is_out_of_memory",
    "out_of_memory_in",
]


class DPConfigError(ValueError):
    """Invalid DP settings (clip norm, noise, epsilon, method name); the message is one line."""


class MethodUnsupported(RuntimeError):
    """A method cannot run on a model. ``reason`` is the library's real error, ``diagnosis`` one line of why."""

    def __init__(self, method: str, reason: str, diagnosis: str = ""):
        self.method, self.reason, self.diagnosis = method, reason, diagnosis
        super().__init__(f"{method}: {reason}" + (f" — {diagnosis}" if diagnosis else ""))


class ModeUnsupported(RuntimeError):
    """A device or workload cannot train in a mode (precision, checkpointing) at all, whatever the method: a result
    (``unsupported``), not an error. ``reason`` says what is missing, ``diagnosis`` what to do."""

    def __init__(self, reason: str, diagnosis: str = ""):
        self.reason, self.diagnosis = reason, diagnosis
        super().__init__(reason + (f" — {diagnosis}" if diagnosis else ""))


def error_text(exc: BaseException) -> str:
    """``"<ExcType>: <first line of the library's message>"``: how a record or a message quotes an error."""
    return f"{type(exc).__name__}: {first_line(exc)}"


# How an allocation failure reads when it is not a torch.OutOfMemoryError (torch 2.13's sources and headers):
# "CUDA error: out of memory" (a CUDA runtime call, C10_CUDA_CHECK), "DefaultCPUAllocator: can't allocate
# memory", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`" (TORCH_CUDABLAS_CHECK),
# "cuDNN error: CUDNN_STATUS_ALLOC_FAILED" (AT_CUDNN_CHECK; cuDNN 9 also has
# CUDNN_STATUS_INTERNAL_ERROR_{HOST,DEVICE}_ALLOCATION_FAILED), CUFFT_ALLOC_FAILED, CUSPARSE_STATUS_ALLOC_FAILED.
_OOM_TEXTS = ("out of memory", "can't allocate memory", "_alloc_failed", "_allocation_failed")


def _is_oom_itself(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):  # MemoryError: Python's and the CPU memory cap
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_TEXTS)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, and so on: the chain a traceback prints."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        yield current
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def out_of_memory_in(exc: BaseException) -> BaseException | None:
    """The out-of-memory error in ``exc``'s chain, or None: a wrapper such as ``MethodUnsupported(...) from
    oom`` is still an OOM."""
    return next((link for link in exception_chain(exc) if _is_oom_itself(link)), None)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/CPU allocator failures (cuBLAS/cuDNN/cuFFT allocation failures included), the CPU memory cap, or
    any exception raised from one of them. Every place that turns a library error into a result re-raises these
    unchanged: running out of memory is a result of its own, never "unsupported"."""
    return out_of_memory_in(exc) is not None
