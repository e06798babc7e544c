"""`pytest bench/ --precision ... --checkpointing ...`: the training modes as matrix dimensions, end to end.

One bench run in a subprocess, as a user runs it: case ids keep today's form for fp32 without checkpointing and
append the mode's parts otherwise; pytest-benchmark's ``params`` always carry both keys; every record says its
mode; a method a mode defeats is ``unsupported`` with the library's error; the report's overhead table divides
by the nondp of the same mode.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import models
from bench.config.cli import pytest_bench_command
from bench.results.record import CaseRecord, from_jsonl_line

REPO = Path(__file__).resolve().parents[2]
METHODS = ("nondp", "bk", "opacus-ew", "torch-func")
MODES = [(p, c) for p in ("fp32", "bf16") for c in ("none", "blocks")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("modes")
    cmd = pytest_bench_command("--rounds", "1")
    cmd += ["--workloads", "dit-tiny-cond", "--methods", ",".join(METHODS), "--batch-sizes", "4"]
    cmd += ["--precision", "fp32,bf16", "--checkpointing", "none,blocks"]
    cmd += [f"--benchmark-json={out / 'run.json'}", f"--results={out / 'run.jsonl'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "run.json").read_text())
    entries = {e["param"]: e for e in [*data["benchmarks"], *data["dpmem_untimed"]]}
    records = [from_jsonl_line(line) for line in (out / "run.jsonl").read_text().splitlines() if line.strip()]
    return entries, records, out


def test_ids_params_and_records_carry_the_mode(run):
    entries, records, _ = run
    suffix = {
        ("fp32", "none"): "",
        ("fp32", "blocks"): "-ckpt",
        ("bf16", "none"): "-bf16",
        ("bf16", "blocks"): "-bf16-ckpt",
    }
    assert set(entries) == {f"dit-tiny-cond-{m}-bs4-cpu{suffix[mode]}" for m in METHODS for mode in MODES}
    for case_id, entry in entries.items():
        params = entry["params"]
        keys = {"workload", "method", "batch_size", "device", "precision", "checkpointing", "trainable"}
        assert set(params) == keys and params["trainable"] == "full"  # a run naming its modes trains full
        record = CaseRecord.from_dict(entry["extra_info"])
        assert (record.precision, record.checkpointing) == (params["precision"], params["checkpointing"])
        assert case_id == f"dit-tiny-cond-{record.method}-bs4-cpu{suffix[record.precision, record.checkpointing]}"
        assert record.dtype == ("bfloat16" if record.precision == "bf16" else "float32")
    assert len(records) == len(entries)


def test_what_a_mode_defeats_is_unsupported_with_the_libraries_error(run):
    entries, _, _ = run
    status = {k: (e["extra_info"]["status"], e["extra_info"]["reason"]) for k, e in entries.items()}
    for suffix in ("-ckpt", "-bf16-ckpt"):
        assert status[f"dit-tiny-cond-torch-func-bs4-cpu{suffix}"][0] == "unsupported"
        assert "saved tensor hooks" in status[f"dit-tiny-cond-torch-func-bs4-cpu{suffix}"][1]
        assert status[f"dit-tiny-cond-opacus-ew-bs4-cpu{suffix}"][0] == "unsupported"
        assert "CheckpointError" in status[f"dit-tiny-cond-opacus-ew-bs4-cpu{suffix}"][1]
    ok = [k for k, (s, _) in status.items() if s == "ok"]
    assert len(ok) == len(entries) - 4  # everything else ran


def test_checkpointing_and_bf16_change_nondp_memory_as_they_should(run):
    entries, _, _ = run

    def at_peak(suffix: str, category: str) -> int:
        return entries[f"dit-tiny-cond-nondp-bs4-cpu{suffix}"]["extra_info"]["breakdown"][category]

    # bf16 weights: exactly half the bytes. AdamW keeps two moments per trainable element in the weights' dtype
    # and one step counter per trainable tensor, an fp32 scalar in every precision.
    trainable = [p for p in models.get_workload("dit-tiny-cond").build_model("meta").parameters() if p.requires_grad]
    elements, counters = sum(p.numel() for p in trainable), len(trainable)
    assert at_peak("-bf16", "parameters") * 2 == at_peak("", "parameters")
    assert at_peak("", "optimizer_state") == 2 * 4 * elements + 4 * counters
    assert at_peak("-bf16", "optimizer_state") == 2 * 2 * elements + 4 * counters

    def pass_peak(suffix: str) -> int:
        """Peak live bytes over the forward and backward above the step's start (at batch 4 the step's own peak
        is the optimizer's, weights-bound; the timeline keeps each bucket's maximum, so no peak is lost)."""
        record = CaseRecord.from_dict(entries[f"dit-tiny-cond-nondp-bs4-cpu{suffix}"]["extra_info"])
        backward_end = next(p.end_s for p in record.memory.phases if p.name == "backward")
        timeline = record.memory.timeline
        live = [b for t, b in zip(timeline.t_s, timeline.tensor_bytes) if t < backward_end]
        return max(live) - record.memory.baseline_tensor_bytes

    # checkpointing keeps only the blocks' inputs from the forward; bf16 activations take half the bytes
    for precision in ("", "-bf16"):
        assert pass_peak(f"{precision}-ckpt") < pass_peak(precision)
    assert pass_peak("-bf16") < pass_peak("")


def test_the_overhead_table_divides_by_nondp_of_the_same_mode(run):
    from reports.load import load_results
    from reports.tables import overhead_table

    _, _, out = run
    table = overhead_table(load_results([out / "run.json"]).cases)
    bk = table[table["method"] == "bk"]
    assert sorted(zip(bk["precision"], bk["checkpointing"])) == sorted(MODES)
    nondp = {
        (e["extra_info"]["precision"], e["extra_info"]["checkpointing"]): e["extra_info"]["peak_tensor_bytes"]
        for e in run[0].values()
        if e["extra_info"]["method"] == "nondp"
    }
    for _, row in bk.iterrows():
        # the table shows MiB to two decimals
        assert row["nondp peak tensor MiB"] == round(nondp[row["precision"], row["checkpointing"]] / 2**20, 2)


def test_max_batch_searches_once_per_mode(tmp_path):
    cmd = pytest_bench_command("--collect-only", "--max-batch")
    cmd += ["--workloads", "gpt-tiny", "--methods", "nondp", "--precision", "fp32,bf16", "--checkpointing", "none"]
    cmd += [f"--results={tmp_path / 'r.jsonl'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "test_max_batch[" in line]
    assert ids == ["gpt-tiny-nondp-cpu", "gpt-tiny-nondp-cpu-bf16"]


def test_the_report_draws_one_block_per_training_mode(run):
    from reports.load import load_results
    from reports.summary import overview

    _, _, out = run
    matrices = overview(load_results([out / "run.json"]))
    # fp32 without checkpointing first, then the others in bench.dp's order; every ratio within one mode
    assert [(m.block.precision, m.block.checkpointing) for m in matrices] == [
        ("fp32", "none"),
        ("fp32", "blocks"),
        ("bf16", "none"),
        ("bf16", "blocks"),
    ]
    assert "·" in matrices[0].block.title and "checkpointed" not in matrices[0].block.title
    assert "bf16 + blocks checkpointed" in matrices[3].block.title
    for matrix in matrices:
        (row,) = matrix.rows
        assert row.workload == "dit-tiny-cond" and set(row.cells) == {"bk", "opacus-ew", "torch-func"}
        blocks = matrix.block.checkpointing == "blocks"
        assert row.cells["torch-func"].status == ("unsupported" if blocks else "ok")


def test_the_report_subtitle_counts_the_training_modes(run):
    from reports.__main__ import _subtitle
    from reports.load import load_results

    _, _, out = run
    subtitle = _subtitle(load_results([out / "run.json"]))
    assert "1 workloads × 4 methods × 1 batch sizes × 4 training modes on" in subtitle, subtitle
