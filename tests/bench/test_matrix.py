"""The benchmark suite end to end: `pytest bench/ ...` run in a subprocess, as a user runs it.

Covers the record in every case, OOM as a result (and later cases measuring as in a clean run),
unsupported combinations, a run killed midway keeping its finished cases, usage errors and the max-batch mode.
The multi-GPU launcher: tests/bench/test_multi_gpu.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.case.spec import CaseSpec
from bench.config.cli import pytest_bench_command
from bench.results.record import CaseRecord, MaxBatchRecord, RecordError, from_jsonl_line

REPO = Path(__file__).resolve().parents[2]
# Keys users' scripts and CI gates read (issue: "keep these key names").
RECORD_KEYS = {
    "status",
    "reason",
    "peak_tensor_bytes",
    "breakdown",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_used_bytes",
    "nvml_baseline_bytes",
    "nvml_process_peak_bytes",
    "peak_rss_bytes",
    "phases",
    "timeline",
    "noise_multiplier",
    "epsilon",
    "delta",
    "accountant",
    "max_grad_norm",
    "params_total",
    "params_trainable",
    "tokens_per_sample",
    "optimizer",
}


# The default preset (cpu-smoke) also runs amp-bf16 and checkpointed blocks; these tests are about the rest.
FP32_ONLY = ("--precision", "fp32", "--checkpointing", "none")


def _env() -> dict:
    # One intra-op thread: results do not depend on it, and it keeps a busy 2-core machine from thrashing.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _bench(
    tmp_path: Path, *args: str, name: str = "run", timeout: int = 240
) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out_json, out_jsonl = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
    cmd = pytest_bench_command(
        "--rounds", "1", f"--benchmark-json={out_json}", f"--results={out_jsonl}", *FP32_ONLY, *args
    )
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, out_json, out_jsonl


def _case_id(record: CaseRecord) -> str:
    return CaseSpec(record.workload, record.method, record.batch_size, record.device).case_id


def _records(path: Path) -> list:
    return [from_jsonl_line(line) for line in path.read_text().splitlines() if line.strip()]


def test_matrix_writes_a_record_for_every_case_in_both_formats(tmp_path):
    proc, out_json, out_jsonl = _bench(
        tmp_path, "--workloads", "gpt-tiny,dit-tiny-cond", "--methods", "nondp,bk,opacus-ghost", "--batch-sizes", "2"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    entries = {b["param"]: b for b in [*data["benchmarks"], *data["dpmem_untimed"]]}
    expected = {f"{w}-{m}-bs2-cpu" for w in ("gpt-tiny", "dit-tiny-cond") for m in ("nondp", "bk", "opacus-ghost")}
    assert set(entries) == expected
    for case_id, entry in entries.items():
        keys = {"workload", "method", "batch_size", "device", "precision", "checkpointing", "trainable"}
        assert set(entry["params"]) == keys
        assert (entry["params"]["precision"], entry["params"]["checkpointing"]) == ("fp32", "none")
        assert set(entry["extra_info"]) >= RECORD_KEYS
        record = CaseRecord.from_dict(entry["extra_info"])
        assert _case_id(record) == case_id
    # ghost clipping refuses GPT's tied embedding: a result with Opacus' own message, not a failure
    ghost = CaseRecord.from_dict(entries["gpt-tiny-opacus-ghost-bs2-cpu"]["extra_info"])
    assert ghost.status == "unsupported" and "tying" in ghost.reason.lower()
    assert "stats" not in entries["gpt-tiny-opacus-ghost-bs2-cpu"]  # untimed: kept out of pytest-benchmark's list
    ok = CaseRecord.from_dict(entries["dit-tiny-cond-bk-bs2-cpu"]["extra_info"])
    assert ok.status == "ok" and ok.memory.peak_tensor_bytes > 0 and ok.timing.time_median_s > 0
    assert sum(ok.memory.breakdown.values()) == ok.memory.peak_tensor_bytes
    assert [p.name for p in ok.memory.phases] == ["forward", "backward", "clip", "noise", "optimizer"]
    assert ok.epsilon > 0 and ok.noise_multiplier == 1.0 and ok.accountant == "prv"
    assert data["machine_info"]["dpmem"]["packages"]["torch"]
    # the crash-safe file holds the same records
    lines = _records(out_jsonl)
    assert {_case_id(r) for r in lines} == expected
    assert "dpmem: 6 result record(s) appended" in proc.stdout


def test_oom_is_a_result_and_later_cases_measure_as_in_a_clean_run(tmp_path):
    common = ["--workloads", "gpt-tiny", "--memory-cap", "40MiB"]
    proc, _, jsonl = _bench(tmp_path, *common, "--methods", "nondp,bk", "--batch-sizes", "2,2048,4096", name="mixed")
    assert proc.returncode == 0, proc.stdout[-3000:]
    by_id = {_case_id(r): r for r in _records(jsonl)}
    big = by_id["gpt-tiny-nondp-bs2048-cpu"]
    assert big.status == "oom" and "2048" in big.reason and "cap" in big.reason
    assert by_id["gpt-tiny-nondp-bs4096-cpu"].status == "oom"
    assert "not run" in by_id["gpt-tiny-nondp-bs4096-cpu"].reason
    # bk at batch 2 ran after nondp's OOM; a clean process running only it measures the same, exactly.
    proc, _, clean_jsonl = _bench(tmp_path, *common, "--methods", "bk", "--batch-sizes", "2", name="clean")
    assert proc.returncode == 0, proc.stdout[-3000:]
    (clean,) = _records(clean_jsonl)
    after = by_id["gpt-tiny-bk-bs2-cpu"]
    assert after.status == clean.status == "ok"
    assert after.memory.peak_tensor_bytes == clean.memory.peak_tensor_bytes
    assert after.memory.breakdown == clean.memory.breakdown


def test_killed_run_keeps_every_finished_case(tmp_path):
    jsonl = tmp_path / "killed.jsonl"
    cmd = pytest_bench_command(
        "--rounds",
        "3",
        "--workloads",
        "gpt-tiny,dit-tiny-cond,dit-tiny-uncond",
        "--batch-sizes",
        "2,4",
        *FP32_ONLY,
        f"--benchmark-json={tmp_path / 'killed.json'}",
        f"--results={jsonl}",
    )
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "killed.json").exists()  # pytest-benchmark never got to write
    lines = jsonl.read_text().splitlines()
    assert len(lines) >= 3
    records = []
    for line in lines:
        try:
            records.append(from_jsonl_line(line))
        except RecordError:
            pytest.fail(f"a finished case's line does not parse: {line[:80]}")
    assert all(isinstance(r, CaseRecord) and r.status in ("ok", "unsupported") for r in records)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workloads", "dit-tiny-cnd"], "dit-tiny-cond"),
        (["--methods", "opacus-hook"], "valid:"),
        (["--batch-sizes", "0"], "--batch-sizes"),
        (["--batch-sizes", "x"], "argument --batch-sizes: 'x' is not an integer"),
        (["--memory-cap", "80"], "argument --memory-cap: '80' has no unit"),
        (["--seed", "9" * 23], "argument --seed: must be in [0, 2**64 - 2]"),
        (["--workloads", "gpt-tiny:seed=" + "9" * 23], "seed must be an integer in [0, 2**64 - 1]"),
        (["--devices", "cuda:7"], "visible devices: cpu"),
        (["--workload-module", "no_such_module_here"], "no_such_module_here"),
        (["--sample-interval", "0"], "--sample-interval"),
        (["--noise-multiplier", "-1"], "--noise-multiplier"),
        (["--preset", "huge"], "cpu-smoke"),
        (["--batch-sizes", "4,4"], "4 given more than once"),
        (["--rounds", "0"], "--rounds: must be >= 1"),
        (["--max-grad-norm", "inf"], "clips nothing"),
        (["--results", "/"], "--results /: is a directory"),
        (["--devices", "cpu", "--world-sizes", "100000"], "this node has"),  # 100000 torch processes: refused
        (["--nnodes", "2", "--world-sizes", "2", "--rdzv-endpoint", "notahost.invalid:29500"], "does not resolve"),
        (["--workloads", "gpt-tiny", "--snapshot", "gpt-tiny-nondp-bs3-cpu"], "did you mean gpt-tiny-nondp-bs4-cpu"),
    ],
)
def test_bad_options_are_one_line_usage_errors(tmp_path, args, message):
    proc, _, _ = _bench(tmp_path, *args, "--collect-only")
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]
    # One line, without the usage line, ini file and rootdir pytest prints around its own argparse errors.
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: ") and message in errors[0], proc.stderr
    assert not any(word in proc.stderr for word in ("usage:", "rootdir:", "inifile:")), proc.stderr


def test_max_batch_mode_bisects_and_fits(tmp_path):
    proc, _, jsonl = _bench(
        tmp_path,
        "--max-batch",
        "--workloads",
        "gpt-tiny",
        "--methods",
        "nondp",
        "--memory-cap",
        "24MiB",
        "--predict-memory",
        "48MiB",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    (result,) = _records(jsonl)
    assert isinstance(result, MaxBatchRecord) and result.status == "ok"
    assert result.max_batch_measured >= 2
    assert result.first_failing_batch == result.max_batch_measured + 1  # bisection closed the gap
    probed = [p.batch_size for p in result.probes]
    assert probed[:2] == [1, 2]  # doubling first
    assert result.fit_per_sample_bytes > 0 and result.memory_limit_bytes == 24 * 2**20
    predicted_cap = result.predicted_max_batch[str(24 * 2**20)]
    assert abs(predicted_cap - result.max_batch_measured) <= max(2, result.max_batch_measured // 10)
    assert result.predicted_max_batch[str(48 * 2**20)] > predicted_cap
    assert "[max-batch gpt-tiny nondp cpu] batch 1: ok" in proc.stdout
