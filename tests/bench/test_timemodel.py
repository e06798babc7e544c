"""The roofline time model (bench/plan/timemodel.py) on hand-made op groups and real meta work counts, its
calibration from timed records, and the catalogue's peak figures."""

from __future__ import annotations

import pytest

from bench.plan.gpus import GPUS, Gpu, Peaks, get_gpu
from bench.plan.timemodel import (
    DEFAULT_EFFICIENCY,
    DEFAULT_LAUNCH_S,
    Roofline,
    TimeModelError,
    estimate,
    fit_efficiencies,
    fit_scale,
    gpu_roofline,
    time_estimate,
)
from bench.results.record import CaseRecord, OpGroup, StepWork, Timing

MACHINE = Roofline(
    matmul_flops={"float32": 100.0, "bfloat16": 400.0},
    attention_flops={"float32": 50.0},
    elementwise_flops=10.0,
    bandwidth=20.0,
    launch_s=0.5,
)


def _work(*groups: OpGroup) -> StepWork:
    return StepWork(
        flops=sum(g.flops * g.count for g in groups),
        bytes_accessed=sum(g.bytes_accessed * g.count for g in groups),
        op_count=sum(g.count for g in groups),
        op_groups=list(groups),
    )


def test_each_op_takes_the_slower_of_its_arithmetic_and_its_traffic_plus_a_launch():
    work = _work(
        OpGroup("matmul", "float32", 1000, 20, 2),  # compute-bound: 10 s each
        OpGroup("matmul", "bfloat16", 1000, 200, 1),  # memory-bound: 10 s (2.5 s of arithmetic)
        OpGroup("attention", "float32", 100, 0, 1),  # 2 s
        OpGroup("elementwise", "float16", 10, 100, 3),  # 5 s each, bandwidth; float16 takes no matmul rate here
        OpGroup("copy", "float32", 0, 40, 1),  # 2 s
    )
    result = estimate(work, MACHINE)
    assert result.by_class == {"matmul": 30.0, "attention": 2.0, "elementwise": 15.0, "copy": 2.0}
    assert result.launch_s == 8 * 0.5
    assert result.seconds == 30 + 2 + 15 + 2 + 4


def test_a_dtype_without_its_own_rate_takes_float32s():
    assert estimate(_work(OpGroup("matmul", "float16", 1000, 0, 1)), MACHINE).by_class == {"matmul": 10.0}


def test_records_without_work_counts_are_refused_in_one_line():
    with pytest.raises(TimeModelError, match="no work counts"):
        estimate(StepWork(), MACHINE)
    timed = CaseRecord("w", "nondp", 2, "cpu", timing=Timing(time_median_s=1.0))
    with pytest.raises(TimeModelError, match="lack flops, bytes_accessed, op_count, op_groups"):
        fit_scale([timed], MACHINE)
    with pytest.raises(TimeModelError, match="lack time_median_s"):
        fit_scale([CaseRecord("w", "nondp", 2, "cpu")], MACHINE)


def test_fit_scale_matches_the_median_record():
    work = _work(OpGroup("matmul", "float32", 1000, 0, 1))  # 10 s + 0.5 s launch
    records = [CaseRecord("w", "nondp", 2, "cpu", timing=Timing(time_median_s=s), work=work) for s in (21, 42, 63)]
    fitted = fit_scale(records, MACHINE)
    assert fitted.calibrated and "fitted to 3 record(s)" in fitted.label
    assert estimate(work, fitted).seconds == pytest.approx(42.0)


def test_gpu_roofline_is_the_datasheet_peaks_times_the_default_efficiencies():
    gpu = get_gpu("h100-80gb")
    machine = gpu_roofline(gpu)
    assert machine.matmul_flops["bfloat16"] == pytest.approx(989.5e12 * DEFAULT_EFFICIENCY["matmul"])
    assert machine.matmul_flops["float32"] == pytest.approx(67e12 * DEFAULT_EFFICIENCY["matmul"])
    assert gpu_roofline(gpu, tf32=True).matmul_flops["float32"] == pytest.approx(
        494.5e12 * DEFAULT_EFFICIENCY["matmul"]
    )
    assert machine.bandwidth == pytest.approx(3.35e12 * DEFAULT_EFFICIENCY["bandwidth"])
    assert not machine.calibrated and "uncalibrated" in machine.label
    # no BF16 before Ampere: a bf16 matmul on a V100 runs at the FP32 rate
    v100 = gpu_roofline(get_gpu("v100-32gb"))
    assert v100.matmul_flops["bfloat16"] == pytest.approx(15.7e12 * DEFAULT_EFFICIENCY["matmul"])


