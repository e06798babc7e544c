"""`python -m reports frontier PLAN.json --out FIG.png`: the memory–time frontier of a capacity plan."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reports.frontier import draw_frontier, frontier_methods, read_plan

from .fakes import ROOT, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIME_MODEL = "h100-80gb datasheet peaks × default efficiencies (estimated, uncalibrated); no fusion"


def _row(method, max_batch=None, samples_per_s=None, *, status="ok", reason="", lower_bound=False):
    step = max_batch / samples_per_s if max_batch and samples_per_s else None
    return {
        "method": method,
        "status": status,
        "reason": reason,
        "max_batch": max_batch,
        "samples_per_s": samples_per_s,
        "step_seconds": step,
        "max_batch_is_lower_bound": lower_bound,
    }


def _plan(rows, time_model=TIME_MODEL, calibrated=False) -> dict:
    return {
        "workload": "dit-xl-2-cond",
        "memory_bytes": 80 * 2**30,
        "gpu": {"name": "h100-80gb", "product": "NVIDIA H100", "memory_bytes": 80 * 2**30, "sm": [9, 0]},
        "measurement": "predicted",
        "training_mode": "amp-bf16",
        "precision": "amp-bf16",
        "time_model": time_model,
        "time_calibrated": calibrated,
        "rows": rows,
    }


ROWS = [
    _row("nondp", 167, 427.0),
    _row("opacus-ghost", 142, 217.5),
    _row("bk", 143, 105.9),
    _row("bk-tiled", 143, 105.9),
    _row("opacus-hooks", 45, 106.9),
    _row("torch-func", 19, 95.8),
    _row("microbatch", 8, 29.1, lower_bound=True),
    _row("opacus-ew", status="unsupported", reason="opacus-ew: RuntimeError: expected scalar type BFloat16\nmore"),
]


def _write(tmp_path, data, name="plan.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_points_frontier_and_unplotted_methods(tmp_path):
    plan = read_plan(_write(tmp_path, _plan(ROWS)))
    assert [p.method for p in plan.points] == [r["method"] for r in ROWS[:-1]]
    micro = next(p for p in plan.points if p.method == "microbatch")
    assert micro.lower_bound and micro.max_batch == 8 and micro.step_seconds == pytest.approx(8 / 29.1)
    # ghost: the most samples/s of the DP methods; bk and bk-tiled (the same point): one sample more per batch;
    # hooks beats bk on samples/s but ghost beats it on both axes, as it beats torch-func and microbatch
    assert frontier_methods(plan.points) == ["opacus-ghost", "bk", "bk-tiled"]
    assert plan.unplotted == (("opacus-ew", "unsupported: RuntimeError: expected scalar type BFloat16"),)
    assert plan.title == "dit-xl-2-cond on h100-80gb, amp-bf16: max batch vs samples/s (estimated, uncalibrated)"
    out = draw_frontier(plan, tmp_path / "figs" / "frontier.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_nondp_is_the_reference_never_on_the_frontier(tmp_path):
    plan = read_plan(_write(tmp_path, _plan([_row("nondp", 100, 500.0), _row("bk", 90, 200.0)])))
    assert frontier_methods(plan.points) == ["bk"]


def test_a_calibrated_time_model_is_named_so(tmp_path):
    plan = read_plan(_write(tmp_path, _plan(ROWS[:3], "h100-80gb …, calibrated from 4 record(s)", calibrated=True)))
    assert plan.calibrated and plan.title.endswith("(estimated, calibrated)")
    older = {k: v for k, v in _plan(ROWS[:3]).items() if k != "time_calibrated"}  # a plan before the time fit
    assert not read_plan(_write(tmp_path, older)).calibrated


def test_cli_writes_the_figure(tmp_path):
    out = tmp_path / "frontier.png"
    proc = run_cli("frontier", _write(tmp_path, _plan(ROWS)), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "frontier opacus-ghost, bk, bk-tiled" in proc.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ([1, 2], "not a plan JSON"),
        ({"workload": "w", "rows": []}, "not a plan JSON"),
        (_plan([{"status": "ok"}]), "rows[0]: not a plan row"),
        (_plan([_row("nondp", 8), _row("bk", status="unsupported", reason="no")], "no peak figures"), "no timed row"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, content, message):
    path = _write(tmp_path, content)
    proc = run_cli("frontier", path, "--out", tmp_path / "f.png")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "f.png").exists()


def test_a_missing_plan_file_is_exit_2(tmp_path):
    proc = run_cli("frontier", tmp_path / "none.json", "--out", tmp_path / "f.png")
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_a_real_tiny_plan(tmp_path):
    """`python -m bench.plan dit-tiny-cond --format json` (three methods, a few seconds) read as planned."""
    plan_run = subprocess.run(
        [sys.executable, "-m", "bench.plan", "dit-tiny-cond", "--methods", "nondp,bk,microbatch", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan_run.returncode == 0, plan_run.stderr[-2000:]
    data = json.loads(plan_run.stdout)
    plan = read_plan(_write(tmp_path, plan_run.stdout))
    assert plan.gpu == data["gpu"]["name"] and plan.precision == data["precision"] and not plan.calibrated
    by_method = {p.method: p for p in plan.points}
    for row in data["rows"]:
        point = by_method[row["method"]]
        assert (point.max_batch, point.samples_per_s) == (row["max_batch"], row["samples_per_s"])
        assert point.lower_bound == row["max_batch_is_lower_bound"]
    assert by_method["microbatch"].lower_bound  # the per-sample loop's search stops at its cap
    out = tmp_path / "tiny.png"
    assert run_cli("frontier", tmp_path / "plan.json", "--out", out).returncode == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
