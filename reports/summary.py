"""The report's first screen: per machine × device, a workload × method matrix and a ranked summary.

The matrix answers "which DP method, how much memory": one row per workload at one stated batch (the largest at
which ``nondp`` ran ok), one column per DP method, the cell its peak memory ×nondp (and step time ×nondp only where
that ratio is beyond its timing noise), OOM / unsupported cells marked with their reason. The ranked summary
answers "what is best, what fits" per workload: lowest memory, fastest DP step, largest batch in the device's
memory, what ran out of memory and what is unsupported. Measured and predicted (meta device,
:func:`reports.load.is_predicted`) results are separate blocks, never mixed in one table.

A predicted block has no measured time; its cells show the *estimated* step time instead, labelled "est." in its
own style (the roofline of the record's work counts on a catalogue GPU, reports/estimates.py), the legend saying
on which GPU and that it is uncalibrated. JAX methods' columns (records ``measurement`` "xla-compiled") come after
the torch methods', the legend saying what their peak is: XLA's compiled buffer assignment, not live tensor bytes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import pandas as pd

from bench.config.sizes import size_text
from bench.messages import first_line
from bench.plan.maxbatch import answer_text

from .estimates import StepEstimate, estimate_words, milliseconds_text, step_estimate
from .grid import Cell, Grid, compact, ratio_colour
from .load import Results, is_predicted
from .tables import (
    BASELINE_METHOD,
    DEFAULT_MODE,
    EXTRAPOLATION_LIMIT,
    LOWER_BOUND,
    MODE_COLUMNS,
    RATIO_COLUMNS,
    TimeComparison,
    budget_answer,
    extrapolation_factor,
    fit_metric_for,
    mode_order,
    one_process,
    present,
    reason_text,
    status_label,
    unreliable_time_reason,
)

__all__ = [
    "METRIC_WORDS",
    "RATIO_TITLE",
    "Block",
    "Matrix",
    "MatrixCell",
    "MatrixRow",
    "MaxBatchEntry",
    "Ranked",
    "blocks",
    "byte_text",
    "matrix_grid",
    "overview",
    "ranked_grid",
    "ranked_summary",
    "short_reason",
    "time_text",
    "workload_order",
]

# fit metric -> its ratio column in the overhead table, and how captions name it
RATIO_TITLE = {figure: title for title, figure in RATIO_COLUMNS.items()}
METRIC_WORDS = {
    "peak_reserved_bytes": "peak reserved (CUDA caching allocator)",
    "peak_tensor_bytes": "peak live tensor bytes",
}
FAMILY_ORDER = ("dit", "dit-plain", "gpt", "other")
RANKED = 3  # entries per ranked column; the matrix holds every method
XLA_COMPILED = "xla-compiled"  # a JAX case's measurement (bench.case.jax_case.MEASUREMENT)
# What each kind of column's peak counts, under a matrix that has JAX columns.
XLA_WORDS = "XLA compiled buffer assignment"
PEAK_KINDS_NOTE = (
    "Not the same quantity: a torch method's peak is the live tensor bytes (tracker) / the CUDA allocator / NVML; "
    "a JAX method's ({jax}) is XLA's compiled buffer assignment of the jitted step (temp + arguments + outputs − "
    'aliases, measurement "xla-compiled"), every buffer at full size for the whole program, and its RSS on CPU; '
    "its ×nondp divides that by torch nondp's figure."
)


def time_text(seconds: float) -> str:
    """A step time as "63.6 ms" / "1.43 s" (3 significant digits)."""
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def byte_text(value: float) -> str:
    """Bytes as "5.16 MiB" / "1.2 GiB" (3 significant digits)."""
    if value >= 2**30:
        return f"{value / 2**30:.3g} GiB"
    return f"{value / 2**20:.3g} MiB"


# ---------------------------------------------------------------------------------------------------------------
# Blocks: one machine × device, measured or predicted
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """The unit every first-screen table and pivot is drawn for: one machine's results on one device."""

    machine: str
    device: str
    device_names: tuple[str, ...]
    predicted: bool
    metric: str  # the peak figure its memory ratios compare (reports.tables.fit_metric_for)
    memory_bytes: float | None  # the device's (GPU) or machine's (CPU) memory
    # the training mode (reports.tables.MODE_COLUMNS): a ratio or a fit across modes would measure the mode too
    precision: str = "fp32"
    checkpointing: str = "none"
    trainable: str = "full"

    @property
    def mode(self) -> tuple[str, str, str]:
        """(precision, checkpointing, trainable), in the order of :data:`reports.tables.MODE_COLUMNS`."""
        return self.precision, self.checkpointing, self.trainable

    @property
    def mode_label(self) -> str:
        """ "" for fp32 without checkpointing, full training; else e.g. "amp-bf16 + blocks checkpointed" or
        "fp32 + lora:r=8 fine-tuning"."""
        if self.mode == DEFAULT_MODE:
            return ""
        parts = [self.precision] + ([f"{self.checkpointing} checkpointed"] if self.checkpointing != "none" else [])
        return " + ".join(parts + ([f"{self.trainable} fine-tuning"] if self.trainable != "full" else []))

    def rows_of(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of ``frame`` (cases, overhead, fits) that belong to this block."""
        mask = (frame["machine"] == self.machine) & (frame["device"] == self.device)
        for column, value in zip(MODE_COLUMNS, self.mode):
            mask &= frame[column] == value
        return frame[mask]

    @property
    def title(self) -> str:
        names = [n for n in self.device_names if n != self.machine]
        where = " · ".join(dict.fromkeys([self.machine, self.device, *([self.mode_label] if self.mode_label else [])]))
        kind = "predicted: exact tensor bytes, nothing allocated or timed" if self.predicted else "measured"
        named = f" ({', '.join(names)})" if names else ""
        return f"{where}{named} — {kind}"


def blocks(results: Results) -> list[tuple[Block, pd.DataFrame]]:
    """Each machine × device × training mode with its one-process case rows (cases on many ranks have their own
    figure): measured before predicted, GPUs before CPUs, then by name, then by training mode
    (:func:`reports.tables.mode_order`: full training first, then the fine-tuning modes by name; fp32 before the
    other precisions, no checkpointing before blocks)."""
    found = []
    key = ["machine", "device", *MODE_COLUMNS]
    for (machine, device, *mode), rows in one_process(results.cases).groupby(key, sort=True):
        memory = rows["device_memory_bytes"].dropna()
        block = Block(
            machine=str(machine),
            device=str(device),
            device_names=tuple(sorted(set(rows["device_name"].dropna()))),
            predicted=is_predicted(rows.iloc[0]),
            metric=fit_metric_for(rows),
            memory_bytes=float(memory.iloc[0]) if len(memory) else None,
            **{column: str(value) for column, value in zip(MODE_COLUMNS, mode)},
        )
        where = (block.predicted, not block.device.startswith("cuda"), block.machine, block.device)
        found.append(((*where, *mode_order(*block.mode)), block, rows))
    return [(block, rows) for _, block, rows in sorted(found, key=lambda f: f[0])]


def workload_order(rows: pd.DataFrame) -> list[str]:
    """Workloads by family (DiT, plain DiT, GPT, other), then size (parameters), then name."""

    def key(workload: str) -> tuple:
        wrows = rows[rows["workload"] == workload]
        family = wrows["family"].iloc[0]
        params = wrows["params_total"].max()
        rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
        return rank, params if present(params) else 0, workload

    return sorted(rows["workload"].unique(), key=key)


def short_reason(reason: str, method: str) -> str:
    """The gist of a failure reason: the library's message without the method prefix, the exception class and
    the diagnosis after " — " (the hover and footnotes keep the whole first line)."""
    text = first_line(reason)
    if text.startswith(f"{method}: "):
        text = text[len(method) + 2 :]
    text = re.sub(r"^[A-Za-z_.]*(Error|Exception|Unsupported|Warning): ", "", text.split(" — ", 1)[0])
    return text if len(text) <= 70 else text[:69] + "…"


# ---------------------------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixCell:
    status: str  # the DP case at the row's batch: ok / oom / unsupported / error, or "not run"
    memory_ratio: float  # the block's peak figure ÷ nondp's (NaN unless both ran ok)
    peak_bytes: float  # NaN unless ok
    time_ratio: float  # NaN unless both ran ok and were timed
    time_noise: float
    time_verdict: str | None  # reports.tables.TIME_VERDICTS
    reason: str
    largest_ok_batch: int | None  # of this method on this workload (an OOM cell says up to where it ran)
    time_basis: str | None = None  # reports.tables.TIME_BASES
    time_unreliable: str = ""  # why the run could not vouch for the time ratio (verdict "unreliable")
    measurement: str = "measured"  # the record's (bench.results.record.MEASUREMENTS): "xla-compiled" for JAX
    estimate: StepEstimate | None = None  # a predicted block's estimated step time (None: measured block)


@dataclass(frozen=True)
class MatrixRow:
    workload: str
    batch_size: int
    nondp_ok: bool  # False: no batch of this workload has an ok nondp case (no ratios in this row)
    nondp_peak_bytes: float
    nondp_time_s: float
    cells: dict[str, MatrixCell]
    nondp_time_unreliable: str = ""  # why the run could not vouch for nondp's own step time, "" when it could
    nondp_estimate: StepEstimate | None = None  # a predicted block's estimated nondp step time


@dataclass(frozen=True)
class Matrix:
    block: Block
    methods: tuple[str, ...]
    rows: tuple[MatrixRow, ...]


def _shown_batch(wrows: pd.DataFrame) -> tuple[int, bool]:
    """(batch, nondp ran ok there): the largest batch where nondp ran ok, else the largest where any method did,
    else the largest tried."""
    base_ok = wrows[(wrows["method"] == BASELINE_METHOD) & (wrows["status"] == "ok")]["batch_size"]
    if len(base_ok):
        return int(base_ok.max()), True
    any_ok = wrows[wrows["status"] == "ok"]["batch_size"]
    return int((any_ok if len(any_ok) else wrows["batch_size"]).max()), False


def _estimate_of(case: pd.Series | None, predicted: bool) -> StepEstimate | None:
    """A predicted block's ok case's estimated step time (reports.estimates.step_estimate), else None."""
    if not predicted or case is None or case["status"] != "ok":
        return None
    return step_estimate(case["record"])


def _matrix_cell(case: pd.Series | None, ratios: pd.Series | None, block: Block, mrows: pd.DataFrame) -> MatrixCell:
    metric = block.metric
    ok_batches = mrows[mrows["status"] == "ok"]["batch_size"]
    largest_ok = int(ok_batches.max()) if len(ok_batches) else None
    if case is None:
        return MatrixCell("not run", math.nan, math.nan, math.nan, math.nan, None, "", largest_ok)
    ok, time = case["status"] == "ok", TimeComparison.of(ratios)
    measurement = case["measurement"] if isinstance(case["measurement"], str) else "measured"
    return MatrixCell(
        status=str(case["status"]),
        memory_ratio=float(ratios[RATIO_TITLE[metric]]) if ratios is not None else math.nan,
        peak_bytes=float(case[metric]) if ok and present(case[metric]) else math.nan,
        time_ratio=time.ratio,
        time_noise=time.noise,
        time_verdict=time.verdict,
        reason=str(case["reason"] or ""),
        largest_ok_batch=largest_ok,
        time_basis=time.basis,
        time_unreliable=time.unreliable,
        measurement=measurement,
        estimate=_estimate_of(case, block.predicted),
    )


def _is_xla(rows: pd.DataFrame, method: str) -> bool:
    """Whether ``method``'s records in ``rows`` are a JAX method's (measurement "xla-compiled")."""
    return bool((rows.loc[rows["method"] == method, "measurement"] == XLA_COMPILED).any())


def overview(results: Results) -> list[Matrix]:
    """One matrix per machine × device × training mode (see the module docstring)."""
    matrices = []
    for block, rows in blocks(results):
        overhead = block.rows_of(one_process(results.overhead))
        # the torch methods, then the JAX ones (their peak is another quantity: the legend says which)
        methods = tuple(sorted(set(rows["method"]) - {BASELINE_METHOD}, key=lambda m: (_is_xla(rows, m), m)))
        matrix_rows = []
        for workload in workload_order(rows):
            wrows = rows[rows["workload"] == workload]
            batch, nondp_ok = _shown_batch(wrows)
            at = wrows[wrows["batch_size"] == batch].set_index("method")
            ratios = overhead[(overhead["workload"] == workload) & (overhead["batch_size"] == batch)]
            ratios = ratios.set_index("method")
            cells = {
                m: _matrix_cell(
                    at.loc[m] if m in at.index else None,
                    ratios.loc[m] if m in ratios.index else None,
                    block,
                    wrows[wrows["method"] == m],
                )
                for m in methods
            }
            base = at.loc[BASELINE_METHOD] if nondp_ok else None
            matrix_rows.append(
                MatrixRow(
                    workload=workload,
                    batch_size=batch,
                    nondp_ok=nondp_ok,
                    nondp_peak_bytes=float(base[block.metric]) if base is not None else math.nan,
                    nondp_time_s=(
                        float(base["time_median_s"])  # meta and untimed cases: NaN, shown as not timed
                        if base is not None and present(base["time_median_s"])
                        else math.nan
                    ),
                    cells=cells,
                    nondp_time_unreliable=unreliable_time_reason(base) if base is not None else "",
                    nondp_estimate=_estimate_of(base, block.predicted),
                )
            )
        if methods:
            matrices.append(Matrix(block, methods, tuple(matrix_rows)))
    return matrices


def _time_sub(cell: MatrixCell) -> tuple[str, str]:
    """(the cell's step-time line, its hover): the ratio only when beyond its noise and reliable."""
    if not present(cell.time_ratio):
        return "", "step time: not timed"
    noise = f"±{cell.time_noise:.0%}" if present(cell.time_noise) else "unknown"
    raw = f"median step {cell.time_ratio:.2f}× nondp ({cell.time_basis}), noise {noise}"
    if cell.time_verdict == "unreliable":
        return "t unreliable", f"{raw}: unreliable, not ranked: {cell.time_unreliable}"
    if cell.time_verdict == "beyond noise":
        return f"t {cell.time_ratio:.2f}×", f"{raw}: beyond noise"
    if cell.time_verdict == "within noise":
        return "t ~", f"{raw}: within noise, the step times cannot be told apart"
    return "t ?", f"{raw}: {cell.time_verdict or 'noise unknown'}, not compared"


def _matrix_cell_grid(cell: MatrixCell, method: str, row: MatrixRow, block: Block, best: bool) -> Cell:
    where = f"{method} on {row.workload} at batch {row.batch_size}"
    if cell.status == "not run":
        return Cell("—", hover=f"{where}: not run")
    if cell.status != "ok":
        ran = f"ran ok up to batch {cell.largest_ok_batch}" if cell.largest_ok_batch else "no batch ran ok"
        footnote = f"{where}: {status_label(cell.status)}: {reason_text(cell.reason) or 'no reason recorded'}"
        return Cell(status_label(cell.status), style=cell.status, footnote=footnote, hover=ran)
    if not present(cell.memory_ratio):
        peak = byte_text(cell.peak_bytes) if present(cell.peak_bytes) else "n/a"
        return Cell("no nondp", style="untrusted", hover=f"{where}: {peak}, no ok nondp case to divide by")
    sub, time_hover = _estimate_sub(cell, row) if block.predicted else _time_sub(cell)
    words = XLA_WORDS if cell.measurement == XLA_COMPILED else METRIC_WORDS[block.metric]
    hover = (
        f"{where}: {words} {byte_text(cell.peak_bytes)} = {cell.memory_ratio:.3f}× nondp "
        f"({byte_text(row.nondp_peak_bytes)})" + (f"; {time_hover}" if time_hover else "")
    )
    styles = " ".join(s for s in ("best" if best else "", "pred" if block.predicted else "") if s)
    return Cell(
        f"{cell.memory_ratio:.2f}×",
        cell.memory_ratio,
        style=styles,
        hover=hover,
        color=ratio_colour(cell.memory_ratio),
        sub=sub,
        sub_style="est" if block.predicted and sub else "",
    )


def estimate_text(estimate: StepEstimate, ratio: float | None = None) -> str:
    """ "est. 12.3 ms (×1.90)": an estimated step time (and its ratio to nondp's), never written like a measured
    one."""
    return f"est. {milliseconds_text(estimate.seconds)} ms" + (f" (×{ratio:.2f})" if ratio is not None else "")


def _estimate_sub(cell: MatrixCell, row: MatrixRow) -> tuple[str, str]:
    """(a predicted cell's estimated-time line, its hover)."""
    estimate = cell.estimate
    if estimate is None:
        return "", ""
    if estimate.seconds is None:  # said once in the legend, not in every cell
        return "", f"no step-time estimate: {estimate.reason}"
    ratio = estimate.over(row.nondp_estimate)
    kind = "calibrated" if estimate.calibrated else "uncalibrated"
    times = f" = {ratio:.2f}× nondp's" if ratio is not None else ""
    hover = f"estimated step {time_text(estimate.seconds)}{times} on {estimate.gpu} ({kind})"
    return estimate_text(estimate, ratio), hover


def matrix_grid(matrix: Matrix) -> Grid:
    """The matrix as a table: a row label with the batch and nondp's figures, one coloured cell per method."""
    block = matrix.block
    rows = []
    for row in matrix.rows:
        label_sub = f"B={row.batch_size}"
        if row.nondp_ok:
            label_sub += f" · nondp {byte_text(row.nondp_peak_bytes)}"
            if present(row.nondp_time_s) and not block.predicted:
                label_sub += f", {time_text(row.nondp_time_s)}" + (" (unreliable)" if row.nondp_time_unreliable else "")
            elif not block.predicted:
                label_sub += ", not timed"
            elif row.nondp_estimate is not None and row.nondp_estimate.seconds is not None:
                label_sub += f", {estimate_text(row.nondp_estimate)}"
        else:
            label_sub += " · nondp did not run ok"
        hover = f"nondp step time unreliable: {row.nondp_time_unreliable}" if row.nondp_time_unreliable else ""
        label = Cell(row.workload, style="label", sub=label_sub, hover=hover)
        ratios = [c.memory_ratio for c in row.cells.values() if c.status == "ok" and present(c.memory_ratio)]
        lowest = min(ratios) if ratios else None
        rows.append(
            [label]
            + [
                _matrix_cell_grid(row.cells[m], m, row, block, best=row.cells[m].memory_ratio == lowest)
                for m in matrix.methods
            ]
        )
    time_words = (
        ""
        if block.predicted
        else (
            " t = step time ×nondp (each DP round over the non-DP rounds either side of it, in the same case; older "
            "records: the two cases' medians), shown only beyond its timing noise (t ~: within noise; t ?: noise "
            "unknown or different thread counts; t unreliable: the run could not vouch for it — other load, or "
            "round pairs that disagree; the hover says which)."
        )
    )
    return Grid(
        title=block.title,
        caption=(
            f"{METRIC_WORDS[block.metric]} ×nondp at the batch in the row label (the largest at which nondp ran ok); "
            "lower is better, outlined = lowest of the row."
        ),
        header=["workload · batch", *matrix.methods],
        rows=rows,
        kind="matrix",
        legend=(
            "Colour: blue below 1× (less memory than non-DP), red above, log scale saturating at ¼× and 4×."
            + time_words
            + _estimate_legend(matrix)
            + " OOM / unsupported: the reason is in the footnote (hover in the HTML)."
            + _peak_kinds_legend(matrix)
        ),
    )


def _estimate_legend(matrix: Matrix) -> str:
    """A predicted matrix's words on its estimated times: what they rest on, and that nothing was timed."""
    if not matrix.block.predicted:
        return ""
    estimates = [e for row in matrix.rows for e in (row.nondp_estimate, *(c.estimate for c in row.cells.values()))]
    estimates = [e for e in estimates if e is not None]
    if not any(e.seconds is not None for e in estimates):
        missing = sorted({e.reason for e in estimates})
        return f" No step-time estimate ({'; '.join(missing)})." if missing else ""
    return (
        " est. = the step time the roofline model gives for the case's exact work counts (×nondp's estimate), "
        f"{estimate_words(estimates)}: a prediction, nothing was timed."
    )


def _peak_kinds_legend(matrix: Matrix) -> str:
    """Under a matrix with JAX columns: what each kind of column's peak counts (:data:`PEAK_KINDS_NOTE`)."""
    jax = [m for m in matrix.methods if any(row.cells[m].measurement == XLA_COMPILED for row in matrix.rows)]
    return " " + PEAK_KINDS_NOTE.format(jax=", ".join(jax)) if jax else ""


# ---------------------------------------------------------------------------------------------------------------
# The ranked summary
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaxBatchEntry:
    method: str
    largest_run: int | None  # the largest batch that ran ok (measured, or predicted on a predicted block)
    next_failed: bool  # the next batch tried failed: largest_run is the measured max batch
    predicted: int | None  # the affine fit's max batch in the device's memory
    # a meta search's budget and its answer in words (bench.plan.maxbatch.answer_text): largest_run is exact there
    budget_bytes: int | None = None
    exact_words: str | None = None

    @property
    def rank_value(self) -> float:
        if self.next_failed and self.largest_run is not None:
            return float(self.largest_run)
        if self.predicted is not None:
            return float(self.predicted)
        return float(self.largest_run or 0)


@dataclass(frozen=True)
class Ranked:
    workload: str
    batch_size: int
    lowest_memory: tuple[tuple[str, float], ...]  # (method, memory ratio), lowest first
    fastest: tuple[tuple[str, float], ...]  # (method, time ratio) beyond noise and reliable only, fastest first
    untimed: tuple[str, ...]  # methods ok whose time ratio is neither beyond noise nor unreliable (not ranked)
    timed: bool  # some method ok at this batch has a step-time ratio (False: nothing was timed, e.g. meta)
    largest_batch: tuple[MaxBatchEntry, ...]  # DP methods, largest first
    nondp_batch: MaxBatchEntry | None
    oom: tuple[tuple[str, int | None], ...]  # (method, largest ok batch) OOM at the shown batch
    failed: tuple[tuple[str, str, str], ...]  # (method, status, reason) unsupported / error on this workload
    unreliable: tuple[tuple[str, str], ...] = ()  # (method, why) ok, its time ratio unreliable (not ranked)
    xla_methods: tuple[str, ...] = ()  # JAX methods: their memory ratio is of XLA's compiled bytes ("(XLA)")


def _max_batch_entries(fits: pd.DataFrame, workload: str) -> dict[str, MaxBatchEntry]:
    """Per method, its max batch on ``workload``: a meta search's answer for its largest budget (the fit table
    orders a method's budgets by size)."""
    entries = {}
    for _, fit in fits[fits["workload"] == workload].iterrows():
        measured, predicted = fit["measured max batch"], fit["predicted max batch"]
        entries[fit["method"]] = MaxBatchEntry(
            method=fit["method"],
            largest_run=int(measured) if present(measured) else None,
            next_failed=present(measured) and not fit[LOWER_BOUND],
            predicted=int(predicted) if present(predicted) else None,
            budget_bytes=answer.budget_bytes if (answer := budget_answer(fit)) is not None else None,
            exact_words=answer_text(answer) if answer is not None else None,
        )
    return entries


def ranked_summary(results: Results, matrix: Matrix) -> list[Ranked]:
    """Per workload row of ``matrix``: the methods ranked by memory, by trusted step time and by max batch."""
    block = matrix.block
    fits = results.fits
    fits = block.rows_of(fits) if len(fits) else fits
    cases = block.rows_of(one_process(results.cases))
    ranked = []
    for row in matrix.rows:
        ok = {m: c for m, c in row.cells.items() if c.status == "ok"}
        memory = sorted((c.memory_ratio, m) for m, c in ok.items() if present(c.memory_ratio))
        trusted = sorted((c.time_ratio, m) for m, c in ok.items() if c.time_verdict == "beyond noise")
        unreliable = {m: c.time_unreliable for m, c in ok.items() if c.time_verdict == "unreliable"}
        entries = _max_batch_entries(fits, row.workload) if len(fits) else {}
        dp_entries = [e for m, e in entries.items() if m != BASELINE_METHOD]
        wcases = cases[(cases["workload"] == row.workload) & cases["status"].isin(["unsupported", "error"])]
        failed = {(c["method"], c["status"]): reason_text(c["reason"] or "") for _, c in wcases.iterrows()}
        ranked.append(
            Ranked(
                workload=row.workload,
                batch_size=row.batch_size,
                lowest_memory=tuple((m, r) for r, m in memory),
                fastest=tuple((m, r) for r, m in trusted),
                untimed=tuple(sorted(set(ok) - {m for _, m in trusted} - set(unreliable))),
                timed=any(present(c.time_ratio) for c in ok.values()),
                largest_batch=tuple(sorted(dp_entries, key=lambda e: (-e.rank_value, e.method))),
                nondp_batch=entries.get(BASELINE_METHOD),
                oom=tuple((m, c.largest_ok_batch) for m, c in sorted(row.cells.items()) if c.status == "oom"),
                failed=tuple((m, s, reason) for (m, s), reason in sorted(failed.items())),
                unreliable=tuple(sorted(unreliable.items())),
                xla_methods=tuple(m for m, c in row.cells.items() if c.measurement == XLA_COMPILED),
            )
        )
    return ranked


def _max_batch_text(entry: MaxBatchEntry) -> tuple[str, str, str]:
    """(text, style, hover) of a max batch: measured "600" (the next batch failed), predicted "~619", beyond the
    extrapolation limit "> 64", measured lower bound "≥16"."""
    if entry.exact_words is not None:
        text = "none" if entry.largest_run is None else f"{'' if entry.next_failed else '≥'}{entry.largest_run}"
        return text, "pred", f"exact under the overhead model: {entry.exact_words}"
    if entry.largest_run is None:
        return "none ran", "", "no batch ran ok"
    if entry.next_failed:
        return f"{entry.largest_run}", "", f"measured: batch {entry.largest_run} ran ok, the next one tried failed"
    factor = extrapolation_factor(entry.predicted, entry.largest_run)
    if entry.predicted is not None and factor is None:
        return f"~{entry.predicted}", "pred", f"predicted by the affine fit (largest batch run: {entry.largest_run})"
    if entry.predicted is not None and entry.largest_run:
        bound = EXTRAPOLATION_LIMIT * entry.largest_run
        return (
            f"> {bound}",
            "extrap",
            f"the fit predicts {entry.predicted} (×{factor:.0f} the largest batch run, {entry.largest_run}): an "
            f"extrapolation beyond {EXTRAPOLATION_LIMIT}×, shown only as a bound",
        )
    return f"≥{entry.largest_run}", "", "measured lower bound: no larger batch was tried or failed"


def _entries_cell(parts: list[tuple[str, str, str]], empty: str, footnote: str = "") -> Cell:
    """A ranked cell: "a 1.02× · b 1.05× · c 1.3×" (top RANKED), the hovers joined."""
    if not parts:
        return Cell(empty, style="untrusted" if empty else "", footnote=footnote)
    shown = parts[:RANKED]
    styles = {s for _, s, _ in shown}
    hover = "; ".join(f"{t}: {h}" for t, _, h in parts if h)
    return Cell(
        " · ".join(p[0] for p in shown),
        style=styles.pop() if len(styles) == 1 else "",
        hover=hover,
        footnote=footnote,
        spans=tuple((t, s) for t, s, _ in shown) if len(styles) > 1 else (),
    )


def _fastest_cell(fastest: list[tuple[str, str, str]], untimed: str, unreliable: str, why: str, timed: bool) -> Cell:
    """The "fastest DP step" cell: reliable ratios beyond noise, ranked; below, the methods whose ratio the run
    could not vouch for (the hover says why); "not timed" when nothing at this batch was (meta)."""
    empty = "none beyond timing noise" if timed else "not timed"
    cell = _entries_cell(fastest, empty, footnote=untimed if not fastest and timed else "")
    if not unreliable:
        return cell
    return dataclasses.replace(cell, sub=unreliable, hover="; ".join(h for h in (cell.hover, why) if h))


def _batch_cell(r: Ranked) -> Cell:
    """The "largest batch" cell: the DP methods by max batch (top RANKED), nondp's below; when every one is the
    same extrapolated bound, that bound once (a ranking of extrapolations would say nothing)."""
    texts = {e.method: _max_batch_text(e) for e in (*r.largest_batch, *([r.nondp_batch] if r.nondp_batch else []))}
    if not texts:
        return Cell("")
    if len({(text, style) for text, style, _ in texts.values()}) == 1 and next(iter(texts.values()))[1] == "extrap":
        text, _, _ = next(iter(texts.values()))
        hover = "; ".join(f"{m}: {h}" for m, (_, _, h) in texts.items())
        return Cell(f"every method {text}", style="extrap", hover=hover, sub="fit extrapolated: not ranked")
    cell = _entries_cell([(f"{e.method} {texts[e.method][0]}", *texts[e.method][1:]) for e in r.largest_batch], "")
    if r.nondp_batch is None:
        return cell
    return dataclasses.replace(cell, sub=f"nondp {texts[r.nondp_batch.method][0]}")


def ranked_grid(block: Block, ranked: list[Ranked]) -> Grid:
    """The ranked summary as a table, one row per workload; empty columns left out (named in the caption)."""
    memory_title = f"largest batch in {byte_text(block.memory_bytes)}" if block.memory_bytes else "largest batch"
    budgets = {e.budget_bytes for r in ranked for e in (*r.largest_batch, r.nondp_batch) if e is not None}
    if not block.memory_bytes and len(budgets) == 1 and None not in budgets:  # a meta search's one budget
        memory_title = f"largest batch in {size_text(budgets.pop())} (exact)"
    header = ["workload · batch", "lowest memory (×nondp)", "fastest DP step (×nondp)", memory_title]
    header += ["OOM at this batch", "unsupported / error"]
    rows = []
    for r in ranked:
        memory = [(f"{m} {v:.2f}×" + (" (XLA)" if m in r.xla_methods else ""), "", "") for m, v in r.lowest_memory]
        fastest = [(f"{m} {v:.2f}×", "", "beyond timing noise") for m, v in r.fastest]
        untimed = f"{len(r.untimed)} within noise or not comparable: {', '.join(r.untimed)}" if r.untimed else ""
        unreliable = f"unreliable, not ranked: {', '.join(m for m, _ in r.unreliable)}" if r.unreliable else ""
        why = "; ".join(f"{m}: {reason}" for m, reason in r.unreliable)
        batch_cell = _batch_cell(r)
        oom = [(f"{m} (ok ≤ {b})" if b else f"{m} (no batch ok)", "oom", "") for m, b in r.oom]
        by_reason: dict[str, list[str]] = {}
        for method, status, reason in r.failed:
            gist = short_reason(reason, method) if status == "unsupported" else "error"
            by_reason.setdefault(gist, []).append(method)
        failed = [(f"{', '.join(ms)}: {gist}", "unsupported", "") for gist, ms in by_reason.items()]
        footnotes = "; ".join(f"{m} ({s}): {reason}" for m, s, reason in r.failed)
        rows.append(
            [
                Cell(r.workload, style="label", sub=f"B={r.batch_size}"),
                _entries_cell(memory, "no ratio"),
                _fastest_cell(fastest, untimed, unreliable, why, r.timed),
                batch_cell,
                _entries_cell(oom, ""),
                Cell(" · ".join(t for t, _, _ in failed), style="unsupported" if failed else "", footnote=footnotes),
            ]
        )
    if block.predicted:  # nothing was timed
        header.pop(2)
        rows = [row[:2] + row[3:] for row in rows]
    grid = Grid(
        title=f"Ranked per workload — {block.title}",
        caption=f"Top {RANKED} per column at the matrix's batch; ratios of {METRIC_WORDS[block.metric]}.",
        header=header,
        rows=rows,
        kind="ranked",
        legend=(
            "Largest batch: N measured (the next batch tried failed) · ≥N measured, nothing larger tried · ~N "
            "predicted by the affine fit peak(B) = fixed + per_sample·B · > N the fit predicts more than "
            f"{EXTRAPOLATION_LIMIT}× the largest batch run: an extrapolation, shown only as that bound. On meta, "
            "a max-batch search's exact answer for its largest --memory-budget (under the overhead model)."
        ),
    )
    return compact(grid, keep=tuple(header[:-2]))  # the ranked columns stay even when they read the same
