"""Real (tiny) bench runs read by the reports and by pytest-benchmark's own tools.

Two ``pytest bench/`` subprocesses, shared by every test of this module:

* run A — gpt-tiny × (nondp, bk, opacus-hooks, opacus-ghost) × batch 2, 4, 1024 under ``--memory-cap 40MiB``:
  timed cases, ``unsupported`` ones (ghost clipping refuses the tied GPT embedding) and OOMs (batch 1024), with
  ``--benchmark-autosave``. Its first case is nondp at batch 2: run before any other case of the process;
* run B — nondp at batch 1024 (no cap), *then* nondp at batch 2 in the same process, with
  ``--benchmark-compare`` against A's saved run and ``--benchmark-histogram`` (pygal: the [histogram] extra).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from reports.__main__ import main
from reports.load import load_results
from tests.reports.fakes import ROOT

BIG = 1024  # gpt-tiny nondp at batch 1024: ~160 MiB of live tensors, over the 40 MiB cap of run A


@dataclass
class RealRuns:
    a_json: Path
    a_jsonl: Path
    b_json: Path
    b_output: str  # run B's stdout (pytest-benchmark's comparison table)
    storage: Path
    histogram: Path


def _env() -> dict:
    # One intra-op thread: results do not depend on it, and it keeps a busy 2-core machine from thrashing.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _pytest_bench(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", *args, "--preset", "cpu-smoke", "-p", "no:cacheprovider", "-q"]
    command += ["--precision", "fp32", "--checkpointing", "none"]  # cpu-smoke also has amp-bf16 and checkpointing
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> RealRuns:
    out = tmp_path_factory.mktemp("bench")
    storage = out / "storage"
    _pytest_bench(
        [
            "bench/",
            "--workloads",
            "gpt-tiny",
            "--methods",
            "nondp,bk,opacus-hooks,opacus-ghost",
            "--batch-sizes",
            f"2,4,{BIG}",
            "--memory-cap",
            "40MiB",
            f"--benchmark-json={out / 'a.json'}",
            f"--results={out / 'a.jsonl'}",
            "--benchmark-autosave",
            f"--benchmark-storage=file://{storage}",
        ]
    )
    histogram = out / "hist" / "b"
    proc = _pytest_bench(
        [
            # node ids in this order: pytest runs them as given, the larger case first
            f"bench/test_dp_step.py::test_dp_step[gpt-tiny-nondp-bs{BIG}-cpu]",
            "bench/test_dp_step.py::test_dp_step[gpt-tiny-nondp-bs2-cpu]",
            "--workloads",
            "gpt-tiny",
            "--methods",
            "nondp",
            "--batch-sizes",
            f"2,{BIG}",
            f"--benchmark-json={out / 'b.json'}",
            f"--results={out / 'b.jsonl'}",
            f"--benchmark-storage=file://{storage}",
            "--benchmark-compare",
            f"--benchmark-histogram={histogram}",
        ]
    )
    return RealRuns(out / "a.json", out / "a.jsonl", out / "b.json", proc.stdout, storage, histogram)


def _entries(path: Path) -> dict[tuple[str, int], dict]:
    data = json.loads(path.read_text())
    return {(b["extra_info"]["method"], b["extra_info"]["batch_size"]): b for b in data["benchmarks"]}


def test_real_bench_renders_and_ratios_match_raw_json(tmp_path, real_runs):
    out = tmp_path / "report"
    # batch 4 chosen: with ghost clipping unsupported at every batch, no batch has every method ok
    assert main([str(real_runs.a_json), str(real_runs.a_jsonl), "--out", str(out), "--batch-size", "4"]) == 0
    for name in ("peak_vs_batch", "breakdown", "timeline"):  # the figures a one-machine GPT-only CPU run supports
        for suffix in (".png", ".svg"):
            assert (out / "figures" / f"{name}{suffix}").stat().st_size > 0
    for name in ("overhead.csv", "overhead.md", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "Proxy validity (GPT vs DiT): the data lack the DiT family" in md
    # the first screen: the matrix at batch 4 (the largest where nondp ran ok; BIG ran out of the 40 MiB cap)
    glance = md[md.index("## At a glance") : md.index("## Peak memory")]
    assert "| workload · batch | bk | opacus-ghost | opacus-hooks |" in glance
    row = next(line for line in glance.splitlines() if line.startswith("| gpt-tiny (B=4 · nondp "))
    assert re.search(r"\| \*?\*?\d\.\d\d×", row) and "| unsupported¹ |" in row
    # the untimed cases, kept out of pytest-benchmark's list, are in the report: the reason in the ranked summary
    ranked = next(line for line in glance.splitlines() if line.startswith("| gpt-tiny (B=4)"))
    assert "opacus-ghost: Parameter tying is not supported with Ghost Clipping" in ranked
    memory = md[md.index("## Peak memory") : md.index("## Step time")]
    assert "workload: gpt-tiny" in memory  # one workload: in the caption, not on every row
    bk = next(line for line in memory.splitlines() if line.startswith("| bk |"))
    assert bk.endswith("| OOM² |")  # batch BIG, over the cap (footnote ¹: nondp at BIG)
    overhead_md = (out / "overhead.md").read_text()
    assert "| unsupported |" in overhead_md and "| OOM |" in overhead_md
    # a 40 MiB-capped model's fit, predicted for the machine's RAM: an extrapolation, written as a bound
    assert re.search(r"\| &gt; 16 \(extrapolated ×\d+\) \|", (out / "memory_fit.md").read_text())
    page = (out / "report.html").read_text()
    assert page.index("class='sortable matrix'") < page.index("class='sortable ranked'") < page.index("<img")
    assert "<figcaption>" in page and "<script>" in page and "table.sortable" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)|https?://""", page)  # works offline
    # the overhead ratios, recomputed from the raw pytest-benchmark JSON with the json module
    cases = _entries(real_runs.a_json)
    assert {m for m, _ in cases} == {"nondp", "bk", "opacus-hooks"} and {b for _, b in cases} == {2, 4}
    rows = {(r["method"], int(r["batch_size"])): r for r in csv.DictReader((out / "overhead.csv").open())}
    assert len(rows) == 3 * 3  # bk, opacus-hooks, opacus-ghost × batch 2, 4, BIG
    for (method, batch), row in rows.items():
        assert row["device"] == "cpu" and row["peak reserved ×nondp"] == ""  # no allocator on CPU
        if (method, batch) not in cases:  # untimed: unsupported or OOM, with no number
            assert row["status"] in ("unsupported", "oom") and row["peak tensor ×nondp"] == ""
            continue
        e, base = cases[(method, batch)]["extra_info"], cases[("nondp", batch)]["extra_info"]
        assert float(row["peak tensor ×nondp"]) == pytest.approx(
            e["peak_tensor_bytes"] / base["peak_tensor_bytes"], abs=6e-4
        )
        # the step-time ratio is the case's own paired ratio (its rounds between non-DP rounds of the same load)
        assert e["paired_time_ratio"] is not None
        assert float(row["median step ×nondp"]) == pytest.approx(e["paired_time_ratio"], abs=6e-4)
        # 3 rounds and an IQR on both sides; "unreliable" where the run saw load it cannot vouch for
        assert row["time vs noise"] in ("beyond noise", "within noise", "unreliable")
    # opacus-hooks instantiates per-sample gradients: more peak memory than non-DP on a real run
    assert float(rows[("opacus-hooks", 4)]["peak tensor ×nondp"]) > 1.0


