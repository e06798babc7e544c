"""The capacity planner (python -m bench.plan), the GPU catalogue and the overhead model behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import plan
from bench.case import CaseSpec, run_case
from bench.config import BenchConfig
from bench.dp import resolve_privacy
from bench.gpus import GPUS, get_gpu
from bench.overhead import DEFAULT_OVERHEAD, CalibrationError, OverheadModel, calibrate, parse_overhead
from bench.record import CaseRecord, StepMemory

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


def _fits(workload: str, method: str, batch: int, budget: int, overhead: OverheadModel) -> bool:
    config = BenchConfig("t", (), (), (), (), 1, resolve_privacy(1.0), overhead=overhead)
    record = run_case(CaseSpec(workload, method, batch, "meta"), config, None)
    return overhead.fits(record.memory.peak_tensor_bytes, budget)


def test_plan_finds_the_exact_max_batch_and_prints_the_table(capsys):
    argv = ["dit-tiny-cond", "--memory", "24MiB", "--budget-overhead", "1MiB+5%", "--methods", "nondp,bk,opacus-ghost"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert "5.0% of tensor bytes (--budget-overhead 1MiB+5%)" in out
    overhead = parse_overhead("1MiB+5%")
    for method in ("nondp", "bk"):
        best = int(rows[method][2])
        assert _fits("dit-tiny-cond", method, best, 24 * MIB, overhead)
        assert not _fits("dit-tiny-cond", method, best + 1, 24 * MIB, overhead)
    assert rows["nondp"][3].strip() == "1.00" and rows["nondp"][8].strip() == "1.000"
    assert rows["opacus-ghost"][2].strip() == "unsupported" and "unique_dim" in rows["opacus-ghost"][9]


def test_plan_in_bf16_with_checkpointed_blocks(capsys):
    """The planner's cases run in the asked mode: bf16 weights, every block recomputed under the routed
    attention kernel (an unrouted recompute saved other tensors and the checkpoint refused it)."""
    argv = ["dit-tiny-cond", "--memory", "24MiB", "--budget-overhead", "1MiB+5%", "--methods", "nondp"]
    assert plan.main([*argv, "--precision", "bf16", "--checkpointing", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "bf16+blocks; attention auto" in out
    best = int(next(line.split("|") for line in out.splitlines() if line.startswith("| nondp |"))[2])
    overhead = parse_overhead("1MiB+5%")
    config = BenchConfig("t", (), (), (), (), 1, resolve_privacy(1.0), overhead=overhead)
    small, fp32 = (
        run_case(CaseSpec("dit-tiny-cond", "nondp", b, "meta", precision=p, checkpointing=c), config, None)
        for b, p, c in ((best + 1, "bf16", "blocks"), (best + 1, "fp32", "none"))
    )
    assert small.status == fp32.status == "ok", (small.reason, fp32.reason)
    assert not overhead.fits(small.memory.peak_tensor_bytes, 24 * MIB)  # the next batch does not fit: exact
    assert small.memory.peak_tensor_bytes < 0.75 * fp32.memory.peak_tensor_bytes  # bf16 + blocks hold much less


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
        (["dit-tiny-cond", "--precision", "amp-bf16"], "autocast does not run on the meta device"),
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
    from bench.record import to_jsonl_line

    gpu = "NVIDIA A100-SXM4-80GB"
    records = [_cuda_record(gpu, t, MIB + int(1.2 * t), 600 * MIB) for t in (2 * GIB, 6 * GIB)]
    path = tmp_path / "a100.jsonl"
    path.write_text("".join(to_jsonl_line(r) + "\n" for r in records))
    argv = ["gpt-tiny", "--memory", "700MiB", "--methods", "nondp", "--calibrate", str(path)]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    assert "0.59 GiB + 20.0% of tensor bytes (calibrated on 2 NVIDIA A100-SXM4-80GB record(s)" in out
    best = int(next(line for line in out.splitlines() if line.startswith("| nondp |")).split("|")[2])
    model = calibrate(records)
    assert _fits("gpt-tiny", "nondp", best, 700 * MIB, model) and not _fits(
        "gpt-tiny", "nondp", best + 1, 700 * MIB, model
    )
