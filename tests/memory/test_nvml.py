"""NVML sampler logic against a fake pynvml module (this machine has no GPU), and gpu_check's logic."""

from __future__ import annotations

import math
import threading
import time

import pytest

from bench import gpu_check
from bench.trackers.memory.nvml import NvmlSampler, check_interval, resolve_handle
from tests.memory.fake_nvml import FakeNvml

MiB = 2**20


def run_sampler(fake, duration_s=0.06, **kwargs) -> tuple:
    kwargs.setdefault("visible_devices", "")
    sampler = NvmlSampler(0, nvml=fake, **kwargs)
    t0 = time.perf_counter()  # before start(): on a loaded machine the sampler thread may run first
    sampler.start()
    time.sleep(duration_s)
    result = sampler.stop()
    return result, t0


def test_peak_baseline_and_timestamps_follow_a_known_trajectory():
    # 100 MiB at rest, a 40 MiB bump between 20 and 30 ms, then 110 MiB.
    def used(s):
        return (100 + (40 if 0.02 <= s < 0.03 else 0) + (10 if s >= 0.03 else 0)) * MiB

    fake = FakeNvml(used)
    result, t0 = run_sampler(fake, 0.08, interval_s=0.001, process_interval_s=0.02)
    assert result.available and result.device == "nvml index 0"
    assert result.baseline_used_bytes == 100 * MiB
    assert result.peak_used_bytes == 140 * MiB
    assert result.peak_reserved_bytes == 5 * MiB
    assert result.process_peak_bytes == 3 * MiB
    # 1 ms polling over ~80 ms: dozens of samples (not one per ms exactly: sleeps overshoot), in time order.
    assert 20 <= result.samples == len(result.times) == len(result.used_bytes) <= 100
    assert all(b >= a for a, b in zip(result.times, result.times[1:]))
    assert result.times[0] >= t0 and result.times[-1] >= t0 + 0.07
    # The slow per-process query runs at ~20 ms, far fewer times than the memory query.
    assert 2 <= fake.process_calls <= 10 < fake.memory_calls
    assert fake.inits == fake.shutdowns == 1
    assert result.notes == []


def test_slow_probe_runs_at_the_process_rate():
    values = iter(range(1000))
    result, _ = run_sampler(FakeNvml(), 0.07, process_interval_s=0.02, slow_probe=lambda: next(values))
    assert 2 <= len(result.probe_values) <= 6 and result.probe_values == sorted(result.probe_values)
    assert len(result.probe_times) == len(result.probe_values)


def test_library_missing_gives_a_note_and_no_figures():
    fake = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    result, _ = run_sampler(fake, 0.005)
    assert not result.available and result.samples == 0 and result.peak_used_bytes is None
    assert result.notes == ["NVML: library not found (no NVIDIA driver on this machine); NVML figures skipped"]
    assert not [t for t in threading.enumerate() if t.name == "dpmem-nvml-sampler"]


def test_driver_not_loaded_gives_a_note():
    fake = FakeNvml(init_error=FakeNvml.NVMLError_DriverNotLoaded("Driver Not Loaded"))
    result, _ = run_sampler(fake, 0.005)
    assert not result.available and result.peak_used_bytes is None and result.baseline_used_bytes is None
    assert result.notes == ["NVML: NVIDIA driver not loaded; NVML figures skipped"]


def test_real_pynvml_on_this_machine_reports_why_it_cannot_sample():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    sampler = NvmlSampler(0, nvml=None)
    sampler.start()
    result = sampler.stop()
    assert not result.available and len(result.notes) == 1 and result.notes[0].startswith("NVML: ")


def test_pid_not_in_process_list_gives_note_and_no_process_figure():
    fake = FakeNvml(pid=999_999_999)  # NVML lists host PIDs; ours is another
    result, _ = run_sampler(fake, 0.03)
    assert result.available and result.peak_used_bytes == 100 * MiB
    assert result.process_peak_bytes is None
    assert len(result.notes) == 1 and "not in the GPU's compute-process list" in result.notes[0]


def test_failing_per_process_query_gives_exactly_one_note():
    """It used to add one note per poll (every 20 ms) to the record."""
    fake = FakeNvml(process_error=FakeNvml.NVMLError_NotSupported("Not Supported"))
    result, _ = run_sampler(fake, 0.08, process_interval_s=0.01)
    assert result.available and result.peak_used_bytes == 100 * MiB and result.process_peak_bytes is None
    assert result.notes == ["NVML: per-process memory unavailable (NVMLError_NotSupported: Not Supported)"]
    assert fake.process_calls == 1  # not retried: the failure is permanent and each query costs milliseconds


def test_process_memory_not_available_is_none_without_pid_note():
    result, _ = run_sampler(FakeNvml(process_used=None), 0.03)  # MIG often reports NVML_VALUE_NOT_AVAILABLE
    assert result.process_peak_bytes is None and result.notes == []


def test_memory_info_v2_unsupported_leaves_reserved_none():
    result, _ = run_sampler(FakeNvml(v2=False), 0.01)
    assert result.available and result.peak_used_bytes == 100 * MiB and result.peak_reserved_bytes is None
    assert len(result.notes) == 1 and "reserved figure unavailable" in result.notes[0]


@pytest.mark.parametrize("bad", [0, -0.001, math.nan, 1.5, "fast", None])
def test_bad_intervals_raise_one_line_value_error(bad):
    with pytest.raises(ValueError, match="interval") as info:
        NvmlSampler(0, interval_s=bad, nvml=FakeNvml())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="process sample interval"):
        NvmlSampler(0, process_interval_s=bad, nvml=FakeNvml())


def test_check_interval_accepts_the_range_ends():
    assert check_interval(1.0) == 1.0 and check_interval(1e-4) == 1e-4


