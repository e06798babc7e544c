"""Memory measurement on CPU: the tensor tracker on hand-computed cases, the analytic Linear case through the
DP methods, the breakdown on dit-tiny-cond, isolation between cases, phases, measure_step's record shape and
its behaviour when the step fails."""

from __future__ import annotations

import itertools
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import models
from bench.dp import PHASES, build_step, resolve_privacy
from bench.results.record import CATEGORIES, CaseRecord, StepMemory, from_jsonl_line, to_jsonl_line
from bench.trackers import channel
from bench.trackers.channel import annotate_dp_buffer
from bench.trackers.memory import allocator
from bench.trackers.memory.measure import StepSources, build_timeline, measure_step
from bench.trackers.memory.process import RssSampler
from bench.trackers.memory.tensors import TensorTracker, optimizer_state_tensors
from tests.memory.tracking import tracked

F32 = 4


# ---- the tracker on hand-computed sequences ----------------------------------------------------------------
def test_hand_sequence_peak_trace_phase_and_breakdown():
    def run(mark):
        mark("forward")
        a = torch.empty(100)  # +400 -> 400
        b = torch.empty(50)  # +200 -> 600
        view = a[10:]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        del a  # the view keeps the storage alive
        mark("backward")
        d = torch.empty(1000)  # +4000 -> 4600 (the peak)
        del d  # -> 600
        del view  # -> 200
        mark("end")
        return b

    report = tracked(run)
    assert report.trace_bytes == [400, 600, 4600, 600, 200, 0]  # b is freed when run returns
    assert report.peak_tensor_bytes == 4600 and report.baseline_tensor_bytes == 0
    assert report.peak_phase == "backward"
    assert report.breakdown == {**dict.fromkeys(CATEGORIES, 0), "activations": 600, "other": 4000}
    assert report.allocations == 3


def test_factory_from_data_resize_and_out_are_counted():
    def run(mark):
        mark("forward")
        t = torch.tensor([1.0, 2.0, 3.0])  # built outside dispatch, announced by lift_fresh: +12
        buf = torch.empty(0)  # +0
        torch.add(t, t, out=buf)  # out= resizes buf to 3 floats: +12
        buf.resize_(10)  # +28 -> 52
        mark("end")
        return t, buf

    report = tracked(run)
    assert report.peak_tensor_bytes == 52 and report.adopted_storages == 0
    assert report.trace_bytes[:4] == [12, 12, 24, 52]


def test_pre_existing_inputs_are_adopted_into_the_baseline_and_frees_of_baseline_count():
    model = nn.Linear(8, 4, bias=False)  # 128 bytes of weight
    model.weight.grad = torch.zeros_like(model.weight)  # 128 bytes of stale gradient
    x = torch.randn(16, 8)  # 512 bytes, never declared

    def run(mark):
        mark("forward")
        y = model(x)  # +256
        model.weight.grad = None  # -128 (a baseline storage freed during the step)
        mark("end")
        return y

    report = tracked(run, model=model)
    assert report.baseline_tensor_bytes == 128 + 128 + 512
    assert report.adopted_storages == 1 and report.adopted_bytes == 512
    assert report.peak_tensor_bytes == 768 + 256
    assert report.trace_bytes == [1024, 896, 640]
    assert report.breakdown["parameters"] == 128 and report.breakdown["gradients"] == 128
    assert report.breakdown["other"] == 512 and report.breakdown["activations"] == 256


def test_annotation_after_creation_counts_as_per_sample_and_listener_is_removed():
    def run(mark):
        mark("backward")
        per_sample = torch.ones(10, 6)  # 240 bytes
        scratch = torch.ones(5)  # 20 bytes
        annotate_dp_buffer(per_sample[2:])  # a view announced later still names the whole storage
        annotate_dp_buffer(None)
        mark("end")
        return per_sample, scratch

    report = tracked(run)
    assert report.breakdown["per_sample"] == 240 and report.breakdown["other"] == 20
    assert report.unknown_annotations == 0 and not channel._listeners