def test_real_bench_compare_gate(tmp_path, real_runs):
    bench_json = real_runs.a_json
    assert main(["compare", str(bench_json), str(bench_json), "--max-regression", "5%"]) == 0
    data = json.loads(bench_json.read_text())
    grown = next(
        b for b in data["benchmarks"] if b["extra_info"]["status"] == "ok" and b["extra_info"]["method"] == "bk"
    )
    grown["extra_info"]["peak_tensor_bytes"] = int(grown["extra_info"]["peak_tensor_bytes"] * 1.10)
    regressed = tmp_path / "regressed.json"
    regressed.write_text(json.dumps(data))
    assert main(["compare", str(bench_json), str(regressed), "--max-regression", "5%"]) == 1
    grown["extra_info"].update(status="oom", reason="CUDA out of memory (injected)")
    regressed.write_text(json.dumps(data))
    assert main(["compare", str(bench_json), str(regressed), "--max-regression", "50%"]) == 1


def test_a_case_run_after_a_larger_one_passes_the_gate(real_runs, capsys):
    """The same case alone (first in run A) and after a larger case (run B): its own figures are equal, the
    process RSS is not (freed arenas stay resident) — shown, not gated."""
    alone = load_results([real_runs.a_json]).cases.set_index(["method", "batch_size"]).loc[("nondp", 2)]
    after = load_results([real_runs.b_json]).cases.set_index(["method", "batch_size"]).loc[("nondp", 2)]
    assert alone["status"] == after["status"] == "ok"
    assert alone["peak_tensor_bytes"] == after["peak_tensor_bytes"]
    growth = after["peak_rss_bytes"] / alone["peak_rss_bytes"] - 1.0  # freed arenas stay resident (+18 %, +39 % seen)
    assert growth > 0
    subset = "--allow-missing"  # run B ran two of run A's cases
    assert main(["compare", str(real_runs.a_json), str(real_runs.b_json), "--max-regression", "5%", subset]) == 0
    out = capsys.readouterr().out
    assert "gpt-tiny/nondp/bs2/cpu" in out and "peak_rss_bytes +" in out and "No memory regression" in out
    # gated on RSS with a threshold below its growth, the same two files fail: the figure is not isolated
    threshold = f"{growth * 50:.6f}%"
    gated_on_rss = ["--gate-figures", "peak_rss_bytes", "--max-regression", threshold]
    assert main(["compare", str(real_runs.a_json), str(real_runs.b_json), *gated_on_rss, subset]) == 1


