"""The roofline time model (bench/plan/timemodel.py) on hand-made op groups, and the catalogue's peak figures."""

from __future__ import annotations

import pytest

from bench.plan.gpus import GPUS, get_gpu
from bench.plan.timemodel import DEFAULT_EFFICIENCY, Roofline, TimeModelError, estimate, fit_scale, gpu_roofline
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