def test_autograd_backward_and_adamw_state_are_tracked_exactly():
    d, p, n = 32, 16, 8
    model = nn.Linear(d, p, bias=False)
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(n, d)
    weight_bytes = d * p * F32

    def step(mark):
        mark("forward")
        loss = model(x).pow(2).mean()
        mark("backward")
        loss.backward()
        mark("optimizer")
        optimizer.step()
        mark("end")

    step(lambda phase: None)  # creates the AdamW state and a gradient
    report = tracked(step, model=model, optimizer=optimizer)
    state_bytes = sum(t.untyped_storage().nbytes() for t in optimizer_state_tensors(optimizer))
    assert state_bytes == 2 * weight_bytes + F32  # exp_avg, exp_avg_sq and the step counter
    # baseline = weight + stale grad + optimizer state + x (adopted)
    assert report.baseline_tensor_bytes == 2 * weight_bytes + state_bytes + n * d * F32
    assert report.breakdown["parameters"] == weight_bytes and report.breakdown["optimizer_state"] == state_bytes
    assert sum(report.breakdown.values()) == report.peak_tensor_bytes
    # backward created a new weight gradient (n·p output grads and the d×p mm result are visible in the trace)
    assert max(report.trace_bytes) == report.peak_tensor_bytes > report.baseline_tensor_bytes


def test_tracker_measures_one_step_only():
    tracker = TensorTracker("cpu")
    with tracker:
        torch.ones(3)
    with pytest.raises(RuntimeError, match="one step"), tracker:
        pass


# ---- the analytic case: one bias-free Linear d -> p through the DP methods -----------------------------------
def _linear_workload(d: int, p: int, tokens: int) -> models.Workload:
    def batch_fn(batch_size, generator):  # x (B, T, d), target (B, T, p)
        return models.Batch(
            (torch.randn(batch_size, tokens, d, generator=generator),),
            torch.randn(batch_size, tokens, p, generator=generator),
        )

    return models.Workload(
        name=f"linear-{d}x{p}-t{tokens}",
        model_fn=lambda: nn.Linear(d, p, bias=False),
        batch_fn=batch_fn,
        loss_fn=lambda out, target: (out - target).pow(2).mean(dim=(1, 2)),  # (B,)
        tokens_per_sample=tokens,
    )


def _measure(workload, method: str, batch_size: int, optimizer: str = "sgd") -> StepMemory:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG and hook warnings
        model = workload.build_model()
        step = build_step(
            method, workload, model, privacy=resolve_privacy(1.0), batch_size=batch_size, optimizer=optimizer
        )
        batch = workload.make_batch(batch_size)
        try:
            step(batch)  # warm-up: optimizer state and the previous step's gradients exist, as in the bench
            allocator.reset_between_cases("cpu")
            sources = StepSources("cpu", model=step.model, optimizer=step.optimizer)
            return measure_step(lambda mark: step(batch, mark), sources)
        finally:
            step.close()


@pytest.fixture(scope="module")
def linear_case():
    B, T, d, p = 16, 4, 256, 64  # 2·T² = 32 ≪ p·d = 16384
    workload = _linear_workload(d, p, T)
    return (B, T, d, p), {m: _measure(workload, m, B) for m in ("nondp", "opacus-hooks", "bk")}


def test_opacus_hooks_overhead_is_the_per_sample_gradient(linear_case):
    (B, T, d, p), figures = linear_case
    per_sample_bytes = B * p * d * F32
    # The stored per-sample gradient p.grad_sample is exactly B·p·d floats, and it is live at the peak.
    assert figures["opacus-hooks"].breakdown["per_sample"] == per_sample_bytes
    assert figures["nondp"].breakdown["per_sample"] == 0
    # The peak difference is TWICE that: Opacus 1.6 (create_or_accumulate_grad_sample) computes the
    # per-sample gradient with one einsum (B·p·d floats) and copies it into a zeroed p._current_grad_sample
    # (another B·p·d) while the einsum result is still alive. Slack: the two steps differ in when the d×p
    # weight gradient and the B·T·p output-gradient temporaries of the loss are live at their peaks,
    # so |Δ − 2·B·p·d·4| ≤ (p·d + 2·B·T·p)·4 bytes (= 98,304 here, 4.7 % of 2·B·p·d·4).
    delta = figures["opacus-hooks"].peak_tensor_bytes - figures["nondp"].peak_tensor_bytes
    slack = (p * d + 2 * B * T * p) * F32
    assert abs(delta - 2 * per_sample_bytes) <= slack, (delta, 2 * per_sample_bytes, slack)


