"""The multi-GPU launcher (`python -m bench.multi_gpu`): --gpus positions mapped through the parent's
CUDA_VISIBLE_DEVICES, one runner label per child, one-line usage errors, and one real run on CPU (the child
device overridden)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import multi_gpu
from bench.multi_gpu import Child, LaunchError, plan_children, split_runner_label, visible_entries
from bench.results.record import from_jsonl_line

REPO = Path(__file__).resolve().parents[2]


def test_gpus_are_positions_in_the_parents_visible_list():
    # --gpus 0 under CUDA_VISIBLE_DEVICES=2,3 is physical GPU 2, as cuda:0 is in the parent.
    assert plan_children("0", visible_entries("2,3"), None) == [Child(0, "2", "gpu0")]
    assert [c.visible_entry for c in plan_children("1,0", visible_entries(" 2, 3 "), None)] == ["3", "2"]
    # UUIDs and MIG ids are handed on as they are.
    visible = visible_entries("GPU-5e2a-77,MIG-9f1c-01")
    assert plan_children(None, visible, None) == [Child(0, "GPU-5e2a-77", "gpu0"), Child(1, "MIG-9f1c-01", "gpu1")]
    # Without CUDA_VISIBLE_DEVICES the positions are torch's device indices.
    assert visible_entries(None, device_count=3) == ["0", "1", "2"]
    assert plan_children("2", visible_entries(None, device_count=3), None) == [Child(2, "2", "gpu2")]


def test_every_child_gets_its_own_label_built_on_the_parents():
    labels = [c.runner_label for c in plan_children("0,1", ["4", "5"], "h100-box")]
    assert labels == ["h100-box-gpu0", "h100-box-gpu1"]
    assert split_runner_label(["-k", "bk", "--runner-label", "ci", "--rounds", "1"]) == (
        "ci",
        ["-k", "bk", "--rounds", "1"],
    )
    assert split_runner_label(["--runner-label=ci"]) == ("ci", [])
    assert split_runner_label(["-k", "bk"]) == (None, ["-k", "bk"])


@pytest.mark.parametrize(
    "gpus, visible, message",
    [
        ("2", ["2", "3"], "--gpus '2' is not a visible GPU position; valid positions: 0..1 (visible GPUs: 2,3)"),
        ("GPU-5e2a", ["2", "3"], "--gpus 'GPU-5e2a' is not a visible GPU position"),
        ("0,0", ["2", "3"], "--gpus '0' given more than once"),
        (",", ["2"], "--gpus is empty"),
        (None, [], "no GPU visible"),
    ],
)
def test_bad_gpus_are_launch_errors(gpus, visible, message):
    with pytest.raises(LaunchError) as info:
        plan_children(gpus, visible, None)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--gpus", "2"], "2,3", "multi_gpu: --gpus '2' is not a visible GPU position"),
        (["--gpus", "0"], "", "multi_gpu: no GPU visible"),
        (["--poll", "0"], "0", "multi_gpu: --poll must be > 0"),
        (["--", "--runner-label"], "0", "multi_gpu: --runner-label needs a value"),
    ],
)
def test_main_usage_errors_are_one_line_exit_2_and_start_nothing(monkeypatch, capsys, tmp_path, argv, env, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    out = tmp_path / "multi"
    assert multi_gpu.main(["--out", str(out), *argv]) == multi_gpu.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_multi_gpu_launcher_runs_one_process_per_gpu(tmp_path):
    out = tmp_path / "multi"
    cmd = [
        sys.executable,
        "-m",
        "bench.multi_gpu",
        "--gpus",
        "0,1",
        "--child-device",
        "cpu",
        "--out",
        str(out),
        "--poll",
        "1",
        "--",
        "--workloads",
        "gpt-tiny",
        "--methods",
        "nondp",
        "--batch-sizes",
        "2",
        "--rounds",
        "1",
        "--runner-label",
        "ci",
        "--precision",
        "fp32",
        "--checkpointing",
        "none",
    ]
    # The parent sees two GPUs by UUID and ordinal; a parent label in the environment is overridden by the option.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "GPU-5e2a-77,3",
        "DPMEM_RUNNER_LABEL": "not-this-one",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for index, visible in (("0", "GPU-5e2a-77"), ("1", "3")):
        data = json.loads((out / f"gpu{index}.json").read_text())
        assert data["machine_info"]["dpmem"]["cuda_visible_devices"] == visible
        assert data["machine_info"]["dpmem"]["runner_label"] == f"ci-gpu{index}"
        assert [b["param"] for b in data["benchmarks"]] == ["gpt-tiny-nondp-bs2-cpu"]
        (record,) = [from_jsonl_line(line) for line in (out / f"gpu{index}.jsonl").read_text().splitlines()]
        assert record.runner_label == f"ci-gpu{index}" and record.status == "ok"
    assert "python -m reports" in proc.stdout
