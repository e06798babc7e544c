"""The report's detail tables, one per machine × device block, pivoted so they fit the data.

Peak memory and step time: one row per workload × method, one column per batch size (the long form, one row per
case, stays in ``overhead.csv`` / ``overhead.md``). The max-batch table: one row per workload × method. Every
table is :func:`reports.grid.compact`-ed: a column with the same value on every row moves into the caption.
"""

from __future__ import annotations

import pandas as pd

from bench.config.sizes import size_text
from bench.plan.maxbatch import answer_text

from .grid import Cell, Grid, compact
from .load import Results, is_predicted
from .summary import METRIC_WORDS, RATIO_TITLE, Block, blocks, workload_order
from .tables import (
    BASELINE_METHOD,
    BUDGET_SOURCE,
    EXTRAPOLATION_LIMIT,
    LOWER_BOUND,
    MODE_COLUMNS,
    TimeComparison,
    budget_answer,
    extrapolation_factor,
    one_process,
    predicted_max_batch_text,
    present,
    reason_text,
    status_label,
    unreliable_time_reason,
)

__all__ = ["fit_grids", "memory_pivot", "time_pivot"]


def _method_order(rows: pd.DataFrame) -> list[str]:
    """nondp first (the baseline every ratio divides by), then the DP methods by name."""
    methods = sorted(rows["method"].unique())
    return [m for m in methods if m == BASELINE_METHOD] + [m for m in methods if m != BASELINE_METHOD]


def _failed_cell(case: pd.Series) -> Cell:
    where = f"{case['method']} on {case['workload']} at batch {case.name}"
    reason = reason_text(case["reason"] or "") or "no reason recorded"
    return Cell(status_label(case["status"]), style=case["status"], footnote=f"{where}: {reason}")


def _pivot(block: Block, rows: pd.DataFrame, overhead: pd.DataFrame, cell_of) -> list[list[Cell]]:
    """Rows workload × method, a column per batch size; ``cell_of(case, ratios)`` makes an ok case's cell."""
    batches = sorted(rows["batch_size"].unique())
    overhead = one_process(overhead)
    overhead = block.rows_of(overhead)
    ratios = overhead.set_index(["workload", "method", "batch_size"])
    grid_rows = []
    for workload in workload_order(rows):
        wrows = rows[rows["workload"] == workload]
        for method in _method_order(wrows):
            by_batch = wrows[wrows["method"] == method].set_index("batch_size")
            line = [Cell(workload, style="label"), Cell(method, style="label")]
            for batch in batches:
                if batch not in by_batch.index:
                    line.append(Cell("", hover="not run"))
                    continue
                case = by_batch.loc[batch]
                if case["status"] != "ok":
                    line.append(_failed_cell(case))
                    continue
                key = (workload, method, batch)
                line.append(cell_of(case, ratios.loc[key] if key in ratios.index else None))
            grid_rows.append(line)
    return grid_rows


def memory_pivot(block: Block, rows: pd.DataFrame, overhead: pd.DataFrame) -> Grid:
    """Peak memory of every case of ``block``: absolute (the unit in the caption) and ×nondp."""
    metric = block.metric
    peaks = rows.loc[rows["status"] == "ok", metric].dropna()
    scale, unit = (2.0**30, "GiB") if len(peaks) and peaks.max() >= 2**30 else (2.0**20, "MiB")

    def cell(case: pd.Series, ratios: pd.Series | None) -> Cell:
        peak = case[metric]
        if not present(peak):
            return Cell("n/a", hover=f"{metric} not recorded")
        ratio = ratios[RATIO_TITLE[metric]] if ratios is not None else None
        text = f"{peak / scale:.3g}" + (f" ({ratio:.2f}×)" if ratio is not None and present(ratio) else "")
        return Cell(text, float(peak) / scale, style="pred" if block.predicted else "")

    batches = sorted(rows["batch_size"].unique())
    grid = Grid(
        title=f"Peak memory — {block.title}",
        caption=(
            f"{METRIC_WORDS[metric]} [{unit}] (×nondp at the same batch): read along a row for how memory grows "
            "with the batch; click a header to sort."
        ),
        header=["workload", "method", *(f"B={b}" for b in batches)],
        rows=_pivot(block, rows, overhead, cell),
    )
    return compact(grid, keep=("method",))