def test_bk_adds_no_per_sample_gradient_when_t_squared_is_small(linear_case):
    (B, T, d, p), figures = linear_case
    delta = figures["bk"].peak_tensor_bytes - figures["nondp"].peak_tensor_bytes
    # Book-Keeping's extra memory: the Gaussian noise and the noisy sum (2·p·d floats, transient, independent
    # of B), the kept output gradients (B·T·p), the two Gram matrices (2·B·T²) and per-sample norms/factors.
    bound = (2 * p * d + B * T * p + 2 * B * T * T + 4 * B) * F32
    assert 0 <= delta <= bound, (delta, bound)
    assert delta < B * p * d * F32 / 3  # far below one per-sample gradient
    assert figures["bk"].breakdown["per_sample"] <= (B * T * p + 2 * B * T * T + 4 * B) * F32


# ---- the breakdown on the tiny DiT ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_tiny():
    workload = models.get_workload("dit-tiny-cond")
    trainable = sum(p.numel() * p.element_size() for p in workload.build_model().parameters() if p.requires_grad)
    return workload, trainable


def test_dit_tiny_breakdown_opacus_vs_nondp(dit_tiny):
    workload, trainable_bytes = dit_tiny
    B = 4
    nondp = _measure(workload, "nondp", B, optimizer="adamw")
    hooks = _measure(workload, "opacus-hooks", B, optimizer="adamw")
    assert nondp.breakdown["per_sample"] == 0
    assert hooks.breakdown["per_sample"] >= B * trainable_bytes
    for figures in (nondp, hooks):
        assert sum(figures.breakdown.values()) == figures.peak_tensor_bytes
        assert figures.breakdown["parameters"] >= trainable_bytes
        assert figures.peak_phase in PHASES
    assert hooks.peak_tensor_bytes - nondp.peak_tensor_bytes >= B * trainable_bytes


# ---- isolation -----------------------------------------------------------------------------------------------
def test_case_alone_and_after_a_larger_case_give_equal_tensor_figures(dit_tiny):
    workload, _ = dit_tiny
    alone = _measure(workload, "opacus-hooks", 2)
    _measure(workload, "opacus-hooks", 6)  # a larger case B in the same process
    after = _measure(workload, "opacus-hooks", 2)
    for key in ("peak_tensor_bytes", "baseline_tensor_bytes", "breakdown", "peak_phase"):
        assert getattr(alone, key) == getattr(after, key), key


# ---- measure_step --------------------------------------------------------------------------------------------
def _small_step():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)

    def step(mark):
        for phase in PHASES:
            mark(phase)
            if phase == "forward":
                loss = model(x).pow(2).mean()
            elif phase == "backward":
                loss.backward()
            elif phase == "optimizer":
                optimizer.step()
                optimizer.zero_grad()
            time.sleep(0.002)
        mark("end")

    return model, optimizer, step


def test_measure_step_returns_step_memory_phases_in_order_and_a_timeline():
    model, optimizer, step = _small_step()
    notes: list[str] = []
    figures = measure_step(step, StepSources("cpu", model=model, optimizer=optimizer), notes)
    record = CaseRecord(workload="small", method="nondp", batch_size=16, device="cpu", memory=figures, notes=notes)
    assert from_jsonl_line(to_jsonl_line(record)) == record
    phases = figures.phases
    assert [ph.name for ph in phases] == list(PHASES)
    assert all(ph.end_s > ph.start_s >= 0 for ph in phases)
    assert all(a.end_s == b.start_s for a, b in itertools.pairwise(phases))
    # CPU: no allocator or NVML figures, RSS sampled, ru_maxrss noted
    assert figures.peak_allocated_bytes is None and figures.nvml_peak_used_bytes is None
    assert figures.nvml_samples == 0 and figures.nvml_interval_s is None
    assert figures.peak_rss_bytes >= figures.baseline_rss_bytes > 0
    assert any("ru_maxrss" in note and "lifetime" in note for note in notes)
    timeline = figures.timeline
    assert 0 < len(timeline.t_s) <= 500
    assert len(timeline.tensor_bytes) == len(timeline.rss_bytes) == len(timeline.t_s)
    assert timeline.nvml_used_bytes == [] and timeline.allocated_bytes == []
    assert max(timeline.tensor_bytes) == figures.peak_tensor_bytes  # bucket maxima keep the peak


