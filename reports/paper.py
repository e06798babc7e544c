"""The README's paper-scale tables, written from result files: ``python -m reports paper``.

Three shapes, each a :class:`reports.grid.Grid` written as Markdown (so the README's tables are this code's
output, not hand copies):

* ``--by batch``: one row per method, one column per batch size, for one workload in one training mode — the
  peak live tensor GiB and, for a DP method, × nondp at the same batch and mode;
* ``--by mode``: one row per method, one column per training mode (fp32, amp-bf16+blocks, fp32+lora:r=8, …:
  full training first), at one batch, each ratio to nondp in the same mode (nondp fine-tuned the same way);
* ``--by budget``: the exact max batch of meta searches (``--max-batch --devices meta``): one row per method, a
  column per workload × memory budget, in one training mode.

``--value time`` (``--by batch`` and ``--by mode``, predicted results only) writes each cell's *estimated* step
time instead of its peak: "est. ms (× nondp)", the roofline of the record's work counts on ``--gpu``
(reports/estimates.py), the caption saying what the estimate rests on; a case without work counts says so.

A cell with no figure says why: the case's status (OOM, unsupported, error) or "—" where the case was not run
(the per-sample loop above its paper-preset cap). The results must come from one machine (meta results have one).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from bench.config.sizes import size_text

from .estimates import StepEstimate, estimate_words, milliseconds_text, step_estimate
from .grid import Cell, Grid
from .load import Results, is_predicted
from .tables import BASELINE_METHOD, MODE_COLUMNS, mode_order, one_process, status_label
from .tables import mode_label as unnamed_default_label

__all__ = ["SHAPES", "VALUES", "PaperTableError", "paper_table"]

SHAPES = ("batch", "mode", "budget")
VALUES = ("peak", "time")  # --value: peak live tensor GiB, or the estimated step time of predicted rows
GIB = 2**30
NOT_RUN = "—"


class PaperTableError(ValueError):
    """The results cannot make the table asked for; one line naming what is missing."""


def mode_label(precision: str, checkpointing: str, trainable: str = "full") -> str:
    """``fp32``, ``amp-bf16+blocks``, ``fp32+lora:r=8``: a training mode as the tables (and ``--mode``) name it
    (the figures leave the default mode unnamed)."""
    return unnamed_default_label(precision, checkpointing, trainable) or "fp32"


def _with_mode(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(mode=[mode_label(*mode) for mode in zip(*(frame[column] for column in MODE_COLUMNS))])


def _modes_in_order(frame: pd.DataFrame) -> list[str]:
    """The ``mode`` labels of ``frame`` (:func:`_with_mode`) in the tables' order (reports.tables.mode_order)."""
    order = {label: mode_order(*mode) for label, *mode in zip(frame["mode"], *(frame[c] for c in MODE_COLUMNS))}
    return sorted(order, key=lambda label: (order[label], label))


def _in_mode(frame: pd.DataFrame, mode: str, what: str) -> pd.DataFrame:
    """The rows of ``frame`` in ``mode``; a PaperTableError naming the modes there are when none is."""
    mine = frame[frame["mode"] == mode]
    if mine.empty:
        raise PaperTableError(f"no {what} in mode {mode!r} (modes: {', '.join(_modes_in_order(frame)) or 'none'})")
    return mine


def _method_order(methods: Iterable[str]) -> list[str]:
    """nondp first (what every ratio divides by), then the DP methods by name (as the report orders them)."""
    names = sorted(set(methods))
    return [m for m in names if m == BASELINE_METHOD] + [m for m in names if m != BASELINE_METHOD]