def time_pivot(block: Block, rows: pd.DataFrame, overhead: pd.DataFrame) -> Grid | None:
    """Median step time of every timed case of ``block`` and its ratio to nondp where beyond noise (None for a
    predicted block or one without timings)."""
    if block.predicted or rows["time_median_s"].dropna().empty:
        return None

    def cell(case: pd.Series, ratios: pd.Series | None) -> Cell:
        median = case["time_median_s"]
        if not present(median):
            return Cell("not timed")
        ms = float(median) * 1e3
        own = unreliable_time_reason(case)
        time = TimeComparison.of(ratios)
        if not present(time.ratio):
            if own:
                return Cell(f"{ms:.3g} (unreliable)", ms, "untrusted", f"step time unreliable: {own}")
            return Cell(f"{ms:.3g}", ms)
        ratio, verdict = time.ratio, time.verdict
        noise = f"±{time.noise:.0%}" if present(time.noise) else "unknown"
        hover = f"{ratio:.2f}× nondp ({time.basis}), noise {noise}: {verdict}"
        if verdict == "unreliable":
            return Cell(f"{ms:.3g} (unreliable)", ms, "untrusted", f"{hover}: {time.unreliable}")
        if verdict == "beyond noise":
            return Cell(f"{ms:.3g} ({ratio:.2f}×)", ms, hover=hover)
        return Cell(f"{ms:.3g} (~, {noise})" if verdict == "within noise" else f"{ms:.3g} (?)", ms, "untrusted", hover)

    batches = sorted(rows["batch_size"].unique())
    grid = Grid(
        title=f"Step time — {block.title}",
        caption=(
            "median seconds per fused DP step [ms] (×nondp where beyond the timing noise; grey ~: within noise, "
            "?: noise unknown or different thread counts, unreliable: the run could not vouch for it — other load "
            "or disagreeing round pairs, the hover says which)."
        ),
        header=["workload", "method", *(f"B={b}" for b in batches)],
        rows=_pivot(block, rows, overhead, cell),
    )
    return compact(grid, keep=("method",))


def fit_grids(results: Results) -> list[Grid]:
    """One max-batch table per machine × device × training mode of the fit table (case fits and max-batch
    searches), in the order of the first screen's blocks."""
    fits = results.fits
    if fits.empty:
        return []
    key = ["machine", "device", *MODE_COLUMNS]
    known = {(b.machine, b.device, *b.mode): b for b, _ in blocks(results)}
    order = list(known)
    grids = []
    groups = sorted(fits.groupby(key), key=lambda g: order.index(g[0]) if g[0] in known else len(order))
    for (machine, device, *mode), block_fits in groups:
        block = known.get((machine, device, *mode)) or Block(
            str(machine),
            str(device),
            (),
            is_predicted(block_fits.iloc[0]),
            str(block_fits["fit metric"].iloc[0]),
            None,
            **{column: str(value) for column, value in zip(MODE_COLUMNS, mode)},
        )
        grids.append(_fit_grid(block, block_fits))
    return grids


def _fit_grid(block: Block, fits: pd.DataFrame) -> Grid:
    """Fixed and per-sample memory and the max batch of each method of ``block``: measured and predicted in
    separate columns, predictions beyond the extrapolation limit written as bounds; a meta search's row per
    asked budget with its exact answer."""
    exact = (fits["source"] == BUDGET_SOURCE).any()
    measured_words = "largest batch run (predicted)" if block.predicted else "measured max batch"
    if exact:
        measured_words = "max batch" if block.predicted else f"{measured_words} / max batch"
    header = ["workload", "method", "fixed [MiB]", "per sample [MiB]", measured_words, "first failing batch"]
    header += ["predicted max batch", "memory", "fit of", "from"]
    rows = [_fit_row(fit, block.predicted) for _, fit in fits.iterrows()]
    caption = _fit_caption(exact, block.predicted)
    grid = Grid(title=f"Max batch — {block.title}", caption=caption, header=header, rows=rows)
    return compact(grid, keep=("method",))


