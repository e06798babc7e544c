"""NVML sampler: the GPU's device-wide memory use (and this process's share) polled in a thread during a step.

NVML sees what the driver sees: the CUDA context, the caching allocator's *reserved* segments, library
workspaces (cuBLAS, cuDNN) and every other process on the GPU. ``nvmlDeviceGetMemoryInfo`` costs ~10 µs and is
polled every ``interval_s`` (default 1 ms); the per-process ``usedGpuMemory`` from
``nvmlDeviceGetComputeRunningProcesses`` costs milliseconds and is polled every ``process_interval_s``.

The pynvml boundary is one argument, ``nvml``: the real ``pynvml`` module by default, any object with the same
functions and exception classes in tests. Every NVML failure becomes a one-line note; the sampler then
produces no NVML figures but never breaks the step.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_INTERVAL_S = 1.0


def check_interval(interval_s: Any, name: str = "sample interval") -> float:
    """Return ``interval_s`` as a float in (0, 1] s, or raise ValueError naming the problem."""
    try:
        value = float(interval_s)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {interval_s!r}") from None
    if math.isnan(value) or value <= 0 or value > MAX_INTERVAL_S:
        raise ValueError(f"{name} must be in (0, {MAX_INTERVAL_S:g}] seconds, got {interval_s!r}")
    return value


def load_nvml(nvml_module: Any = None) -> tuple[Any | None, str | None]:
    """The NVML module to use (``nvml_module`` or ``import pynvml``) and a note if it cannot be imported."""
    if nvml_module is not None:
        return nvml_module, None
    try:
        import pynvml  # provided by the nvidia-ml-py distribution
    except ImportError as exc:
        return None, f"NVML: cannot import pynvml ({exc}); install nvidia-ml-py"
    return pynvml, None


def init_note(nvml: Any, exc: Exception) -> str:
    """One line saying why ``nvmlInit`` failed."""
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return "NVML: library not found (no NVIDIA driver on this machine); NVML figures skipped"
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return "NVML: NVIDIA driver not loaded; NVML figures skipped"
    return f"NVML: init failed ({type(exc).__name__}: {exc}); NVML figures skipped"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class DeviceHandle:
    """The NVML handle of one torch device, how it was found, and notes (MIG, fallbacks)."""

    handle: Any
    how: str
    is_mig: bool = False
    notes: list[str] = field(default_factory=list)


def torch_device_identity(torch_index: int) -> tuple[str | None, str | None]:
    """(CUDA UUID, PCI bus id) of a torch CUDA device, where torch exposes them; (None, None) otherwise."""
    try:
        import torch

        props = torch.cuda.get_device_properties(torch_index)
    except Exception:  # no CUDA build, no device: fall back to CUDA_VISIBLE_DEVICES
        return None, None
    uuid = getattr(props, "uuid", None)
    bus = None
    if all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return (str(uuid) if uuid is not None else None), bus


def resolve_handle(
    nvml: Any,
    torch_index: int,
    *,
    uuid: str | None = None,
    pci_bus_id: str | None = None,
    visible_devices: str | None = None,
) -> DeviceHandle:
    """Map a torch CUDA index to its NVML handle (NVML must be initialised).

    Order: the device's UUID from torch (``GPU-…`` or, under MIG, ``MIG-…``), its PCI bus id, then
    ``CUDA_VISIBLE_DEVICES`` (``visible_devices``; ordinals or UUIDs), then the index itself. A physical GPU in
    MIG mode is replaced by this process's MIG instance where it can be identified."""
    errors = tuple(e for e in (getattr(nvml, "NVMLError", None),) if e is not None) or (Exception,)
    found: DeviceHandle | None = None
    if uuid:
        bare = uuid.split("-", 1)[1] if uuid.startswith(("GPU-", "MIG-")) else uuid
        for candidate in (f"GPU-{bare}", f"MIG-{bare}"):
            try:
                found = DeviceHandle(nvml.nvmlDeviceGetHandleByUUID(candidate), f"uuid {candidate}")
                found.is_mig = candidate.startswith("MIG-")
                break
            except errors:
                continue
    if found is None and pci_bus_id:
        try:
            found = DeviceHandle(nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id), f"pci bus id {pci_bus_id}")
        except errors:
            pass
    if found is None:
        entries = [e.strip() for e in visible_devices.split(",")] if visible_devices else []
        if entries and torch_index >= len(entries):
            raise ValueError(f"cuda:{torch_index} is not visible (CUDA_VISIBLE_DEVICES={visible_devices!r})")
        entry = entries[torch_index] if entries else str(torch_index)
        if entry.isdigit():
            found = DeviceHandle(nvml.nvmlDeviceGetHandleByIndex(int(entry)), f"nvml index {entry}")
        else:
            found = DeviceHandle(nvml.nvmlDeviceGetHandleByUUID(entry), f"uuid {entry}")
            found.is_mig = entry.startswith("MIG-")
    if not found.is_mig:
        _replace_with_mig_instance(nvml, found, uuid, errors)
    return found