def test_a_gpu_without_peak_figures_gets_no_estimate():
    gpu = get_gpu("a10g-24gb")
    assert gpu.peaks is None
    with pytest.raises(TimeModelError, match="no peak figures for this GPU"):
        gpu_roofline(gpu)


def test_every_peak_figure_is_cited_and_ordered():
    """Tensor-core rates above the FP32 rate, every entry with its datasheet named, figures in datasheet ranges."""
    for gpu in GPUS.values():
        peaks = gpu.peaks
        if peaks is None:
            continue
        assert "datasheet" in peaks.source, gpu.name
        assert 5e12 < peaks.fp32_flops < 1e14 and 2e11 < peaks.memory_bandwidth < 1e13, gpu.name
        for rate in (peaks.tf32_flops, peaks.bf16_flops):
            assert rate is None or rate > peaks.fp32_flops, gpu.name


# ---- calibration: fit_efficiencies ------------------------------------------------------------------------------

# A made-up GPU slow enough in FP32 that every op class binds somewhere on tiny workloads (on a real GPU elementwise
# ops are bandwidth-bound: their FLOP rate would stay at its default).
SLOW_GPU = Gpu("slow-1gb", "a slow test GPU", 2**30, (8, 0), Peaks(2e8, None, 8e9, 4e9, "made-up datasheet"))
TRUE_EFFICIENCY = {"matmul": 0.55, "attention": 0.3, "elementwise": 0.2, "bandwidth": 0.6}
TRUE_LAUNCH_S = 2e-6


@pytest.fixture(scope="module")
def meta_works() -> list[StepWork]:
    """Real work counts of tiny meta steps (amp-bf16: bf16 matmuls and attention, fp32 elementwise ops)."""
    from bench.case.runner import run_case
    from bench.case.spec import CaseSpec
    from tests.bench.test_work import _config

    cases = [("gpt-tiny", m, b) for m in ("nondp", "bk") for b in (1, 8)] + [("dit-tiny-cond", "nondp", 4)]
    records = [run_case(CaseSpec(w, m, b, "meta", precision="amp-bf16"), _config(), None) for w, m, b in cases]
    assert all(r.status == "ok" for r in records)
    return [r.work for r in records]


def _timed(works: list[StepWork], machine: Roofline, device_name: str = "Slow GPU") -> list[CaseRecord]:
    """CUDA records whose measured step times are ``machine``'s estimates of ``works``."""
    return [
        CaseRecord("w", "m", 1, "cuda:0", device_name=device_name, work=w, timing=Timing(estimate(w, machine).seconds))
        for w in works
    ]


def test_the_fit_recovers_every_efficiency_and_the_launch_time(meta_works):
    truth = gpu_roofline(SLOW_GPU, efficiency=TRUE_EFFICIENCY, launch_s=TRUE_LAUNCH_S)
    for work in meta_works:  # every unknown holds a share of the time the fit can see
        shares = estimate(work, truth).by_class
        assert {"matmul", "attention", "elementwise"} <= shares.keys()
    other = _timed(meta_works, truth, device_name="Another GPU")[:1]  # not the fitted GPU's: ignored
    start = {"matmul": 0.8, "attention": 0.5, "elementwise": 0.4, "bandwidth": 0.9, "launch": 4e-6}  # not the truth
    fit = fit_efficiencies(_timed(meta_works, truth) + other, SLOW_GPU, "Slow GPU", start)
    assert fit.records == len(meta_works) and fit.single_factor is None
    assert set(fit.fitted) == {"matmul", "attention", "elementwise", "bandwidth", "launch"}
    for name, share in TRUE_EFFICIENCY.items():
        assert fit.efficiency[name] == pytest.approx(share, rel=1e-3), name
    assert fit.launch_s == pytest.approx(TRUE_LAUNCH_S, rel=1e-3) and fit.relative_error < 1e-3
    assert fit.label.startswith("calibrated from 5 record(s) of Slow GPU: matmul 55% of peak; attention 30% of")
    machine = fit.roofline(get_gpu("h100-80gb"))  # the shares apply to another GPU's peaks
    assert machine.calibrated and machine.label.startswith("h100-80gb datasheet peaks, calibrated from 5 record(s)")
    assert machine.matmul_flops["bfloat16"] == pytest.approx(989.5e12 * 0.55, rel=1e-3)


