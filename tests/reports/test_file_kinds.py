"""`python -m reports` on every kind of result file the bench writes, in both formats.

Two real ``pytest bench/`` runs, shared by the module: the cases (gpt-tiny nondp and bk at batch 4 on cpu, on
meta and on 2 gloo ranks under DDP; nondp and bk at batch 1024 over a 40 MiB cap, and opacus-ghost, which refuses
the tied embedding) and the max-batch searches (dit-tiny-cond nondp and bk, on cpu under a 6 MiB cap and on meta
for a 2 GiB budget). Their records are split into files of one kind each — meta only, max-batch only, ranks only,
untimed only (every case OOM or unsupported) — and one file of everything; each is rendered as ``.jsonl``
(``--results``) and as pytest-benchmark JSON (``--benchmark-json``).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from reports.__main__ import main
from tests.bench.test_matrix import FP32_ONLY, REPO, _env

CASES = [
    "gpt-tiny-nondp-bs4-cpu",
    "gpt-tiny-bk-bs4-cpu",
    "gpt-tiny-nondp-bs4-meta",
    "gpt-tiny-bk-bs4-meta",
    "gpt-tiny-nondp-bs4-cpu-ddp2",
    "gpt-tiny-bk-bs4-cpu-ddp2",
    "gpt-tiny-nondp-bs1024-cpu",  # over the 40 MiB cap: OOM
    "gpt-tiny-bk-bs1024-cpu",
    "gpt-tiny-opacus-ghost-bs4-cpu",  # ghost clipping refuses the tied embedding: unsupported
]


@dataclass
class Runs:
    cases_json: Path
    cases_jsonl: Path
    max_batch_json: Path
    max_batch_jsonl: Path


def _pytest_bench(out: Path, name: str, *args: str) -> tuple[Path, Path]:
    """``pytest ARGS`` (node ids or bench/, then options) writing ``out/NAME.json`` and ``out/NAME.jsonl``."""
    json_path, jsonl_path = out / f"{name}.json", out / f"{name}.jsonl"
    command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", *FP32_ONLY, "--rounds", "3"]
    command += [f"--benchmark-json={json_path}", f"--results={jsonl_path}"]
    proc = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json_path, jsonl_path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    out = tmp_path_factory.mktemp("kinds")
    cases = _pytest_bench(
        out,
        "cases",
        *(f"bench/test_dp_step.py::test_dp_step[{case}]" for case in CASES),  # only these, in this order
        *("--workloads", "gpt-tiny", "--methods", "nondp,bk,opacus-ghost", "--batch-sizes", "4,1024"),
        *("--devices", "cpu,meta", "--world-sizes", "1,2", "--parallel", "ddp", "--memory-cap", "40MiB"),
    )
    max_batch = _pytest_bench(
        out,
        "max_batch",
        *("bench/", "--max-batch", "--workloads", "dit-tiny-cond", "--methods", "nondp,bk", "--devices", "cpu,meta"),
        *("--memory-cap", "6MiB", "--memory-budget", "2GiB", "--max-batch-limit", "64"),
    )
    return Runs(*cases, *max_batch)


def _is_max_batch(record: dict) -> bool:
    return record.get("record_type") == "max_batch"


def _is_case(record: dict) -> bool:
    return not _is_max_batch(record)


# kind -> which records of the two runs its file holds
KINDS: dict[str, Callable[[dict], bool]] = {
    "meta": lambda r: _is_case(r) and r["device"] == "meta",
    "max-batch": _is_max_batch,
    "ranks": lambda r: _is_case(r) and r["world_size"] > 1,
    "untimed": lambda r: _is_case(r) and r["status"] != "ok",
    "mix": lambda r: True,
}


def _jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _kind_file(runs: Runs, kind: str, fmt: str, folder: Path) -> tuple[Path, list[dict]]:
    """The file of one kind, as the bench writes that format, and its records (as dicts)."""
    keep = KINDS[kind]
    path = folder / f"{kind}.{fmt}"
    if fmt == "jsonl":
        records = [r for source in (runs.cases_jsonl, runs.max_batch_jsonl) for r in _jsonl_records(source)]
        records = [r for r in records if keep(r)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path, records
    data = json.loads(runs.cases_json.read_text())
    extra = json.loads(runs.max_batch_json.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if keep(b["extra_info"])]
    data["dpmem_untimed"] = [b for b in data["dpmem_untimed"] + extra["dpmem_untimed"] if keep(b["extra_info"])]
    path.write_text(json.dumps(data))
    return path, [b["extra_info"] for b in data["benchmarks"] + data["dpmem_untimed"]]


def _section(md: str, title: str) -> str:
    start = md.index(f"## {title}")
    end = md.find("\n## ", start + 1)
    return md[start : end if end >= 0 else len(md)]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def _check_meta(md: str, out: Path, records: list[dict]) -> None:
    glance = _section(md, "At a glance")
    assert "### meta — predicted: exact tensor bytes, nothing allocated or timed" in glance
    nondp, bk = (next(r for r in records if r["method"] == m) for m in ("nondp", "bk"))
    row = next(line for line in glance.splitlines() if line.startswith("| gpt-tiny (B=4 · nondp "))
    ratio = float(re.search(r"\| \*?\*?(\d+\.\d\d)×", row).group(1))
    assert ratio == pytest.approx(bk["peak_tensor_bytes"] / nondp["peak_tensor_bytes"], abs=0.006)
    assert "fastest DP step" not in glance  # nothing was timed: no time column, no time ratio
    assert "2 cases (2 ok)" in md


def _check_max_batch(md: str, out: Path, records: list[dict]) -> None:
    assert "4 max-batch search(es), no case rows." in md
    assert "its 4 max-batch search(es) are under Max batch" in _section(md, "At a glance")
    fits = _section(md, "Max batch: what fits")
    assert re.search(r"### Max batch — .* · cpu — measured", fits) and "### Max batch — meta — predicted" in fits
    measured = {(r["device"], r["method"]): r["max_batch_measured"] for r in records}
    rows = {(r["device"], r["method"]): r for r in _rows(out / "memory_fit.csv")}
    assert set(rows) == set(measured)  # every search is a row: cpu and meta, nondp and bk
    for (device, method), row in rows.items():
        if device == "cpu":  # the cap was reached: the exact largest batch that fits is in the table
            assert int(row["measured max batch"]) == measured[(device, method)] and row["first failing batch"]


def _check_ranks(md: str, out: Path, records: list[dict]) -> None:
    assert re.search(r"2 cases \(2 ok\): .* on [^.;]+ · cpu\.", md)  # the machine is named, not left out
    assert "its 2 case(s) on many ranks are in the per-rank figure under Many ranks" in _section(md, "At a glance")
    assert "per_rank_peak.png" in _section(md, "Many ranks: memory per rank")
    assert (out / "figures" / "per_rank_peak.png").stat().st_size > 0
    nondp, bk = (next(r for r in records if r["method"] == m) for m in ("nondp", "bk"))
    (row,) = _rows(out / "overhead.csv")
    assert (row["method"], row["world_size"], row["parallel"]) == ("bk", "2", "ddp")
    assert float(row["peak tensor ×nondp"]) == pytest.approx(
        bk["peak_tensor_bytes"] / nondp["peak_tensor_bytes"], abs=6e-4
    )


def _check_untimed(md: str, out: Path, records: list[dict]) -> None:
    assert "3 cases (2 OOM, 1 unsupported)" in md
    glance = _section(md, "At a glance")
    # the matrix at the largest batch tried (none ran ok), the ranked summary naming what failed and why
    matrix = next(line for line in glance.splitlines() if line.startswith("| gpt-tiny (B="))
    assert matrix.startswith("| gpt-tiny (B=1024 · nondp did not run ok) | OOM")
    ranked = next(line for line in glance.splitlines() if line.startswith("| gpt-tiny (B=") and line != matrix)
    assert "| not timed |" in ranked and "bk (no batch ok)" in ranked
    assert "opacus-ghost: Parameter tying is not supported with Ghost Clipping" in ranked
    assert {r["status"] for r in _rows(out / "overhead.csv")} == {"oom", "unsupported"}


def _check_mix(md: str, out: Path, records: list[dict]) -> None:
    assert "× 2 rank settings" in md
    glance = _section(md, "At a glance")
    assert re.search(r"### .* · cpu — measured", glance) and "### meta — predicted" in glance
    timed = next(line for line in glance.splitlines() if re.match(r"\| gpt-tiny \(B=4 · nondp [\d.]+ MiB, ", line))
    assert re.search(r"[\d.]+ ms", timed)  # the measured nondp step time beside its peak
    assert "## Max batch: what fits" in md and "## Many ranks: memory per rank" in md
    assert len(_rows(out / "memory_fit.csv")) >= 4


CHECKS = {
    "meta": _check_meta,
    "max-batch": _check_max_batch,
    "ranks": _check_ranks,
    "untimed": _check_untimed,
    "mix": _check_mix,
}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_file_renders_a_report_that_says_what_it_holds(runs, tmp_path, kind, fmt, capsys):
    path, records = _kind_file(runs, kind, fmt, tmp_path)
    assert records
    out = tmp_path / "report"
    assert main([str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert (out / "report.html").stat().st_size > 0
    assert not re.search(r"\bnan\b|\bNaN\b|\bNone\b|\bon \.", md)  # no missing value written out as text
    CHECKS[kind](md, out, records)