# ---- device mapping -----------------------------------------------------------------------------------------
def _init(fake):
    fake.nvmlInit()
    return fake


def test_cuda_visible_devices_ordinals_map_torch_index_to_nvml_index():
    fake = _init(FakeNvml(n_gpus=4))
    assert resolve_handle(fake, 1, visible_devices="2,3").handle.index == 3
    assert resolve_handle(fake, 0, visible_devices="").handle.index == 0
    with pytest.raises(ValueError, match="not visible"):
        resolve_handle(fake, 2, visible_devices="2,3")


def test_torch_uuid_wins_over_cuda_visible_devices():
    fake = _init(FakeNvml(n_gpus=4))
    found = resolve_handle(fake, 0, uuid="0002-aaaa", visible_devices="0,1,2,3")  # torch's uuid has no prefix
    assert found.handle.index == 2 and found.how == "uuid GPU-0002-aaaa"
    found = resolve_handle(fake, 0, visible_devices="GPU-0003-aaaa")
    assert found.handle.index == 3


def test_mig_instance_found_by_torch_uuid():
    fake = _init(FakeNvml())
    fake.add_mig(0, ["MIG-1111", "MIG-2222"])
    found = resolve_handle(fake, 0, uuid="2222", visible_devices="")
    assert found.is_mig and found.handle.uuid == "MIG-2222" and found.notes == []
    # Through the sampler: the figures are the MIG instance's (+7 marks a MIG handle in the fake).
    result, _ = run_sampler(fake, 0.01, uuid="2222")
    assert result.baseline_used_bytes == 100 * MiB + 7 and result.device == "uuid MIG-2222"


def test_mig_parent_with_one_instance_uses_it_and_with_several_says_why_not():
    fake = _init(FakeNvml())
    fake.add_mig(0, ["MIG-1111"])
    found = resolve_handle(fake, 0, visible_devices="")
    assert found.is_mig and found.handle.uuid == "MIG-1111" and "only MIG instance" in found.how
    fake.add_mig(0, ["MIG-1111", "MIG-2222"])
    found = resolve_handle(fake, 0, visible_devices="")
    assert not found.is_mig and found.handle.kind == "gpu"
    assert len(found.notes) == 1 and "MIG mode on with 2 instances" in found.notes[0]


def test_mig_uuid_in_cuda_visible_devices():
    fake = _init(FakeNvml())
    fake.add_mig(1, ["MIG-aaaa", "MIG-bbbb"])
    found = resolve_handle(fake, 0, visible_devices="MIG-bbbb")
    assert found.is_mig and found.handle.uuid == "MIG-bbbb"


# ---- gpu_check ----------------------------------------------------------------------------------------------
def test_gpu_check_exits_2_with_one_line_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_gap_check_arithmetic():
    gap = gpu_check.GapCheck(
        nvml_peak_used_bytes=2600 * MiB,
        nvml_baseline_bytes=1000 * MiB,
        reserved_at_start_bytes=400 * MiB,
        peak_reserved_bytes=2000 * MiB,
        peak_allocated_bytes=1800 * MiB,
    )
    assert gap.non_allocator_bytes == 600 * MiB and gap.expected_peak_bytes == 2600 * MiB
    assert gap.gap_bytes == 0 and gap.ok and "OK" in gap.line()
    over = gpu_check.GapCheck(2700 * MiB, 1000 * MiB, 400 * MiB, 2000 * MiB, 1800 * MiB)
    assert over.relative_gap == pytest.approx(100 / 2600) and not over.ok and "OVER 2%" in over.line()


# gpu_check's sampling arm: tests/memory/test_gpu_paths.py


# ------------------------------------------------------------------------------------------------ case baseline


def test_read_used_bytes_is_one_reading_with_the_samplers_handling():
    from bench.trackers.memory.nvml import read_used_bytes

    fake = FakeNvml(lambda s: 700 * MiB)
    assert read_used_bytes(0, nvml=fake) == (700 * MiB, [])
    assert fake.inits == fake.shutdowns == 1
    missing = FakeNvml(init_error=FakeNvml.NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    used, notes = read_used_bytes(0, nvml=missing)
    assert used is None and notes and "library not found" in notes[0]


def test_peak_minus_baseline_is_taken_against_the_case_start_baseline_only():
    """The bench reads NVML at case start (context + other processes) and passes it to measure_step; the
    reading just before the step (model, warm allocator cache) is kept as nvml_step_start_bytes. Without a
    case-start reading the difference is None with a note: it never silently becomes peak − step start."""
    from bench.results.record import StepMemory
    from bench.trackers.memory.measure import add_nvml_figures
    from bench.trackers.memory.nvml import NvmlResult

    nvml = NvmlResult(
        available=True,
        baseline_used_bytes=900 * MiB,
        peak_used_bytes=1000 * MiB,
        samples=3,
        times=[0.0, 0.1, 0.2],
        used_bytes=[900 * MiB, 1000 * MiB, 950 * MiB],
    )
    with_case, notes = StepMemory(), []
    traces = add_nvml_figures(with_case, nvml, 500 * MiB, None, notes)
    assert with_case.nvml_baseline_bytes == 500 * MiB
    assert with_case.nvml_step_start_bytes == 900 * MiB
    assert with_case.nvml_peak_minus_baseline_bytes == 500 * MiB
    assert notes == [] and traces["nvml_used_bytes"][1] == nvml.used_bytes
    alone, notes = StepMemory(), []
    add_nvml_figures(alone, nvml, None, None, notes)
    assert alone.nvml_baseline_bytes is None and alone.nvml_step_start_bytes == 900 * MiB
    assert alone.nvml_peak_minus_baseline_bytes is None
    assert any("no case-start baseline" in note for note in notes)