def _matmul_record(flops: int, seconds: float) -> CaseRecord:
    """A step of one compute-bound fp32 matmul (10 bytes moved) timed at ``seconds``."""
    work = _work(OpGroup("matmul", "float32", flops, 10, 1))
    return CaseRecord("w", "m", 1, "cuda:0", device_name="Slow GPU", work=work, timing=Timing(seconds))


def test_classes_no_record_constrains_keep_their_defaults_and_the_label_says_so():
    # matmuls at 40 % of the 2e8 FLOP/s peak: 8e7 FLOP/s; the launch (5 µs of seconds) is far below 1 %
    records = [_matmul_record(f, f / 8e7) for f in (8 * 10**7, 3 * 8 * 10**7)]
    fit = fit_efficiencies(records, SLOW_GPU, "Slow GPU")
    assert fit.fitted == ("matmul",) and fit.efficiency["matmul"] == pytest.approx(0.4, rel=1e-3)
    for name in ("attention", "elementwise", "bandwidth"):
        assert fit.efficiency[name] == DEFAULT_EFFICIENCY[name]
    assert fit.launch_s == DEFAULT_LAUNCH_S
    assert "attention, elementwise, bandwidth, launch at default (no record constrains them)" in fit.label


def test_records_that_cannot_separate_the_classes_fall_back_to_one_factor(meta_works):
    truth = gpu_roofline(SLOW_GPU, efficiency=TRUE_EFFICIENCY, launch_s=TRUE_LAUNCH_S)
    records = _timed(meta_works[:1], truth)  # one record, five unknowns
    fit = fit_efficiencies(records, SLOW_GPU, "Slow GPU")
    default = gpu_roofline(SLOW_GPU)
    factor = records[0].timing.time_median_s / estimate(meta_works[0], default).seconds
    assert fit.single_factor == pytest.approx(factor) and fit.fitted == ()
    assert "one factor" in fit.label and "cannot separate the op classes" in fit.label
    assert estimate(meta_works[0], fit.roofline(SLOW_GPU)).seconds == pytest.approx(records[0].timing.time_median_s)


def test_the_fit_refuses_records_without_work_counts_or_times():
    timed = CaseRecord("w", "m", 1, "cuda:0", device_name="Slow GPU", timing=Timing(time_median_s=1.0))
    with pytest.raises(TimeModelError, match=r"the records lack flops, bytes_accessed, op_count, op_groups$"):
        fit_efficiencies([timed], SLOW_GPU, "Slow GPU")
    with pytest.raises(TimeModelError, match=r"the records lack time_median_s$"):
        fit_efficiencies([CaseRecord("w", "m", 1, "cuda:0", device_name="Slow GPU")], SLOW_GPU, "Slow GPU")


def test_a_record_estimate_names_its_gpu_or_says_why_there_is_none():
    work = _work(OpGroup("matmul", "bfloat16", 10**12, 10**6, 1))
    h100 = get_gpu("h100-80gb")
    found = time_estimate(work, h100)
    assert found.estimated_step_s == pytest.approx(estimate(work, gpu_roofline(h100)).seconds)
    assert (found.estimate_gpu, found.estimate_calibrated, found.estimate_reason) == ("h100-80gb", False, "")
    assert "uncalibrated" in found.estimate_source
    none = time_estimate(work, get_gpu("a10g-24gb"))
    assert none.estimated_step_s is None and none.estimate_gpu == "a10g-24gb"
    assert none.estimate_reason == "no peak figures for this GPU (a10g-24gb): no time estimate"