def _fit_row(fit: pd.Series, predicted_block: bool) -> list[Cell]:
    """One fit-table row as cells: the fit, the measured (or exact) and the predicted max batch, its memory."""
    failing, memory = fit["first failing batch"], fit["memory_bytes"]
    fixed, per_sample = fit["fixed MiB"], fit["per-sample MiB"]
    style = "pred" if predicted_block else ""
    return [
        Cell(fit["workload"], style="label"),
        Cell(fit["method"], style="label"),
        Cell(f"{fixed:g}", float(fixed), style) if present(fixed) else Cell("n/a"),
        Cell(f"{per_sample:g}", float(per_sample), style) if present(per_sample) else Cell("n/a"),
        _measured_max_batch_cell(fit),
        Cell(str(failing), float(failing)) if present(failing) else Cell("none"),
        _predicted_max_batch_cell(fit),
        Cell(size_text(memory), float(memory)) if present(memory) else Cell("n/a"),
        Cell(METRIC_WORDS.get(fit["fit metric"], fit["fit metric"])),
        Cell(fit["source"]),
    ]


def _measured_max_batch_cell(fit: pd.Series) -> Cell:
    """The max batch that ran (≥N: a lower bound), or a meta search's exact answer, in words beside it where it is
    not a plain number."""
    measured, answer = fit["measured max batch"], budget_answer(fit)
    if answer is not None:
        words = f"{fit['method']}: {answer_text(answer)}"
        if answer.max_batch is None:
            none = "nothing fits" if answer.host_limit_batch is None else "none found"
            return Cell(none, style="pred", footnote=words)
        if fit[LOWER_BOUND]:
            return Cell(f"≥{answer.max_batch}", float(answer.max_batch), "pred", footnote=words)
        return Cell(str(answer.max_batch), float(answer.max_batch), "pred", hover=words)
    if present(measured):
        return Cell(f"≥{measured}" if fit[LOWER_BOUND] else str(measured), float(measured))
    return Cell("none", hover="no batch ran ok")


def _predicted_max_batch_cell(fit: pd.Series) -> Cell:
    """The fit's predicted max batch (~N), a bound where it extrapolates too far; empty beside an exact answer."""
    measured, predicted = fit["measured max batch"], fit["predicted max batch"]
    if budget_answer(fit) is not None:
        return Cell("")  # exact under the overhead model: nothing to predict
    if not present(predicted):
        return Cell("n/a")
    factor = extrapolation_factor(predicted, measured)
    text = predicted_max_batch_text(predicted, measured, fit["first failing batch"])
    style = "extrap" if factor is not None else "pred"
    hover = f"the fit predicts {predicted}" + (
        f", ×{factor:.0f} the largest batch run ({measured}): beyond {EXTRAPOLATION_LIMIT}×, an "
        f"extrapolation, so only the bound {EXTRAPOLATION_LIMIT} × {measured} is claimed"
        if factor is not None
        else ""
    )
    return Cell(text if factor is not None else f"~{text}", float(predicted), style, hover)


def _fit_caption(exact: bool, predicted_block: bool) -> str:
    caption = (
        "affine fit peak(B) = fixed + per_sample·B; compare the measured and the predicted max batch (~N: "
        f"predicted; > N (extrapolated ×K): the fit predicts K times the largest batch run, beyond the "
        f"{EXTRAPOLATION_LIMIT}× it is trusted for, so only N = {EXTRAPOLATION_LIMIT} × that batch is claimed)."
    )
    if exact:
        caption = (
            "max batch per asked memory budget, exact under the overhead model: it fits and the next batch was run "
            "and does not (≥N: the search limit, or the host could not draw a larger batch); fixed and per-sample "
            "memory from the affine fit peak(B) = fixed + per_sample·B of the search's steps."
            + ("" if predicted_block else " " + caption)
        )
    return caption
