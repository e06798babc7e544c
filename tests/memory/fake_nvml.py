"""A fake ``pynvml`` module: the NVML boundary for tests on machines without a GPU."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

MiB = 2**20


class FakeNvml:
    """Enough of pynvml for the sampler: devices by index/UUID, MIG instances, memory info v1/v2, processes."""

    nvmlMemory_v2 = 0x2000028
    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(
        self,
        used_fn=None,
        *,
        n_gpus=2,
        pid=None,
        process_used=3 * MiB,
        init_error=None,
        v2=True,
        failing_memory_reads=0,
        process_error=None,
    ):
        # used_fn(seconds since the first memory read) -> used bytes of every device
        self.used_fn = used_fn or (lambda s: 100 * MiB)
        self.failing_memory_reads = failing_memory_reads  # the first N memory-info calls raise NVMLError
        self.process_error = process_error  # raised by every per-process query when set
        self.gpus = [
            SimpleNamespace(kind="gpu", index=i, uuid=f"GPU-{i:04d}-aaaa", mig=False, instances=[])
            for i in range(n_gpus)
        ]
        self.pid = os.getpid() if pid is None else pid
        self.process_used = process_used
        self.init_error = init_error
        self.v2 = v2
        self.t_first = None
        self.memory_calls = 0
        self.process_calls = 0
        self.inits = self.shutdowns = 0

    def add_mig(self, gpu_index: int, uuids: list[str]) -> None:
        gpu = self.gpus[gpu_index]
        gpu.mig = True
        gpu.instances = [SimpleNamespace(kind="mig", index=k, uuid=u, parent=gpu) for k, u in enumerate(uuids)]

    # --- the pynvml surface -----------------------------------------------------------------------------
    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise self.NVMLError("Invalid Argument")
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            for mig in gpu.instances:
                if mig.uuid == uuid:
                    return mig
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle):
        return handle.uuid

    def nvmlDeviceGetName(self, handle):
        return f"Fake GPU {handle.index}"

    def nvmlDeviceGetMigMode(self, handle):
        if handle.kind != "gpu":
            raise self.NVMLError_NotSupported("Not Supported")
        return (1, 1) if handle.mig else (0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        if index >= len(handle.instances):
            raise self.NVMLError("Not Found")
        return handle.instances[index]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        if version is not None and not self.v2:
            raise self.NVMLError_NotSupported("Function Not Found")
        self.memory_calls += 1
        if self.memory_calls <= self.failing_memory_reads:
            raise self.NVMLError("Unknown Error")
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        used = int(self.used_fn(now - self.t_first))
        offset = 7 if handle.kind == "mig" else 1000 * handle.index  # tells devices apart in the figures
        return SimpleNamespace(total=80 * 2**30, used=used + offset, free=80 * 2**30 - used, reserved=5 * MiB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self.process_calls += 1
        if self.process_error is not None:
            raise self.process_error
        return [
            SimpleNamespace(pid=12345, usedGpuMemory=50 * MiB),
            SimpleNamespace(pid=self.pid, usedGpuMemory=self.process_used),
        ]

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040
