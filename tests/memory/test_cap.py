"""The CPU memory cap (``--memory-cap``): the tensor tracker raises the moment tracked live bytes pass it, in the
warm-up step and in the measured round, so an ``ok`` case never has a tracked peak above the cap and the
max-batch search stops exactly where the tracked peak crosses it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp import resolve_privacy
from bench.plan import maxbatch
from bench.results.record import BatchProbe, Timing
from bench.trackers.memory.measure import StepSources, measure_step
from bench.trackers.memory.tensors import MemoryCapExceeded, TensorTracker


def _hand_sequence(progress: list[str]):
    def run(mark):
        mark("forward")
        a = torch.empty(100)  # 400 live
        progress.append("a")
        b = torch.empty(50)  # 600
        progress.append("b")
        del a  # 200
        c = torch.empty(1000)  # 4200: the peak
        progress.append("c")
        mark("end")
        return b, c

    return run


@pytest.mark.parametrize("cap, reached", [(4200, ["a", "b", "c"]), (4199, ["a", "b"]), (599, ["a"])])
def test_tracker_cap_raises_inside_the_op_that_passes_it(cap, reached):
    progress: list[str] = []
    tracker = TensorTracker("cpu", cap_bytes=cap)
    if cap >= 4200:
        with tracker:
            _hand_sequence(progress)(tracker.mark)
    else:
        with pytest.raises(MemoryCapExceeded, match=f"> cap {cap}"), tracker:
            _hand_sequence(progress)(tracker.mark)
    assert progress == reached
    report = tracker.report()  # the partial report still replays
    assert (report.peak_tensor_bytes <= cap) == (cap >= 4200)


def test_tracker_cap_counts_pre_existing_state_and_late_adopted_inputs():
    model = nn.Linear(8, 4, bias=False)  # 128 bytes, declared
    x = torch.randn(16, 8)  # 512 bytes, adopted when the forward reads it
    tracker = TensorTracker("cpu", cap_bytes=128 + 512 + 255)
    tracker.register_state(model)
    with pytest.raises(MemoryCapExceeded), tracker:
        model(x)  # output 256 bytes: 128 + 512 + 256 > cap
    assert tracker.report().peak_tensor_bytes == 128 + 512 + 256

    # An input adopted after the peak was live since the start: the cap sees it as the replay does.
    tracker = TensorTracker("cpu", cap_bytes=1000)
    with pytest.raises(MemoryCapExceeded), tracker:
        t = torch.empty(200)  # 800
        del t  # 0
        torch.empty(10)  # 40
        x.sum()  # adopts x (512): the peak so far becomes 512 + 800 > 1000
    assert tracker.report().peak_tensor_bytes == 1312


def test_tracker_cap_sees_a_storage_grown_in_place():
    tracker = TensorTracker("cpu", cap_bytes=100)
    with pytest.raises(MemoryCapExceeded, match="120 tracked tensor bytes > cap 100"), tracker:
        t = torch.empty(10)  # 40
        t.resize_(30)  # 120
    assert tracker.report().peak_tensor_bytes == 120


def test_tracker_cap_must_be_positive_and_measure_step_needs_the_tracker_for_it():
    with pytest.raises(ValueError, match="memory cap"):
        TensorTracker("cpu", cap_bytes=0)
    with pytest.raises(ValueError, match="track_tensors"):
        measure_step(lambda m: None, StepSources("cpu", track_tensors=False, memory_cap_bytes=1))


# ---- through the bench's case runner --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config() -> BenchConfig:
    return BenchConfig.from_fields(
        preset="cpu-smoke",
        workloads=("gpt-tiny",),
        methods=("nondp",),
        batch_sizes=(8,),
        devices=("cpu",),
        rounds=1,
        privacy=resolve_privacy(1.0),
        memory_cap_bytes=None,
    )


def test_measured_round_enforces_the_cap_and_an_oom_case_is_never_timed(config):
    """gpt-tiny's first AdamW step peaks lower than the second (no optimizer state yet during its backward), so
    a cap just under the measured peak lets the warm-up through: the measured round must catch it."""
    spec = CaseSpec("gpt-tiny", "nondp", 8, "cpu")
    peak = run_case(spec, config, timer=None).memory.peak_tensor_bytes
    timed = []

    def timer(step, one_call_s, reference=None, notes=None) -> Timing:
        timed.append(one_call_s)
        return Timing(time_median_s=one_call_s, rounds=1)

    at_cap = run_case(spec, replace(config, measure=replace(config.measure, memory_cap_bytes=peak)), timer)
    assert at_cap.status == "ok" and at_cap.memory.peak_tensor_bytes == peak and len(timed) == 1
    over = run_case(spec, replace(config, measure=replace(config.measure, memory_cap_bytes=peak - 1)), timer)
    assert over.status == "oom" and f"> cap {peak - 1}" in over.reason
    assert len(timed) == 1 and over.timing.rounds == 0  # not timed


def test_max_batch_measured_is_the_largest_batch_whose_tracked_peak_fits(config):
    uncapped = {4: run_case(CaseSpec("gpt-tiny", "nondp", 4, "cpu"), config, timer=None).memory.peak_tensor_bytes}
    cap = uncapped[4] - 1
    capped = replace(config, measure=replace(config.measure, memory_cap_bytes=cap))
    peaks: dict[int, int | None] = {}

    def probe(batch_size: int) -> BatchProbe:
        record = run_case(CaseSpec("gpt-tiny", "nondp", batch_size, "cpu"), capped, timer=None)
        peaks[batch_size] = record.memory.peak_tensor_bytes
        return BatchProbe(batch_size, record.status, record.memory.peak_tensor_bytes)

    max_ok, first_fail, probes = maxbatch.search(probe, limit=4096)
    assert max_ok is not None and first_fail == max_ok + 1 <= 4
    assert all(p.peak_tensor_bytes <= cap for p in probes if p.status == "ok")
    # Uncapped, the first failing batch peaks above the cap: the search stopped exactly at the crossing.
    if first_fail not in uncapped:
        uncapped[first_fail] = run_case(
            CaseSpec("gpt-tiny", "nondp", first_fail, "cpu"), config, None
        ).memory.peak_tensor_bytes
    assert uncapped[first_fail] > cap >= peaks[max_ok]
