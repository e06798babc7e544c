"""The bench's CUDA paths on a fake GPU (tests/memory/fake_cuda.py: patched torch.cuda, a fake NVML): device
warm-up before the first case-start baseline, a failed baseline read, snapshot order and file names, and
gpu_check's sampling arm."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp import resolve_privacy
from bench.trackers.memory import isolation
from bench.trackers.memory.measure import StepSources, measure_step
from bench.trackers.memory.nvml import NvmlSampler
from tests.memory import fake_cuda
from tests.memory.fake_nvml import FakeNvml

MiB = 2**20
CUDA0 = torch.device("cuda", 0)


def _sampler_threads() -> int:
    return sum(t.name == "dpmem-nvml-sampler" and t.is_alive() for t in threading.enumerate())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> BenchConfig:
    return BenchConfig.from_fields(
        preset="cpu-smoke",
        workloads=("gpt-tiny",),
        methods=("nondp",),
        batch_sizes=(2,),
        devices=("cuda:0",),
        rounds=1,
        privacy=resolve_privacy(1.0),
        snapshot_dir=str(tmp_path_factory.mktemp("snapshots")),
    )


SPEC = CaseSpec("gpt-tiny", "nondp", 2, "cuda:0")


def test_first_case_warms_the_device_before_its_baseline_and_says_so(monkeypatch, config):
    """Kernels and library handles loaded lazily by the first case would otherwise land in its NVML figure."""
    state = {"used": 500 * MiB}
    fake = fake_cuda.install(monkeypatch, FakeNvml(lambda s: state["used"]))

    def warm(device):  # what loading kernels and cuBLAS/cuDNN handles does to the device
        fake.warm_device(device)
        state["used"] += 100 * MiB
        return []

    monkeypatch.setattr(isolation, "warm_device", warm)
    first = run_case(SPEC, config, timer=None)
    second = run_case(SPEC, config, timer=None)
    assert first.status == second.status == "ok", first.reason
    assert fake.warmed == [CUDA0]  # once per process
    # The baseline is read after the warm-up: it holds what the warm-up loaded.
    assert first.memory.nvml_baseline_bytes == second.memory.nvml_baseline_bytes == 600 * MiB
    assert first.memory.nvml_peak_minus_baseline_bytes == second.memory.nvml_peak_minus_baseline_bytes == 0
    (note,) = [n for n in first.notes if n.startswith("device warm-up")]
    assert "cuda:0" in note and "SDPA" in note and "+100.0 MiB" in note
    assert not any("warm-up" in n for n in second.notes)


def test_a_failed_warm_up_dtype_is_noted_and_the_baseline_still_read(monkeypatch):
    fake_cuda.install(monkeypatch, FakeNvml(lambda s: 300 * MiB))
    monkeypatch.setattr(isolation, "warm_device", lambda device: ["warm-up in torch.bfloat16 failed (RuntimeError: x)"])
    notes: list[str] = []
    assert isolation.start_case(CUDA0, notes) == 300 * MiB
    (note,) = notes
    assert note.startswith("device warm-up") and note.endswith("; warm-up in torch.bfloat16 failed (RuntimeError: x)")


def test_warm_device_runs_every_kernel_family_forward_and_backward():
    # The routine itself, on the CPU: every op has a CPU kernel, so a failure here is a bug in the routine.
    assert isolation.warm_device(torch.device("cpu")) == []


def test_failed_case_start_baseline_read_leaves_the_difference_none(monkeypatch, config):
    """The measured round's own first reading must never stand in for the case-start baseline."""
    nvml = FakeNvml(lambda s: 800 * MiB, failing_memory_reads=2)  # the baseline's v2 probe and its v1 read
    fake_cuda.install(monkeypatch, nvml)
    monkeypatch.setattr(isolation, "_WARMED", {CUDA0})  # already warmed: the first NVML read is the baseline
    record = run_case(SPEC, config, timer=None)
    memory = record.memory
    assert record.status == "ok", record.reason
    assert memory.nvml_baseline_bytes is None and memory.nvml_peak_minus_baseline_bytes is None
    assert memory.nvml_step_start_bytes == memory.nvml_peak_used_bytes == 800 * MiB  # the round itself sampled
    assert any(n.startswith("case-start baseline: NVML: cannot read cuda:0") for n in record.notes)
    assert any("no case-start baseline reading" in n for n in record.notes)


