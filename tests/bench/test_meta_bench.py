"""`pytest bench/ --devices meta` end to end, as a user runs it: the matrix, the max-batch mode, the paper preset,
the step-time estimate on ``--gpu`` and the options that make no sense on meta (a note, nothing fails)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest

from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config import options
from bench.config.cli import pytest_bench_command
from bench.config.settings import BenchConfig
from bench.config.sizes import size_text
from bench.dp import resolve_privacy
from bench.plan.gpus import DEFAULT_GPU, get_gpu
from bench.plan.timemodel import time_estimate
from bench.results.record import CaseRecord, MaxBatchRecord, TimeEstimate, from_jsonl_line
from reports.__main__ import main as reports_main
from tests.bench.test_matrix import REPO, _bench, _env


def test_meta_matrix_is_predicted_untimed_and_reports_read_it(tmp_path):
    proc, out_json, out_jsonl = _bench(
        tmp_path,
        "--devices",
        "meta",
        "--workloads",
        "dit-tiny-cond",
        "--methods",
        "nondp,opacus-functorch",
        "--batch-sizes",
        "2",
        "--snapshot",
        "all",
        "--gpu",
        "A100-80GB",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # --rounds (given by _bench) and --snapshot do nothing on meta: one line each on the terminal and in records
    assert "dpmem: --rounds: meta cases are not timed" in proc.stdout
    assert "dpmem: --snapshot: meta cases allocate nothing" in proc.stdout
    records = [from_jsonl_line(line) for line in out_jsonl.read_text().splitlines()]
    assert [(r.method, r.status) for r in records] == [("nondp", "ok"), ("opacus-functorch", "ok")]
    nondp = records[0]
    assert isinstance(nondp, CaseRecord) and nondp.measurement == "predicted" and nondp.device == "meta"
    assert nondp.timing.rounds == 0 and nondp.memory.peak_tensor_bytes > 0 and nondp.memory.snapshot_path is None
    assert any("--snapshot" in n for n in nondp.notes) and any("--rounds" in n for n in nondp.notes)
    for record in records:  # --gpu: each ok meta record's step time on that GPU, estimated (uncalibrated)
        assert record.estimate == time_estimate(record.work, get_gpu("a100-80gb"))
        assert record.estimate.estimated_step_s > 0 and record.estimate.estimate_gpu == "a100-80gb"
        assert record.estimate.estimate_calibrated is False and "uncalibrated" in record.estimate.estimate_source
    untimed = json.loads(out_json.read_text())["dpmem_untimed"]
    assert {e["params"]["method"] for e in untimed} == {"nondp", "opacus-functorch"}
    compare = subprocess.run(
        [sys.executable, "-m", "reports", "compare", str(out_jsonl), str(out_json), "--max-regression", "1%"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert compare.returncode == 0 and "No memory regression" in compare.stdout, compare.stdout + compare.stderr


def test_a_gpu_without_peak_figures_gives_meta_records_the_reason_not_an_estimate(tmp_path):
    proc, _, out_jsonl = _bench(
        tmp_path,
        "--devices",
        "meta",
        "--workloads",
        "gpt-tiny",
        "--methods",
        "nondp",
        "--batch-sizes",
        "2",
        "--gpu",
        "a10g-24gb",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [from_jsonl_line(line) for line in out_jsonl.read_text().splitlines()]
    assert record.status == "ok" and record.work.op_count > 0
    assert record.estimate == TimeEstimate(
        estimate_gpu="a10g-24gb", estimate_reason="no peak figures for this GPU (a10g-24gb): no time estimate"
    )


def test_measured_records_carry_no_estimate_and_meta_ones_default_to_the_planners_gpu():
    config = BenchConfig.from_fields(preset="t", rounds=1, privacy=resolve_privacy(1.0))
    assert config.capacity.estimate_gpu.name == DEFAULT_GPU
    measured = run_case(CaseSpec("gpt-tiny", "nondp", 2, "cpu"), config, None)
    assert measured.status == "ok" and measured.work.op_count > 0 and measured.estimate == TimeEstimate()
    predicted = run_case(CaseSpec("gpt-tiny", "nondp", 2, "meta"), config, None)
    assert predicted.estimate.estimate_gpu == DEFAULT_GPU and predicted.estimate.estimated_step_s > 0


def test_meta_max_batch_answers_every_budget(tmp_path):
    proc, _, out_jsonl = _bench(
        tmp_path,
        "--max-batch",
        "--devices",
        "meta",
        "--workloads",
        "gpt-tiny",
        "--methods",
        "nondp",
        "--memory-budget",
        "6MiB,12MiB,1KiB",
        "--budget-overhead",
        "512KiB+5%",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [from_jsonl_line(line) for line in out_jsonl.read_text().splitlines()]
    assert isinstance(record, MaxBatchRecord) and record.measurement == "predicted"
    assert (record.overhead_fixed_bytes, record.overhead_fraction) == (512 * 1024, 0.05)
    peaks = {p.batch_size: p.peak_tensor_bytes for p in record.probes}
    nothing, *answers = record.budgets
    for answer, budget in zip(answers, (6 * 2**20, 12 * 2**20)):
        assert answer.budget_bytes == budget and answer.first_failing_batch == answer.max_batch + 1
        assert answer.device_bytes == 512 * 1024 + -(-peaks[answer.max_batch] * 105 // 100) <= budget
        assert 512 * 1024 + peaks[answer.first_failing_batch] * 1.05 > budget
        assert answer.first_failing_device_bytes == 512 * 1024 + -(-peaks[answer.first_failing_batch] * 105 // 100)
    assert answers[1].max_batch > answers[0].max_batch
    needs = nothing.first_failing_device_bytes
    assert (nothing.budget_bytes, nothing.max_batch, nothing.first_failing_batch) == (1024, None, 1) and needs > 1024
    # the terminal line: every asked budget in binary units, nothing else (no byte keys, no --predict-memory sizes)
    (line,) = [line for line in proc.stdout.splitlines() if "max batch per budget" in line]
    assert f"nothing fits in 1 KiB: batch 1 needs {size_text(needs)}" in line
    assert f"{answers[0].max_batch} in 6 MiB" in line and f"{answers[1].max_batch} in 12 MiB" in line
    assert "GiB" not in line and str(12 * 2**20) not in line

    # the report and memory_fit.csv: one row per asked budget, its exact answer, no extrapolation
    assert reports_main([str(out_jsonl), "--out", str(tmp_path / "report")]) == 0
    fit = pd.read_csv(tmp_path / "report" / "memory_fit.csv")
    assert fit["memory_bytes"].tolist() == [1024, 6 * 2**20, 12 * 2**20]
    assert fit["measured max batch"].tolist()[1:] == [a.max_batch for a in answers]
    assert pd.isna(fit["measured max batch"][0]) and fit["first failing batch"].tolist()[0] == 1
    assert fit["predicted max batch"].isna().all()
    for name in ("report.md", "memory_fit.md"):
        text = (tmp_path / "report" / name).read_text()
        assert f"nothing fits in 1 KiB: batch 1 needs {size_text(needs)}" in text
        table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        assert "extrapolated" not in table and "GiB" not in table  # no budget that was not asked for


def test_paper_preset_runs_every_method_on_meta_with_microbatch_capped(tmp_path):
    proc = subprocess.run(
        pytest_bench_command("--preset", "paper", "--collect-only", f"--results={tmp_path / 'x.jsonl'}"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if line.startswith("bench/test_dp_step.py::")]
    full = [i for i in ids if i.endswith("-meta]")]
    lora = [i for i in ids if i.endswith("-meta-lora-r8]")]  # DP-LoRA on DiT-XL/2 and GPT-2 large, tied and untied
    assert full and len(full) + len(lora) == len(ids)
    assert len([i for i in full if "-microbatch-" in i]) == 17 * 3  # batch 1, 4, 16
    assert len(full) == 17 * (8 * 5 + 3) and len(lora) == 3 * (8 * 5 + 3)
    assert {i.split("[")[1].split("-nondp-")[0] for i in lora if "-nondp-" in i} == {
        "dit-xl-2-cond",
        "gpt2-large",
        "gpt2-large-untied",
    }
    assert any("dit-xl-2-cond-512-bk-bs256-meta" in i for i in ids) and any("gpt2-xl-untied-" in i for i in ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory-budget", "0"], "--memory-budget"),  # a type= parser (argparse)
        (["--calibrate-gpu", "h100"], "--calibrate-gpu needs --calibrate"),  # the config's check
        (["--gpu", "h100-8"], "argument --gpu: unknown GPU 'h100-8' (did you mean h100-80gb"),  # the catalogue's
    ],
)
def test_bad_meta_options_are_one_line_usage_errors(tmp_path, args, message):
    proc, _, _ = _bench(tmp_path, "--devices", "meta", *args, "--collect-only")
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    # One line, without the usage line, ini file and rootdir pytest prints around its own argparse errors.
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ") and message in errors[0], proc.stderr
    assert not any(word in proc.stderr for word in ("usage:", "rootdir:", "inifile:")), proc.stderr


@pytest.mark.parametrize(
    "parser, text, message",
    [
        (options.attention_choice, "fast", "auto, math, efficient, flash, cudnn"),
        (options.optimizer_impl, "fused", "auto, foreach, for-loop"),
        (options.overhead_model, "10%", "FIXED+PERCENT"),
        (options.byte_sizes, "24GiB,0", "size must be >= 1 byte"),
        (options.estimate_gpu, "b200", "unknown GPU 'b200'.*known: v100-16gb, v100-32gb"),
    ],
)
def test_meta_option_parsers_reject_bad_values_in_one_line(parser, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("+", "\\+")) as info:
        parser(text)
    assert "\n" not in str(info.value)


def test_meta_option_parsers_accept_good_values():
    assert options.attention_choice(" flash ") == "flash"
    assert options.optimizer_impl("for-loop") == "for-loop"
    assert options.overhead_model("2GiB+7.5%").fraction == 0.075
    assert options.byte_sizes("24GiB,40GiB") == (24 * 2**30, 40 * 2**30)
    assert options.estimate_gpu(" H200-141GB ") is get_gpu("h200-141gb")