def _one_machine(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    machines = sorted(set(frame["machine"]))
    if len(machines) > 1:
        raise PaperTableError(f"{what}: results from {len(machines)} machines ({', '.join(machines)}); give one")
    return frame


def _cases_of(results: Results, workload: str) -> pd.DataFrame:
    cases = one_process(results.cases)
    cases = cases[cases["workload"] == workload]
    if cases.empty:
        known = ", ".join(sorted(set(results.cases["workload"]))) or "none"
        raise PaperTableError(f"no case of workload {workload!r} in the results (workloads: {known})")
    return _with_mode(_one_machine(cases, workload))


def _peak_cell(case: pd.Series, nondp_peaks: dict[tuple[str, int], float]) -> Cell:
    peak = float(case["peak_tensor_bytes"])
    # the ratio from the bytes themselves: the overhead table's ratios are rounded to 3 places already
    nondp = nondp_peaks.get((case["mode"], case["batch_size"])) if case["method"] != BASELINE_METHOD else None
    return Cell(f"{peak / GIB:.1f}" + (f" ({peak / nondp:.2f}×)" if nondp else ""), peak / GIB)


def _time_cell(case: pd.Series, estimate: StepEstimate, nondp: StepEstimate | None) -> Cell:
    if estimate.seconds is None:
        return Cell(estimate.reason, style="reason")
    ratio = estimate.over(nondp) if case["method"] != BASELINE_METHOD else None
    text = milliseconds_text(estimate.seconds) + (f" ({ratio:.2f}×)" if ratio is not None else "")
    return Cell(text, estimate.seconds * 1e3, style="pred")


def _predicted_only(cases: pd.DataFrame, workload: str) -> pd.DataFrame:
    measured = [is_predicted(case) for _, case in cases.iterrows()].count(False)
    if measured:
        raise PaperTableError(
            f"--value time: {measured} case(s) of {workload} were measured, not predicted; the estimated times are "
            "for meta results (pytest bench/ --devices meta)"
        )
    return cases


def _grid(cases: pd.DataFrame, column: str, columns: list, what: tuple[str, str], value: str, gpu: str | None) -> Grid:
    """Rows method, one column per value of ``column`` (``batch_size`` or ``mode``) of ``cases``: the peak GiB or
    (``value`` "time") the estimated step ms on ``gpu``, each with its ratio to nondp at the same batch and mode.
    ``what``: the workload and the mode or batch the table is of; the caption adds what the cells are and (time)
    what the estimates rest on."""
    baselines = cases[(cases["method"] == BASELINE_METHOD) & (cases["status"] == "ok")]
    nondp_peaks = {
        (mode, batch): float(peak)
        for mode, batch, peak in zip(baselines["mode"], baselines["batch_size"], baselines["peak_tensor_bytes"])
    }
    estimates = (
        {index: step_estimate(case["record"], gpu) for index, case in cases[cases["status"] == "ok"].iterrows()}
        if value == "time"
        else {}
    )
    nondp_estimates = {
        (mode, batch): estimates[index]
        for index, mode, batch in zip(baselines.index, baselines["mode"], baselines["batch_size"])
        if index in estimates
    }
    rows = []
    for method in _method_order(cases["method"]):
        line = [Cell(f"`{method}`", style="label")]
        mine = {case[column]: (index, case) for index, case in cases[cases["method"] == method].iterrows()}
        for wanted in columns:
            index, case = mine.get(wanted, (None, None))
            if case is None:
                line.append(Cell(NOT_RUN))
            elif case["status"] != "ok":
                line.append(Cell(status_label(case["status"]), style=case["status"]))
            elif value == "time":
                nondp = nondp_estimates.get((case["mode"], case["batch_size"]))
                line.append(_time_cell(case, estimates[index], nondp))
            else:
                line.append(_peak_cell(case, nondp_peaks))
        rows.append(line)
    header = ["method", *(f"B = {c}" if column == "batch_size" else c for c in columns)]
    same = "at the same batch" if column == "batch_size" else "in the same mode"
    if value == "time":
        cells = f"estimated step ms (× nondp {same}); {estimate_words(list(estimates.values()))}"
    else:
        cells = f"peak live tensor GiB (× nondp {same})"
    # the Markdown table's only words under it: what a time cell is, and what it rests on
    legend = f"{', '.join(what)}: {cells}." if value == "time" else ""
    return Grid(" — ".join(what), f"{', '.join(what)}: {cells}", header, rows, legend=legend)


def peak_by_batch(results: Results, workload: str, mode: str, value: str = "peak", gpu: str | None = None) -> Grid:
    cases = _in_mode(_cases_of(results, workload), mode, f"case of {workload}")
    if value == "time":
        cases = _predicted_only(cases, workload)
    batches = sorted(set(cases["batch_size"]))
    return _grid(cases, "batch_size", batches, (workload, mode), value, gpu)


def peak_by_mode(results: Results, workload: str, batch_size: int, value: str = "peak", gpu: str | None = None) -> Grid:
    cases = _cases_of(results, workload)
    cases = cases[cases["batch_size"] == batch_size]
    if cases.empty:
        raise PaperTableError(f"no case of {workload} at batch {batch_size}")
    if value == "time":
        cases = _predicted_only(cases, workload)
    modes = _modes_in_order(cases)
    return _grid(cases, "mode", modes, (workload, f"B = {batch_size}"), value, gpu)


def max_batch_by_budget(results: Results, workloads: list[str], mode: str) -> Grid:
    searches = results.max_batches
    if searches.empty:
        raise PaperTableError("no max-batch search in the results (run pytest bench/ --max-batch --devices meta)")
    searches = _with_mode(searches)
    searches = searches[searches["workload"].isin(workloads)]
    searches = _in_mode(searches, mode, f"max-batch search of {', '.join(workloads)}")
    _one_machine(searches, "max batch")
    budgets = sorted({answer.budget_bytes for answers in searches["budgets"] for answer in answers})
    header = ["method", *(f"{w} {size_text(b)}" for w in workloads for b in budgets)]
    rows = []
    for method in _method_order(searches["method"]):
        line = [Cell(f"`{method}`", style="label")]
        for workload in workloads:
            found = searches[(searches["method"] == method) & (searches["workload"] == workload)]
            record = found.iloc[-1] if len(found) else None  # a search run again: the latest (files in order)
            for budget in budgets:
                line.append(_max_batch_cell(record, budget))
        rows.append(line)
    caption = f"{mode}: the largest batch that fits each GPU memory (exact meta search, the overhead model applied)"
    return Grid(f"max batch — {mode}", caption, header, rows)


def _max_batch_cell(search: pd.Series | None, budget: int) -> Cell:
    if search is None:
        return Cell(NOT_RUN)
    if search["status"] != "ok":
        return Cell(status_label(search["status"]), style=search["status"])
    answer = next((a for a in search["budgets"] if a.budget_bytes == budget), None)
    if answer is None:
        return Cell(NOT_RUN)
    if answer.max_batch is None:
        return Cell("0", 0.0)
    bound = "≥" if answer.first_failing_batch is None or answer.host_limit_batch is not None else ""
    return Cell(f"{bound}{answer.max_batch}", float(answer.max_batch))


def paper_table(
    results: Results,
    by: str,
    workloads: list[str],
    mode: str,
    batch_size: int | None,
    value: str = "peak",
    gpu: str | None = None,
) -> Grid:
    """The table of shape ``by`` (:data:`SHAPES`) of ``value`` (:data:`VALUES`; the time on ``gpu``, default each
    record's estimate GPU or the planner's)."""
    if by == "budget":
        if value != "peak":
            raise PaperTableError("--value time makes --by batch and --by mode tables; --by budget is max batches")
        return max_batch_by_budget(results, workloads, mode)
    if len(workloads) != 1:
        raise PaperTableError(f"--by {by} makes one workload's table; got {len(workloads)}")
    if by == "mode":
        if batch_size is None:
            raise PaperTableError("--by mode needs --batch-size")
        return peak_by_mode(results, workloads[0], batch_size, value, gpu)
    return peak_by_batch(results, workloads[0], mode, value, gpu)