def test_snapshot_is_dumped_after_the_sampler_stopped_under_a_safe_file_name(monkeypatch, config):
    fake = fake_cuda.install(monkeypatch, FakeNvml())
    threads_at_dump = []
    real_dump, real_stop = fake.dump_snapshot, NvmlSampler.stop

    def dump(path):
        threads_at_dump.append(_sampler_threads())
        real_dump(path)

    def stop(self):
        fake.events.append("sampler_stop")
        return real_stop(self)

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    monkeypatch.setattr(NvmlSampler, "stop", stop)
    record = run_case(SPEC, replace(config, measure=replace(config.measure, snapshot_case="all")), timer=None)
    assert record.status == "ok", record.reason
    events = [e for e in fake.events if e in ("record_history", "sampler_stop", "dump_snapshot", "stop_history")]
    # (Case-start readings stop their one-reading samplers before the measured round records history.)
    assert events[events.index("record_history") :] == [
        "record_history",
        "sampler_stop",
        "dump_snapshot",
        "stop_history",
    ]
    assert threads_at_dump == [0]
    (path,) = fake.snapshot_paths
    assert Path(path).parent == Path(config.measure.snapshot_dir)
    assert Path(path).name == "gpt-tiny-nondp-bs2-cuda_0.pickle"  # ':' is refused by upload-artifact
    assert record.memory.snapshot_path == path and record.device == "cuda:0"


def test_measure_step_snapshot_order_also_holds_when_the_step_raises(monkeypatch):
    fake = fake_cuda.install(monkeypatch, FakeNvml())
    threads_at_dump = []
    real_dump = fake.dump_snapshot
    monkeypatch.setattr(
        torch.cuda.memory, "_dump_snapshot", lambda path: (threads_at_dump.append(_sampler_threads()), real_dump(path))
    )

    def failing_step(mark):
        mark("forward")
        raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    with pytest.raises(torch.OutOfMemoryError) as info:
        measure_step(failing_step, StepSources("cuda:0", snapshot_path="/tmp/dpmem-x.pickle"))
    assert threads_at_dump == [0] and _sampler_threads() == 0
    assert info.value.partial_measurement.nvml_peak_used_bytes == 100 * MiB


# ---- gpu_check ----------------------------------------------------------------------------------------------
def test_gpu_check_on_arm_is_the_measured_rounds_sampling(monkeypatch):
    fake = fake_cuda.install(monkeypatch, FakeNvml())
    default = sys.getswitchinterval()
    seen = []

    def step():
        seen.append((sys.getswitchinterval(), _sampler_threads()))
        time.sleep(0.003)

    sampling = gpu_check.measured_sampling(CUDA0, 0.001, nvml_module=fake.nvml)
    _, off, on = gpu_check.sampler_overhead(step, sampling, steps=2)
    assert len(off) == len(on) == 2
    assert seen == [(default, 0), (min(default, 0.001), 1)] * 2
    assert "memory_allocated" in fake.events  # the allocator probe rode along, as in measure_step
    assert sys.getswitchinterval() == default and _sampler_threads() == 0
    with pytest.raises(ValueError, match="steps"):
        gpu_check.sampler_overhead(step, sampling, steps=0)


def test_gpu_check_step_that_raises_leaves_no_sampler_running(monkeypatch):
    fake = fake_cuda.install(monkeypatch, FakeNvml())
    calls = []

    def step():
        calls.append(_sampler_threads())
        if calls[-1]:  # the sampled arm
            raise RuntimeError("step failed")

    default = sys.getswitchinterval()
    with pytest.raises(RuntimeError, match="step failed"):
        gpu_check.sampler_overhead(step, gpu_check.measured_sampling(CUDA0, 0.001, nvml_module=fake.nvml), steps=3)
    assert calls == [0, 1]
    assert _sampler_threads() == 0 and sys.getswitchinterval() == default
    assert fake.nvml.inits == fake.nvml.shutdowns == 1


def test_gpu_check_main_on_a_fake_gpu_prints_one_line_per_case(monkeypatch, capsys):
    fake_cuda.install(monkeypatch, FakeNvml(lambda s: 20 * MiB))
    code = gpu_check.main(["--workloads", "gpt-tiny", "--methods", "nondp", "--batch-size", "2", "--steps", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gpu_check on cuda:0 (Fake GPU, 80.0 GiB)")
    (line,) = out[1:]
    assert "gpt-tiny" in line and "ERROR" not in line and "sampler overhead" in line
    # fake figures: NVML 20 MiB flat, reserved 12 MiB at start and peak: non-allocator 8 MiB, gap 0
    assert "gap     +0.0 MiB" in line and code in (0, 1)
    assert _sampler_threads() == 0