def _replace_with_mig_instance(nvml: Any, found: DeviceHandle, uuid: str | None, errors: tuple) -> None:
    """If ``found`` is a GPU with MIG on, point it at this process's MIG instance (or note why not)."""
    try:
        current_mode, _pending = nvml.nvmlDeviceGetMigMode(found.handle)
    except errors:  # pre-Ampere GPUs and drivers without MIG: NotSupported
        return
    if current_mode != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
        return
    instances = []
    try:
        for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(found.handle)):
            try:
                instances.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(found.handle, i))
            except errors:  # unpopulated slot
                continue
    except errors as exc:
        found.notes.append(f"NVML: MIG mode on but MIG instances cannot be listed ({exc}); figures are the whole GPU's")
        return
    bare = uuid.split("-", 1)[1] if uuid and uuid.startswith(("GPU-", "MIG-")) else uuid
    for mig in instances:
        try:
            mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        except errors:
            continue
        if bare and mig_uuid.endswith(bare):
            found.handle, found.how, found.is_mig = mig, f"MIG instance {mig_uuid}", True
            return
    if len(instances) == 1:
        found.handle, found.is_mig = instances[0], True
        found.how += " (its only MIG instance)"
        return
    found.notes.append(
        f"NVML: MIG mode on with {len(instances)} instances and this process's instance not identified "
        "(set CUDA_VISIBLE_DEVICES=MIG-<uuid>); figures are the whole GPU's"
    )


@dataclass
class NvmlResult:
    """What one sampling run saw. Times are ``time.perf_counter()`` values (absolute)."""

    available: bool = False
    baseline_used_bytes: int | None = None
    peak_used_bytes: int | None = None
    peak_reserved_bytes: int | None = None  # v2 struct "reserved" (driver-reserved); None where absent
    process_peak_bytes: int | None = None
    samples: int = 0
    interval_s: float | None = None
    times: list[float] = field(default_factory=list)
    used_bytes: list[int] = field(default_factory=list)
    probe_times: list[float] = field(default_factory=list)  # the optional slow probe (torch allocated bytes)
    probe_values: list[int] = field(default_factory=list)
    device: str = ""
    notes: list[str] = field(default_factory=list)


def read_used_bytes(torch_index: int = 0, *, nvml: Any = None) -> tuple[int | None, list[str]]:
    """One reading of the device's NVML ``used`` (with the sampler's device mapping and error handling):
    (bytes or None, notes). The bench takes it at case start, before the case allocates anything."""
    sampler = NvmlSampler(torch_index, nvml=nvml)
    sampler.start()
    result = sampler.stop()
    return result.baseline_used_bytes, result.notes


