"""Device strings, machine facts (with a fake NVML), device facts."""

from __future__ import annotations

import pytest
import torch

from bench.system.devices import resolve_device, visible_devices
from bench.system.machine import device_facts, machine_info
from tests.memory.fake_nvml import FakeNvml

NO_GPU = not torch.cuda.is_available()


def test_visible_devices_lists_cuda_or_cpu():
    devices = visible_devices()
    if NO_GPU:
        assert devices == ["cpu"]
    else:
        assert devices == [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_cpu_resolves():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_meta_resolves():
    assert resolve_device("meta") == torch.device("meta")
    assert resolve_device(torch.device("meta")) == torch.device("meta")


@pytest.mark.parametrize("spec", ["cuda:7", "tpu", "mps", "cuda:-1", "", "gpu0", "meta:1x"])
def test_bad_devices_raise_naming_the_visible_ones(spec):
    if spec == "cuda:7" and not NO_GPU and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match="visible devices: cpu") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_no_gpu():
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA GPU visible"):
            resolve_device(spec)


def test_machine_info_from_fake_nvml(monkeypatch):
    monkeypatch.setenv("DPMEM_RUNNER_LABEL", "gpu-runner-7")
    fake = FakeNvml(n_gpus=2)
    fake.add_mig(1, ["MIG-1", "MIG-2"])
    info = machine_info(nvml_module=fake)
    assert info["gpu_source"] == "nvml" and info["runner_label"] == "gpu-runner-7"
    assert [g["name"] for g in info["gpus"]] == ["Fake GPU 0", "Fake GPU 1"]
    assert [g["mig_mode"] for g in info["gpus"]] == [False, True]
    assert info["gpus"][0]["total_memory_bytes"] == 80 * 2**30
    assert info["driver_version"] == "550.54.15" and info["cuda_driver_version"] == "12.4"
    assert (
        info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    )
    assert info["packages"]["opacus"] and info["packages"]["nvidia-ml-py"]
    assert info["cpu_model"] and info["ram_bytes"] > 0
    assert fake.inits == fake.shutdowns == 1


def test_machine_info_without_nvml_library_notes_it(monkeypatch):
    monkeypatch.delenv("DPMEM_RUNNER_LABEL", raising=False)
    fake = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    info = machine_info(nvml_module=fake)
    assert info["runner_label"] is None
    assert info["notes"] == ["NVML: library not found (no NVIDIA driver on this machine); NVML figures skipped"]
    if NO_GPU:
        assert info["gpus"] == [] and info["gpu_source"] is None


def test_device_facts_on_cpu():
    name, memory = device_facts("cpu")
    assert isinstance(name, str) and name and memory > 2**20