def test_rss_sampler_sees_a_large_allocation():
    sampler = RssSampler(0.001)
    sampler.start()
    block = torch.ones(64 * 2**20 // F32)  # 64 MiB, touched
    time.sleep(0.03)
    del block
    result = sampler.stop()
    assert result.peak_rss_bytes - result.baseline_rss_bytes >= 32 * 2**20
    assert result.samples >= 5


def test_out_of_memory_propagates_after_cleanup():
    model, optimizer, _ = _small_step()
    old_switch = sys.getswitchinterval()

    def failing(mark):
        mark("forward")
        keep = torch.ones(1000)  # noqa: F841 (live when the error is raised)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as info:
        measure_step(failing, StepSources("cpu", model=model, optimizer=optimizer))
    assert _get_current_dispatch_mode() is None  # tracker detached
    assert not channel._listeners
    assert sys.getswitchinterval() == old_switch
    assert not [t for t in threading.enumerate() if t.name.startswith("dpmem-")]
    partial = info.value.partial_measurement
    assert partial.peak_tensor_bytes >= partial.baseline_tensor_bytes + 4000
    assert [ph.name for ph in partial.phases] == ["forward"]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), 5.0])
def test_measure_step_rejects_bad_intervals(bad):
    model, optimizer, step = _small_step()
    with pytest.raises(ValueError, match="sample interval"):
        measure_step(step, StepSources("cpu", model=model, optimizer=optimizer, sample_interval_s=bad))


def test_measure_step_rejects_a_missing_device():
    model, optimizer, step = _small_step()
    with pytest.raises(ValueError, match="visible devices"):
        measure_step(step, StepSources("cuda:7", model=model, optimizer=optimizer))


def test_measure_step_without_tracker_and_snapshot_on_cpu():
    model, optimizer, step = _small_step()
    notes: list[str] = []
    sources = StepSources("cpu", model=model, optimizer=optimizer, track_tensors=False, snapshot_path="/tmp/x.pickle")
    figures = measure_step(step, sources, notes)
    assert figures.peak_tensor_bytes is None and figures.breakdown == {}
    assert figures.snapshot_path is None
    assert any(note.startswith("snapshot: ") for note in notes)
    assert figures.timeline.tensor_bytes == [] and len(figures.timeline.rss_bytes) > 0


def test_build_timeline_buckets_keep_maxima_and_carry_values():
    # Two traces on one axis of 4 buckets over 0..4 s: a dense one and a sparse one.
    traces = {
        "tensor_bytes": ([0.1, 0.5, 1.2, 3.9], [10, 30, 20, 5], 0),
        "rss_bytes": ([2.5], [100], 50),
    }
    timeline = build_timeline(traces, t0=0.0, t_end=4.0, max_points=4)
    assert timeline.t_s == [0.0, 1.0, 2.0, 3.0]
    assert timeline.tensor_bytes == [30, 20, 20, 5]
    assert timeline.rss_bytes == [50, 50, 100, 100]
    assert build_timeline({}, 0.0, 1.0).t_s == []


def test_allocator_helpers_are_no_ops_on_cpu():
    allocator.reset_between_cases("cpu")
    allocator.reset_peak("cpu")
    assert allocator.peak_figures("cpu") == (None, None) and allocator.current_figures("cpu") == (None, None)
    with allocator.memory_snapshot("cpu", None) as notes:
        pass
    assert notes == []