class NvmlSampler:
    """Poll one GPU's NVML memory figures in a thread between :meth:`start` and :meth:`stop`.

    ``slow_probe`` (optional, e.g. ``torch.cuda.memory_allocated``) is called at the process rate and its
    values returned alongside, so allocator figures share the NVML time axis."""

    def __init__(
        self,
        torch_index: int = 0,
        *,
        interval_s: float = 0.001,
        process_interval_s: float = 0.02,
        nvml: Any = None,
        pid: int | None = None,
        uuid: str | None = None,
        pci_bus_id: str | None = None,
        visible_devices: str | None = None,
        slow_probe: Callable[[], int] | None = None,
    ):
        self.interval_s = check_interval(interval_s)
        self.process_interval_s = check_interval(process_interval_s, "process sample interval")
        self.torch_index = torch_index
        self.pid = os.getpid() if pid is None else pid
        self._identity = (uuid, pci_bus_id)
        self._visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible_devices is None else visible_devices
        self._nvml, note = load_nvml(nvml)
        self._slow_probe = slow_probe
        self._result = NvmlResult(interval_s=self.interval_s)
        if note:
            self._result.notes.append(note)
        self._handle: Any = None
        self._use_v2 = False
        self._initialised = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid_missing = False
        self._process_query_failed = False

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Initialise NVML, find the device, take the baseline reading and start polling."""
        nvml, result = self._nvml, self._result
        if nvml is None:
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError subclasses; a fake may raise anything
            result.notes.append(init_note(nvml, exc))
            return
        self._initialised = True
        try:
            uuid, bus = self._identity
            if uuid is None and bus is None:
                uuid, bus = torch_device_identity(self.torch_index)
            device = resolve_handle(nvml, self.torch_index, uuid=uuid, pci_bus_id=bus, visible_devices=self._visible)
            self._handle = device.handle
            result.device = device.how
            result.notes.extend(device.notes)
            self._use_v2 = self._probe_v2()
            _, used, _reserved = self._read_memory()
        except Exception as exc:
            result.notes.append(
                f"NVML: cannot read cuda:{self.torch_index} ({type(exc).__name__}: {exc}); NVML figures skipped"
            )
            self._shutdown()
            return
        result.available = True
        result.baseline_used_bytes = used
        self._read_process()  # the PID check (and its note) before polling starts
        self._thread = threading.Thread(target=self._run, name="dpmem-nvml-sampler", daemon=True)
        self._thread.start()

    @property
    def result(self) -> NvmlResult:
        """What was sampled so far (final once :meth:`stop` returned)."""
        return self._result

    def stop(self) -> NvmlResult:
        """Stop polling, take one last reading (call after synchronising the device) and return the result."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                self._sample(time.perf_counter(), with_process=True)
            except Exception as exc:
                self._result.notes.append(f"NVML: final reading failed ({type(exc).__name__}: {exc})")
        if self._pid_missing:
            self._result.notes.append(
                f"NVML: this process (pid {self.pid}) is not in the GPU's compute-process list (a container's "
                "PID namespace? NVML reports host PIDs); nvml_process_peak_bytes is None"
            )
        self._shutdown()
        return self._result

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down cannot fail the measurement
                pass

    # ---- readings -----------------------------------------------------------------------------------------
    def _probe_v2(self) -> bool:
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is None:
            self._result.notes.append("NVML: nvmlMemory_v2 not in this pynvml; reserved figure unavailable")
            return False
        try:
            self._nvml.nvmlDeviceGetMemoryInfo(self._handle, version=version)
            return True
        except Exception as exc:
            self._result.notes.append(
                f"NVML: memory info v2 unsupported by the driver ({exc}); reserved figure unavailable"
            )
            return False

    def _read_memory(self) -> tuple[float, int, int | None]:
        if self._use_v2:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle, version=self._nvml.nvmlMemory_v2)
            return time.perf_counter(), int(info.used), int(info.reserved)
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return time.perf_counter(), int(info.used), None

    def _read_process(self) -> int | None:
        """This PID's usedGpuMemory, or None (not listed, not available, or the query unsupported). A query
        that failed once is not retried: its failures (NotSupported under vGPU, MIG, old drivers) are
        permanent, and it costs milliseconds."""
        if self._process_query_failed:
            return None
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception as exc:
            self._process_query_failed = True
            self._result.notes.append(f"NVML: per-process memory unavailable ({type(exc).__name__}: {exc})")
            return None
        for proc in processes:
            if int(proc.pid) == self.pid:
                used = getattr(proc, "usedGpuMemory", None)
                return int(used) if used is not None else None  # None: NVML_VALUE_NOT_AVAILABLE (e.g. MIG)
        self._pid_missing = True
        return None

    def _sample(self, now: float, with_process: bool) -> None:
        result = self._result
        t, used, reserved = self._read_memory()
        result.times.append(t)
        result.used_bytes.append(used)
        result.samples += 1
        if result.peak_used_bytes is None or used > result.peak_used_bytes:
            result.peak_used_bytes = used
        if reserved is not None and (result.peak_reserved_bytes is None or reserved > result.peak_reserved_bytes):
            result.peak_reserved_bytes = reserved
        if with_process:
            own = self._read_process()
            if own is not None and (result.process_peak_bytes is None or own > result.process_peak_bytes):
                result.process_peak_bytes = own
            if self._slow_probe is not None:
                result.probe_times.append(time.perf_counter())
                result.probe_values.append(int(self._slow_probe()))

    def _run(self) -> None:
        next_tick = time.perf_counter()
        next_process = next_tick + self.process_interval_s
        try:
            while not self._stop.is_set():
                now = time.perf_counter()
                slow = now >= next_process
                self._sample(now, with_process=slow)
                if slow:
                    next_process = now + self.process_interval_s
                next_tick += self.interval_s
                delay = next_tick - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
                else:  # fell behind (a slow process query): restart the schedule from now
                    next_tick = time.perf_counter()
        except Exception as exc:  # a driver error mid-step: keep what was sampled, say why it ended
            self._result.notes.append(f"NVML: sampling stopped early ({type(exc).__name__}: {exc})")
