"""The capacity planner (python -m bench.plan), the GPU catalogue and the overhead model behind it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.dp import resolve_privacy
from bench.plan import planner as plan
from bench.plan.gpus import GPUS, get_gpu
from bench.plan.overhead import DEFAULT_OVERHEAD, CalibrationError, OverheadModel, calibrate, parse_overhead
from bench.plan.planner import DEFAULT_PRECISION
from bench.results.record import CaseRecord, OpGroup, StepMemory, StepWork, Timing

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
MIB = 2**20


# ---- overhead model ---------------------------------------------------------------------------------------------


def test_overhead_model_parses_and_applies():
    model = parse_overhead("1.5GiB+5%")
    assert (model.fixed_bytes, model.fraction) == (int(1.5 * GIB), 0.05)
    assert model.device_bytes(10 * GIB) == int(1.5 * GIB) + int(10.5 * GIB)
    assert model.fits(10 * GIB, 12 * GIB) and not model.fits(10 * GIB, 12 * GIB - 1)
    assert parse_overhead("0+0%").device_bytes(123) == 123
    assert DEFAULT_OVERHEAD.fixed_bytes == GIB and DEFAULT_OVERHEAD.fraction == pytest.approx(0.10)


@pytest.mark.parametrize("bad", ["1GiB", "10%", "1GiB+10", "abc+1%", "1XB+5%", ""])
def test_bad_overheads_are_one_line_errors(bad):
    with pytest.raises(ValueError, match="FIXED\\+PERCENT") as info:
        parse_overhead(bad)
    assert "\n" not in str(info.value)


def _cuda_record(gpu: str, tensor: int, reserved: int, baseline: int | None, status: str = "ok") -> CaseRecord:
    memory = StepMemory(peak_tensor_bytes=tensor, peak_reserved_bytes=reserved, nvml_baseline_bytes=baseline)
    return CaseRecord("w", "m", 8, "cuda:0", status=status, memory=memory, device_name=gpu)


def test_calibration_recovers_the_allocator_line_and_the_context():
    h100 = "NVIDIA H100 80GB HBM3"
    records = [_cuda_record(h100, t, 300 * MIB + int(1.07 * t), 520 * MIB) for t in (4 * GIB, 9 * GIB, 20 * GIB)]
    records += [_cuda_record(h100, 5 * GIB, 1, 1, status="oom"), _cuda_record(h100, 5 * GIB, 6 * GIB, None)]
    records.append(_cuda_record("NVIDIA A100-SXM4-40GB", 5 * GIB, 6 * GIB, 400 * MIB))
    with pytest.raises(CalibrationError, match="several GPU models"):
        calibrate(records)
    model = calibrate(records, gpu="h100")
    assert model.fraction == pytest.approx(0.07, abs=1e-6)
    assert model.fixed_bytes == pytest.approx(820 * MIB, abs=64)
    assert "3 NVIDIA H100" in model.source
    with pytest.raises(CalibrationError, match="no ok CUDA record"):
        calibrate(records, gpu="v100")


# ---- GPU catalogue ---------------------------------------------------------------------------------------------


def test_gpu_catalogue():
    h100 = get_gpu("H100-80GB")
    assert h100.memory_bytes == 80 * GIB and h100.sm == (9, 0)
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "l4-24gb", "rtx4090-24gb", "a10g-24gb"} <= set(GPUS)
    with pytest.raises(ValueError, match="did you mean h100-80gb") as info:
        get_gpu("h100-80")
    assert "a100-40gb" in str(info.value) and "\n" not in str(info.value)


# ---- the planner -----------------------------------------------------------------------------------------------


def _fits(
    workload: str, method: str, batch: int, budget: int, overhead: OverheadModel, precision: str = DEFAULT_PRECISION
) -> bool:
    """Whether ``batch`` fits ``budget``, by a meta case of its own (in the planner's default precision)."""
    config = BenchConfig.from_fields(preset="t", rounds=1, privacy=resolve_privacy(1.0), overhead=overhead)
    record = run_case(CaseSpec(workload, method, batch, "meta", precision=precision), config, None)
    return overhead.fits(record.memory.peak_tensor_bytes, budget)


PLAN_ARGV = ["dit-tiny-cond", "--memory", "24MiB", "--budget-overhead", "1MiB+5%"]


def _meta_reason(workload: str, method: str, batch: int) -> str:
    """The full reason a meta case gives (what the plan must print, never cut)."""
    config = BenchConfig.from_fields(preset="t", rounds=1, privacy=resolve_privacy(1.0))
    return run_case(CaseSpec(workload, method, batch, "meta", precision=DEFAULT_PRECISION), config, None).reason


def test_plan_finds_the_exact_max_batch_and_prints_the_table(capsys):
    assert plan.main([*PLAN_ARGV, "--methods", "nondp,bk,opacus-ew"]) == 0
    out = capsys.readouterr().out
    memory_table = out.split("Time at max batch")[0]
    rows = {line.split("|")[1].strip(): line.split("|") for line in memory_table.splitlines() if line.startswith("| ")}
    assert "5.0% of tensor bytes (--budget-overhead 1MiB+5%)" in out
    overhead = parse_overhead("1MiB+5%")
    for method in ("nondp", "bk"):
        best = int(rows[method][2])
        assert _fits("dit-tiny-cond", method, best, 24 * MIB, overhead)
        assert not _fits("dit-tiny-cond", method, best + 1, 24 * MIB, overhead)
    assert rows["nondp"][3].strip() == "1.00" and rows["nondp"][8].strip() == "1.000"
    # issue #17 item 8: a reason is never cut mid-word: the row points to a note that holds all of it
    assert rows["opacus-ew"][2].strip() == "unsupported" and rows["opacus-ew"][9].strip() == "note 1"
    reason = " ".join(_meta_reason("dit-tiny-cond", "opacus-ew", 8).split())  # expanded weights refuse autocast
    assert "expected scalar type" in reason and len(reason) > 140  # longer than the table's old cut
    assert out.splitlines()[-2:] == ["Notes:", f"1. {reason}"]


def test_plan_estimates_time_at_max_batch_for_a_gpu_with_peaks(capsys):
    """Per method at its max batch: the roofline's step time over non-DP's at the same batch, samples/s and the
    FLOP and byte overheads, from the meta records' work counts; labelled uncalibrated. A GPU without peaks and a
    plan for --memory say why there is no estimate."""
    from bench.plan.timemodel import estimate, gpu_roofline

    argv = ["gpt-tiny:seq_len=8", "--methods", "nondp,bk", "--max-batch-limit", "8", "--format", "json"]
    assert plan.main([*argv, "--gpu", "h100-80gb"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "estimated, uncalibrated" in data["time_model"] and data["time_calibrated"] is False
    rows = {r["method"]: r for r in data["rows"]}
    config = BenchConfig.from_fields(preset="t", rounds=1, privacy=resolve_privacy(1.0))
    machine = gpu_roofline(get_gpu("h100-80gb"))
    works = {
        m: run_case(CaseSpec("gpt-tiny:seq_len=8", m, 8, "meta", precision=DEFAULT_PRECISION), config, None).work
        for m in ("nondp", "bk")
    }
    for method, row in rows.items():
        assert row["max_batch"] == 8
        assert row["step_seconds"] == pytest.approx(estimate(works[method], machine).seconds)
        assert row["samples_per_s"] == pytest.approx(8 / row["step_seconds"])
        assert row["flops_over_nondp"] == pytest.approx(works[method].flops / works["nondp"].flops)
    assert rows["nondp"]["time_over_nondp"] == 1.0 and rows["bk"]["time_over_nondp"] > 1.0
    assert plan.main([*argv[:-2], "--gpu", "a10g-24gb"]) == 0
    assert "Time at max batch: no peak figures for this GPU (a10g-24gb): no time estimate" in capsys.readouterr().out
    assert plan.main([*argv, "--memory", "1GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["time_model"].startswith("no GPU named") and data["rows"][0]["step_seconds"] is None


def test_plan_json_has_numbers_full_reasons_the_model_and_the_versions(capsys):
    """Issue #17 item 8: ``--format json`` for scripts: numbers as numbers, reasons in full, the overhead model
    and the torch / opacus / dpmem versions."""
    import importlib.metadata
    import json

    import torch

    assert plan.main([*PLAN_ARGV, "--methods", "nondp,bk,opacus-ew", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in data["rows"]}
    nondp, bk, ew = rows["nondp"], rows["bk"], rows["opacus-ew"]
    assert data["memory_bytes"] == 24 * MIB and data["gpu"] is None and data["workload"] == "dit-tiny-cond"
    assert data["overhead"] == {
        "fixed_bytes": MIB,
        "fraction": 0.05,
        "source": "--budget-overhead 1MiB+5%",
        "calibration_gpu": None,
        "calibration_gpu_stated": None,
    }
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["opacus"] == importlib.metadata.version("opacus") and data["versions"]["dpmem"]
    overhead = parse_overhead("1MiB+5%")
    for row in (nondp, bk):
        assert isinstance(row["max_batch"], int) and isinstance(row["peak_tensor_bytes"], int)
        assert row["device_bytes"] == overhead.device_bytes(row["peak_tensor_bytes"]) <= 24 * MIB
        assert sum(row["breakdown"].values()) == row["peak_tensor_bytes"]
        assert not row["max_batch_is_lower_bound"] and row["status"] == "ok"
    assert not _fits("dit-tiny-cond", "bk", bk["max_batch"] + 1, 24 * MIB, overhead)
    assert bk["batch_over_nondp"] == pytest.approx(bk["max_batch"] / nondp["max_batch"])
    assert bk["peak_over_nondp"] == pytest.approx(bk["peak_tensor_bytes"] / bk["nondp_peak_bytes"])
    assert data["precision"] == DEFAULT_PRECISION
    assert ew["status"] == "unsupported" and ew["max_batch"] is None
    assert ew["reason"] == _meta_reason("dit-tiny-cond", "opacus-ew", 8)  # in full


def test_plan_csv_round_trips_with_pandas(capsys):
    import pandas as pd

    assert plan.main([*PLAN_ARGV, "--methods", "nondp,opacus-ew", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("method")
    assert list(table.index) == ["nondp", "opacus-ew"]
    for column in ("max_batch", "peak_tensor_bytes", "device_bytes", "memory_bytes", "overhead_fraction"):
        assert pd.api.types.is_numeric_dtype(table[column]), column
    nondp = table.loc["nondp"]
    overhead = parse_overhead("1MiB+5%")
    assert nondp["device_bytes"] == overhead.device_bytes(int(nondp["peak_tensor_bytes"])) <= 24 * MIB
    assert _fits("dit-tiny-cond", "nondp", int(nondp["max_batch"]), 24 * MIB, overhead)
    assert nondp["breakdown_activations"] > 0 and nondp["overhead_fixed_bytes"] == MIB
    assert nondp["overhead_source"] == "--budget-overhead 1MiB+5%" and nondp["torch_version"]
    assert table.loc["opacus-ew", "reason"] == _meta_reason("dit-tiny-cond", "opacus-ew", 8)
    assert pd.isna(table.loc["opacus-ew", "max_batch"]) and pd.isna(nondp["gpu_name"])


def test_plan_says_when_the_host_cannot_draw_a_batch(capsys, monkeypatch):
    """A batch the host cannot allocate (forced from 40 up) is the host's limit: the plan keeps the largest batch
    found to fit as a lower bound and says why, in every format."""
    import json

    import models

    draw = models.Workload.make_batch

    def make_batch(self, batch_size, generator=None, device=None):
        if batch_size >= 40:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10995116277760 bytes")
        return draw(self, batch_size, generator, device)

    monkeypatch.setattr(models.Workload, "make_batch", make_batch)
    argv = ["gpt-tiny", "--memory", "12MiB", "--budget-overhead", "512KiB+5%", "--methods", "nondp"]
    assert plan.main([*argv, "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert (row["status"], row["max_batch"], row["host_limit_batch"]) == ("ok", 39, 40)
    assert row["max_batch_is_lower_bound"] and not row["at_limit"]
    assert row["reason"].startswith("≥39 in 12 MiB (host memory limit at batch 40): batch 40: RuntimeError")
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "| nondp | ≥39 (note 1) |" in out and "1. nondp: ≥39 in 12 MiB (host memory limit at batch 40)" in out


def test_plan_in_bf16_with_checkpointed_blocks(capsys):
    """The planner's cases run in the asked mode: bf16 weights, every block recomputed under the routed
    attention kernel (an unrouted recompute saved other tensors and the checkpoint refused it)."""
    argv = ["dit-tiny-cond", "--memory", "24MiB", "--budget-overhead", "1MiB+5%", "--methods", "nondp"]
    assert plan.main([*argv, "--precision", "bf16", "--checkpointing", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "bf16+blocks; attention auto" in out
    best = int(next(line.split("|") for line in out.splitlines() if line.startswith("| nondp |"))[2])
    overhead = parse_overhead("1MiB+5%")
    config = BenchConfig.from_fields(preset="t", rounds=1, privacy=resolve_privacy(1.0), overhead=overhead)
    small, fp32 = (
        run_case(CaseSpec("dit-tiny-cond", "nondp", b, "meta", precision=p, checkpointing=c), config, None)
        for b, p, c in ((best + 1, "bf16", "blocks"), (best + 1, "fp32", "none"))
    )
    assert small.status == fp32.status == "ok", (small.reason, fp32.reason)
    assert not overhead.fits(small.memory.peak_tensor_bytes, 24 * MIB)  # the next batch does not fit: exact
    assert small.memory.peak_tensor_bytes < 0.75 * fp32.memory.peak_tensor_bytes  # bf16 + blocks hold much less


@pytest.mark.parametrize(
    ("gpu", "precision"), [("h100-80gb", "amp-bf16"), ("a10-24gb", "amp-bf16"), ("v100-16gb", "fp32")]
)
def test_plan_defaults_to_amp_bf16_where_the_gpu_has_bf16(capsys, gpu, precision):
    """What users train in: bf16 autocast on a GPU with bf16 (Ampere on), fp32 on V100/T4 (amp-fp16's GradScaler
    is refused by every Opacus mode); --precision overrides it."""
    assert plan.main(["gpt-tiny:seq_len=8", "--gpu", gpu, "--methods", "nondp", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == precision
    assert plan.main(["gpt-tiny:seq_len=8", "--gpu", gpu, "--methods", "nondp", "--precision", "bf16"]) == 0
    assert "bf16; attention" in capsys.readouterr().out


def test_plan_takes_a_workload_spec_and_a_gpu(capsys):
    assert plan.main(["gpt-tiny:seq_len=8", "--gpu", "l4-24gb", "--methods", "microbatch"]) == 0
    out = capsys.readouterr().out
    assert "gpt-tiny:seq_len=8 on l4-24gb (24 GiB)" in out
    assert "| microbatch | ≥8 |" in out  # the per-sample loop's search stops at --microbatch-limit


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dit-xl-2-cond", "--gpu", "h100-81gb"], "unknown GPU 'h100-81gb'"),
        (["dit-xl-9-cond"], "dit-xl-9-cond"),
        (["dit-tiny-cond", "--methods", "opacus-hook"], "valid:"),
        (["dit-tiny-cond", "--attention", "fast"], "--attention"),
        (["dit-tiny-cond", "--budget-overhead", "lots"], "FIXED+PERCENT"),
        (["dit-tiny-cond", "--calibrate", "/no/such/file.jsonl"], "no such file"),
        (["dit-tiny-cond", "--precision", "fp16"], "did you mean"),
        (["dit-tiny-cond", "--checkpointing", "all"], "--checkpointing"),
        (["gpt2:n_layer=1000000000"], "n_layer=1000000000 is above the limit"),  # it hung, RSS growing
    ],
)
def test_plan_usage_errors_are_one_line_exit_2(capsys, argv, message):
    assert plan.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_plan_argument_errors_are_one_line_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.plan", "dit-tiny-cond", "--memory", "80"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # not argparse's usage block; and a size without a unit is refused (it meant 80 bytes)
    assert proc.returncode == 2
    assert proc.stderr.startswith("python -m bench.plan: error: argument --memory: '80' has no unit: write 80GiB")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_plan_calibrates_from_gpu_results(tmp_path, capsys):
    from bench.results.record import to_jsonl_line

    gpu = "NVIDIA A100-SXM4-80GB"
    records = [_cuda_record(gpu, t, MIB + int(1.2 * t), 600 * MIB) for t in (2 * GIB, 6 * GIB)]
    path = tmp_path / "a100.jsonl"
    path.write_text("".join(to_jsonl_line(r) + "\n" for r in records))
    argv = ["gpt-tiny", "--memory", "700MiB", "--methods", "nondp", "--calibrate", str(path)]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "0.59 GiB + 20.0% of tensor bytes (calibrated on 2 NVIDIA A100-SXM4-80GB record(s)" in out
    assert "Calibrated on: NVIDIA A100-SXM4-80GB records\n" in out  # --memory: no GPU to check them against
    best = int(next(line for line in out.splitlines() if line.startswith("| nondp |")).split("|")[2])
    model = calibrate(records)
    assert _fits("gpt-tiny", "nondp", best, 700 * MIB, model) and not _fits(
        "gpt-tiny", "nondp", best + 1, 700 * MIB, model
    )


# ---- calibration sanity (issue #17 item 9) ----------------------------------------------------------------------


def test_calibration_refuses_a_fit_whose_device_bytes_fall_as_tensor_bytes_grow():
    h100 = "NVIDIA H100 80GB HBM3"
    falling = [_cuda_record(h100, t, 30 * GIB - 2 * t, 500 * MIB) for t in (2 * GIB, 6 * GIB, 10 * GIB)]
    with pytest.raises(CalibrationError, match="device bytes would fall as tensor bytes grow") as info:
        calibrate(falling)
    message = str(info.value)
    assert "\n" not in message and "reserved = " in message and "-2.0000 x tensor bytes" in message
    assert "overhead fraction -300.0%" in message  # the fit named, its fraction below -100 %
    flat = [_cuda_record(h100, t, 9 * GIB, 500 * MIB) for t in (2 * GIB, 6 * GIB)]
    with pytest.raises(CalibrationError, match="would stay the same"):
        calibrate(flat)
    # a fraction below zero but above -100 % still grows with tensor bytes: kept
    assert calibrate([_cuda_record(h100, t, 3 * GIB + t // 2, 500 * MIB) for t in (2 * GIB, 6 * GIB)]).fraction == (
        pytest.approx(-0.5)
    )


# A step's work counts, by hand: a bf16 matmul and an fp32 elementwise op (what the time fit needs of a record).
_STEP_WORK = StepWork(
    flops=2 * 10**12 + 10**8,
    bytes_accessed=10**9 + 12 * 10**8,
    op_count=2,
    op_groups=[
        OpGroup("matmul", "bfloat16", 2 * 10**12, 10**9, 1),
        OpGroup("elementwise", "float32", 10**8, 12 * 10**8, 1),
    ],
)


def _calibration_file(tmp_path, gpu: str, fixed: int = MIB, slope: float = 1.2, work: bool = True) -> str:
    """Two ok CUDA records of ``gpu`` with reserved = fixed + slope · tensor bytes, each with a measured step time
    and (``work``) work counts."""
    from bench.results.record import to_jsonl_line

    records = [
        dataclasses.replace(
            _cuda_record(gpu, t, fixed + int(slope * t), 600 * MIB),
            timing=Timing(time_median_s=0.01 * t / GIB),
            work=_STEP_WORK if work else StepWork(),
        )
        for t in (2 * GIB, 6 * GIB)
    ]
    path = tmp_path / "calibration.jsonl"
    path.write_text("".join(to_jsonl_line(r) + "\n" for r in records))
    return str(path)


def test_plan_refuses_a_falling_calibration_in_one_line_exit_2(tmp_path, capsys):
    path = _calibration_file(tmp_path, "NVIDIA A100-SXM4-80GB", fixed=20 * GIB, slope=-0.5)
    assert plan.main(["gpt-tiny", "--memory", "700MiB", "--methods", "nondp", "--calibrate", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused the fit calibrated on 2 NVIDIA A100-SXM4-80GB record(s)" in err


def test_plan_takes_calibration_records_of_the_planned_gpu_only_unless_stated(tmp_path, capsys):
    import json

    path = _calibration_file(tmp_path, "NVIDIA A100-SXM4-80GB")
    argv = ["gpt-tiny", "--methods", "nondp", "--max-batch-limit", "16", "--calibrate", path]
    assert plan.main([*argv, "--gpu", "h100-80gb"]) == 2  # A100 records for an H100 plan: refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "records are from NVIDIA A100-SXM4-80GB, not h100-80gb" in err
    assert "plan --gpu a100-80gb with them" in err and "--calibrate-gpu NAME" in err
    assert plan.main([*argv]) == 2  # the default GPU (h100-80gb) is a GPU too
    capsys.readouterr()

    assert plan.main([*argv, "--gpu", "a100-80gb", "--format", "json"]) == 0
    overhead = json.loads(capsys.readouterr().out)["overhead"]
    assert overhead["calibration_gpu"] == "NVIDIA A100-SXM4-80GB" and overhead["calibration_gpu_stated"] is None
    assert overhead["fraction"] == pytest.approx(0.2)

    assert plan.main([*argv, "--gpu", "h100-80gb", "--calibrate-gpu", "A100"]) == 0  # stated: taken, and said
    out = capsys.readouterr().out
    assert "Calibrated on: NVIDIA A100-SXM4-80GB records (--calibrate-gpu A100; the plan is for h100-80gb)" in out
    assert plan.main([*argv, "--gpu", "h100-80gb", "--calibrate-gpu", "A100", "--format", "csv"]) == 0
    (fields,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert fields["overhead_calibration_gpu"] == "NVIDIA A100-SXM4-80GB" and fields["gpu_name"] == "h100-80gb"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA A100-SXM4-80GB", ["a100-80gb"]),
        ("NVIDIA A100-PCIE-40GB", ["a100-40gb"]),
        ("NVIDIA H100 80GB HBM3", ["h100-80gb"]),
        ("NVIDIA H100 NVL", ["h100-nvl-94gb"]),
        ("NVIDIA L40S", ["l40s-48gb"]),
        ("NVIDIA A10G", ["a10g-24gb"]),
        ("Tesla V100-SXM2-16GB", ["v100-16gb"]),
        ("NVIDIA GeForce RTX 4090", ["rtx4090-24gb"]),
        ("NVIDIA A100-SXM4", ["a100-40gb", "a100-80gb"]),  # no memory in the name: either A100
        ("AMD Instinct MI300X", []),
    ],
)
def test_device_names_match_the_catalogue(name, expected):
    from bench.plan.gpus import matching_gpus

    assert [gpu.name for gpu in matching_gpus(name)] == expected


def test_plan_calibrates_the_time_model_from_the_same_records(tmp_path, capsys):
    """--calibrate fits the time model too (bench/plan/timemodel.py, fit_efficiencies); the table's label names the
    records' GPU; records without work counts are a one-line error naming the missing fields, exit 2."""
    path = _calibration_file(tmp_path, "NVIDIA A100-SXM4-80GB")
    argv = ["gpt-tiny", "--methods", "nondp", "--max-batch-limit", "4", "--gpu", "a100-80gb", "--calibrate"]
    assert plan.main([*argv, path, "--format", "json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    time_model = fitted["time_model"]
    assert fitted["time_calibrated"] is True
    assert time_model.startswith("a100-80gb datasheet peaks, calibrated from 2 record(s) of NVIDIA A100-SXM4-80GB: ")
    assert "uncalibrated" not in time_model
    without_work = _calibration_file(tmp_path, "NVIDIA A100-SXM4-80GB", work=False)
    assert plan.main([*argv, without_work]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith(
        "--calibrate: no record to calibrate the time model from: the records lack flops, "
        "bytes_accessed, op_count, op_groups"
    )