def _pytest_benchmark_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # `python -m pytest_benchmark` (the package's __main__): `-m pytest_benchmark.cli` has no main guard and
    # would exit 0 without doing anything.
    return subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_pytest_benchmark_own_tools_read_our_json(tmp_path, real_runs):
    timed = [b["name"] for b in json.loads(real_runs.a_json.read_text())["benchmarks"]]
    untimed = [b["name"] for b in json.loads(real_runs.a_json.read_text())["dpmem_untimed"]]
    assert len(timed) == 6 and len(untimed) == 6  # 3 unsupported (ghost) + 3 OOM (batch BIG)
    proc = _pytest_benchmark_cli("compare", str(real_runs.a_json), str(real_runs.b_json), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Failed to load" not in proc.stdout + proc.stderr
    assert all(name in proc.stdout for name in timed)
    assert f"test_dp_step[gpt-tiny-nondp-bs{BIG}-cpu] (" in proc.stdout  # run B's timed cases too
    # the saved run of A (--benchmark-autosave) lists, and loads by its id
    proc = _pytest_benchmark_cli(f"--storage=file://{real_runs.storage}", "list", cwd=tmp_path)
    assert proc.returncode == 0 and "0001_" in proc.stdout, proc.stdout + proc.stderr
    proc = _pytest_benchmark_cli(f"--storage=file://{real_runs.storage}", "compare", "0001", cwd=tmp_path)
    assert proc.returncode == 0 and "Failed to load" not in proc.stdout + proc.stderr
    assert all(name in proc.stdout for name in timed)
    # --benchmark-compare in run B read A's saved run and compared
    assert "Failed to load" not in real_runs.b_output and "0001" in real_runs.b_output
    assert "test_dp_step[gpt-tiny-nondp-bs2-cpu] (0001" in real_runs.b_output
    assert real_runs.histogram.with_suffix(".svg").stat().st_size > 0


def test_reports_read_the_autosaved_run_too(real_runs):
    (saved,) = list(real_runs.storage.rglob("0001_*.json"))
    results = load_results([saved])
    assert set(results.cases["status"]) == {"ok", "oom", "unsupported"}  # dpmem_untimed was saved as well
