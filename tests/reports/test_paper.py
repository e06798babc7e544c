"""`python -m reports paper`: the README's paper-scale tables, from result files (reports/paper.py)."""

from __future__ import annotations

import dataclasses

import pytest

from bench.results.record import BudgetAnswer, MaxBatchRecord
from reports.load import load_results
from reports.paper import PaperTableError, paper_table

from .fakes import BATCHES, GIB, METHODS, make_case, run_cli, write_jsonl

WORKLOAD = "dit-s-2-cond"


def _records(precision: str = "fp32", scale: float = 1.0):
    records = [make_case(WORKLOAD, m, b, "h100", scale=scale) for m in METHODS for b in BATCHES]
    return [dataclasses.replace(r, precision=precision) for r in records]


def _cells(grid) -> dict[tuple[str, str], str]:
    return {(row[0].text.strip("`"), title): cell.text for row in grid.rows for title, cell in zip(grid.header, row)}


def _peak(records, method, batch) -> float:
    (record,) = [r for r in records if r.method == method and r.batch_size == batch]
    return record.memory.peak_tensor_bytes


def test_by_batch_writes_peak_gib_and_the_ratio_to_nondp_at_the_same_batch(tmp_path):
    records = _records()
    oom = make_case(WORKLOAD, "opacus-hooks", 128, "h100", status="oom")
    results = load_results([write_jsonl(tmp_path / "r.jsonl", [*records, oom])])
    grid = paper_table(results, "batch", [WORKLOAD], "fp32", None)
    cells = _cells(grid)
    assert grid.rows[0][0].text == "`nondp`"  # the baseline first
    assert grid.header == ["method", *(f"B = {b}" for b in (*BATCHES, 128))]
    for method in METHODS:
        for batch in BATCHES:
            peak = _peak(records, method, batch)
            text = f"{peak / GIB:.1f}"
            if method != "nondp":
                text += f" ({peak / _peak(records, 'nondp', batch):.2f}×)"
            assert cells[method, f"B = {batch}"] == text
    assert cells["opacus-hooks", "B = 128"] == "OOM"
    assert cells["bk", "B = 128"] == "—"  # not run


def test_by_mode_divides_by_nondp_in_the_same_mode(tmp_path):
    fp32, amp = _records("fp32"), _records("amp-bf16", scale=0.5)
    results = load_results([write_jsonl(tmp_path / "r.jsonl", [*fp32, *amp])])
    cells = _cells(paper_table(results, "mode", [WORKLOAD], "fp32", 16))
    for records, mode in ((fp32, "fp32"), (amp, "amp-bf16")):
        peak = _peak(records, "bk", 16)
        assert cells["bk", mode] == f"{peak / GIB:.1f} ({peak / _peak(records, 'nondp', 16):.2f}×)"


def _search(method: str, answers: list[BudgetAnswer], status: str = "ok") -> MaxBatchRecord:
    return MaxBatchRecord(WORKLOAD, method, "meta", measurement="predicted", budgets=answers, status=status)


def test_by_budget_writes_each_exact_answer_and_says_when_it_is_a_bound(tmp_path):
    searches = [
        _search("nondp", [BudgetAnswer(40 * GIB, 44, 45), BudgetAnswer(80 * GIB, 103, 104)]),
        _search("bk", [BudgetAnswer(40 * GIB, None, 1), BudgetAnswer(80 * GIB, 4096, None)]),
        _search("opacus-ghost", [], status="unsupported"),
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", searches)])
    grid = paper_table(results, "budget", [WORKLOAD], "fp32", None)
    cells = _cells(grid)
    assert grid.header == ["method", f"{WORKLOAD} 40 GiB", f"{WORKLOAD} 80 GiB"]
    assert cells["nondp", f"{WORKLOAD} 40 GiB"] == "44" and cells["nondp", f"{WORKLOAD} 80 GiB"] == "103"
    assert cells["bk", f"{WORKLOAD} 40 GiB"] == "0"  # not even batch 1 fits
    assert cells["bk", f"{WORKLOAD} 80 GiB"] == "≥4096"  # the search limit fits: a lower bound
    assert cells["opacus-ghost", f"{WORKLOAD} 40 GiB"] == "unsupported"


def test_the_cli_prints_the_markdown_table(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _records())
    done = run_cli("paper", path, "--workloads", WORKLOAD, "--by", "batch")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "| method | " + " | ".join(f"B = {b}" for b in BATCHES) + " |"
    assert lines[2].startswith("| `nondp` | ") and len(lines) == 2 + len(METHODS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--workloads", "gpt2"), "no case of workload 'gpt2'"),
        (("--workloads", WORKLOAD, "--by", "mode"), "--by mode needs --batch-size"),
        (("--workloads", WORKLOAD, "--mode", "bf16"), "no case of dit-s-2-cond in mode 'bf16'"),
        (("--workloads", WORKLOAD, "--by", "budget"), "no max-batch search in the results"),
    ],
)
def test_a_table_the_results_cannot_make_is_a_one_line_error(tmp_path, args, message):
    path = write_jsonl(tmp_path / "r.jsonl", _records())
    done = run_cli("paper", path, *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_results_of_two_machines_are_refused(tmp_path):
    records = [*_records(), *(dataclasses.replace(r, runner_label="a100") for r in _records())]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    with pytest.raises(PaperTableError, match="results from 2 machines"):
        paper_table(results, "batch", [WORKLOAD], "fp32", None)


def test_a_search_run_again_answers_with_its_latest_record(tmp_path):
    first = _search("torch-func", [], status="unsupported")
    again = _search("torch-func", [BudgetAnswer(40 * GIB, 7, 8)])
    results = load_results([write_jsonl(tmp_path / "a.jsonl", [first]), write_jsonl(tmp_path / "b.jsonl", [again])])
    assert _cells(paper_table(results, "budget", [WORKLOAD], "fp32", None))["torch-func", f"{WORKLOAD} 40 GiB"] == "7"
