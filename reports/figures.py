"""Figures from the loaded results (matplotlib, Agg backend), each saved as PNG and SVG.

Every figure is produced only when its data exist; otherwise :func:`render_figures` returns it as skipped with
the reason, and the report says so. Byte axes are in MiB or GiB (whichever reads better), time in ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (CI, headless GPU runners)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from bench.config.sizes import size_text
from bench.results.record import CATEGORIES, CaseRecord

from .load import Results, is_predicted
from .summary import Block, blocks, workload_order
from .tables import (
    BUDGET_SOURCE,
    DEFAULT_MODE,
    EXTRAPOLATION_LIMIT,
    LOWER_BOUND,
    MODE_COLUMNS,
    ONE_PROCESS,
    all_ok_batches,
    extrapolation_factor,
    fit_metric_for,
    mode_label,
    mode_order,
    one_process,
)

__all__ = ["FIGURES", "FigureOptions", "FigureResult", "SkipFigure", "choose_case", "render_figures"]

METRIC_TITLES = {
    "peak_reserved_bytes": "peak reserved (CUDA allocator)",
    "peak_allocated_bytes": "peak allocated (CUDA allocator)",
    "peak_tensor_bytes": "peak live tensor bytes",
}
PHASE_COLORS = {
    "forward": "#8dd3c7",
    "backward": "#fb8072",
    "clip": "#bebada",
    "noise": "#ffffb3",
    "optimizer": "#80b1d3",
}
TRACE_STYLES = {  # Timeline field -> (label, color)
    "tensor_bytes": ("live tensors (tracker)", "tab:blue"),
    "allocated_bytes": ("CUDA allocated", "tab:green"),
    "nvml_used_bytes": ("NVML device used", "tab:red"),
    "rss_bytes": ("process RSS", "tab:purple"),
}
# Whole-process / whole-device traces sit on a large baseline (CUDA context, libraries, the interpreter):
# drawn against a right-hand axis of their own so the step's own traces stay readable on the left.
WHOLE_PROCESS_TRACES = ("nvml_used_bytes", "rss_bytes")
# The report shows a figure at most PAGE_WIDTH_IN × DPI pixels wide (report.html's page is 1360 px): wider ones
# would be shrunk until their 8-point labels cannot be read.
DPI = 110
PAGE_WIDTH_IN = 12.0
MARKERS = "osD^vP*Xh<>"
LINESTYLES = ("-", "--", "-.", ":")
MIN_TRACE_SPAN_BYTES = 2**20  # a timeline's memory axis spans at least 1 MiB: smaller wiggles stay small
BLOCK_KEY = ("machine", "device", *MODE_COLUMNS)  # one block of the tables
COINCIDE_FRACTION = 0.01  # two lines closer than 1 % of their axis' span look like one
COINCIDING_NOTE = (
    "{what} drawn over another method's is hollow and named in its panel (A = B: the same values; A ≈ B: within "
    "1 % of the axis)"
)


class SkipFigure(Exception):
    """Raised by a figure function when its data do not exist; the message is the reason shown in the report."""


@dataclass
class FigureOptions:
    workload: str | None = None  # breakdown/timeline case; default: see choose_case
    batch_size: int | None = None


@dataclass
class FigureResult:
    name: str
    title: str
    paths: list[Path] = field(default_factory=list)  # PNG first, then SVG
    skipped: str | None = None
    caption: str = ""
    width_px: int = 0  # the PNG's width: report.html shows a figure wider than its side column under the tables

    @property
    def png(self) -> Path | None:
        return next((p for p in self.paths if p.suffix == ".png"), None)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def byte_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, name): GiB from 1 GiB up, else MiB."""
    return (2.0**30, "GiB") if max_bytes >= 2**30 else (2.0**20, "MiB")


def _method_colors(results: Results) -> dict[str, str]:
    """One color per method of the whole result set, so a method has the same color in every figure."""
    cmap = plt.get_cmap("tab10")
    methods = set(results.cases["method"]) | set(results.max_batches["method"])
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def _method_styles(results: Results) -> dict[str, dict]:
    """Color, marker and line style per method: methods whose lines coincide (bk and bk-tiled, Opacus' hooks and
    functorch modes often peak at the same bytes) stay told apart by their markers and dashes."""
    return {
        method: {"color": color, "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}
        for i, (method, color) in enumerate(_method_colors(results).items())
    }


def coinciding(lines: dict[str, tuple[list, list]], span: float) -> dict[str, tuple[str, bool]]:
    """Lines that would hide an earlier one: method -> (the first method in ``lines``' order whose line has the
    same x values and every y within COINCIDE_FRACTION of the axis' ``span``, whether every y is the same)."""
    same: dict[str, tuple[str, bool]] = {}
    for i, (method, (xs, ys)) in enumerate(lines.items()):
        for other, (oxs, oys) in list(lines.items())[:i]:
            if other in same or len(xs) == 0 or list(xs) != list(oxs):
                continue
            gaps = np.abs(np.asarray(ys, dtype=float) - np.asarray(oys, dtype=float))
            if np.all(gaps <= COINCIDE_FRACTION * span):
                same[method] = (other, bool(np.all(gaps == 0)))
                break
    return same


def _name_coinciding(ax, same: dict[str, tuple[str, bool]]) -> None:
    """Say in the panel which methods' lines or points lie over which (:func:`coinciding`), top left."""
    if same:
        words = [f"{method} {'=' if exact else '≈'} {other}" for method, (other, exact) in same.items()]
        box = {"facecolor": "white", "alpha": 0.8, "lw": 0}
        ax.text(0.02, 0.97, "\n".join(words), transform=ax.transAxes, va="top", fontsize=7, bbox=box)


def _legend_below(fig: plt.Figure, handles, labels, ncol: int) -> float:
    """A figure-wide legend under the panels; returns the bottom margin (figure fraction) to keep free for it,
    sized in inches so it fits one-row figures as well as tall grids."""
    ncol = max(1, min(ncol, len(labels)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    rows = math.ceil(len(labels) / ncol)
    return min(0.45, (0.2 + 0.22 * rows) / fig.get_size_inches()[1])


def _set_min_span(ax, traces, min_span: float, scale: float) -> float:
    """Y limits of ``ax`` around the traces (bytes, drawn divided by ``scale``), at least ``min_span`` bytes tall,
    centred on them; returns the span in bytes (``min_span`` when there are no traces)."""
    traces = list(traces)
    if not traces:
        return min_span
    low, high = min(float(v.min()) for v in traces), max(float(v.max()) for v in traces)
    span = max(high - low, min_span)
    middle, margin = (low + high) / 2, 0.05 * span
    ax.set_ylim((middle - span / 2 - margin) / scale, (middle + span / 2 + margin) / scale)
    return span


def _grid(n: int, ncols: int = 3, size=(5.0, 3.6), sharex: bool = False):
    """``n`` panels of ``size`` inches, ``ncols`` to a row, narrowed to PAGE_WIDTH_IN in all."""
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    width = min(size[0] * ncols, PAGE_WIDTH_IN)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, size[1] * nrows), squeeze=False, sharex=sharex)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def where_label(
    machine: str,
    device: str,
    predicted: bool,
    precision: str = "fp32",
    checkpointing: str = "none",
    trainable: str = "full",
) -> str:
    """ "a100 · cuda:0", "AMD EPYC · cpu · amp-bf16+blocks+lora:r=8", "runner · meta (predicted)": how a figure
    names a panel or a series, so GPU, CPU, predicted figures and training modes are never drawn unnamed on one
    axis (the mode: :func:`reports.tables.mode_label`, nothing for fp32 without checkpointing, full training)."""
    mode = mode_label(precision, checkpointing, trainable)
    where = " · ".join(dict.fromkeys([str(machine), str(device), *([mode] if mode else [])]))
    return f"{where} (predicted)" if predicted else where


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` that were measured (not :func:`reports.load.is_predicted`)."""
    if frame.empty:
        return frame
    return frame[~frame.apply(is_predicted, axis=1)]


@dataclass(frozen=True)
class ChosenCase:
    machine: str
    device: str
    workload: str
    batch: int
    predicted: bool
    precision: str = "fp32"
    checkpointing: str = "none"
    trainable: str = "full"

    @property
    def mode(self) -> tuple[str, str, str]:
        """(precision, checkpointing, trainable), in the order of :data:`reports.tables.MODE_COLUMNS`."""
        return self.precision, self.checkpointing, self.trainable

    @property
    def label(self) -> str:
        where = where_label(self.machine, self.device, self.predicted, *self.mode)
        return f"{self.workload}, batch {self.batch}, {where}"


def choose_case(results: Results, options: FigureOptions) -> ChosenCase:
    """The machine × device, workload and batch of the breakdown and timeline figures (measured cases first;
    predicted ones only when nothing was measured).

    Given workload/batch are used as they are; the default batch is the largest one at which every method of
    that workload ran ok, the default workload the one with the most methods (then by name)."""
    cases = one_process(results.cases)
    if cases.empty:
        raise SkipFigure("no one-process case rows in the input")
    measured = _measured(cases)
    pool = measured if len(measured) else cases
    pool = pool if options.workload is None else pool[pool["workload"] == options.workload]
    if pool.empty:
        raise SkipFigure(f"workload {options.workload!r} is not in the results")
    candidates = []
    keys = ["machine", "device", "workload", *MODE_COLUMNS]
    for (machine, device, workload, *mode), group in pool.groupby(keys, sort=True):
        methods = group["method"].nunique()
        # the tables' order of modes: fp32 without checkpointing, full training first
        where = (workload, machine, device, mode_order(*mode), tuple(mode))
        if options.batch_size is not None:
            if (group["batch_size"] == options.batch_size).any():
                candidates.append((-methods, *where, options.batch_size))
            continue
        all_ok = all_ok_batches(group)
        if all_ok:
            candidates.append((-methods, *where, max(all_ok)))
    if not candidates:
        what = (
            f"batch {options.batch_size}"
            if options.batch_size is not None
            else "a batch size at which every method ran ok"
        )
        raise SkipFigure(f"no workload has {what}")
    _, workload, machine, device, _, mode, batch = sorted(candidates)[0]
    return ChosenCase(machine, device, workload, int(batch), is_predicted({"device": device}), *mode)


def _case_rows(results: Results, chosen: ChosenCase) -> pd.DataFrame:
    c = one_process(results.cases)
    at = (c["machine"] == chosen.machine) & (c["device"] == chosen.device) & (c["workload"] == chosen.workload)
    for column, value in zip(MODE_COLUMNS, chosen.mode):
        at &= c[column] == value
    return c[at & (c["batch_size"] == chosen.batch)].sort_values("method")


# ---------------------------------------------------------------------------------------------------------------
# 1. Peak memory vs batch size
# ---------------------------------------------------------------------------------------------------------------
def fig_peak_vs_batch(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    # panels in the tables' order: machine × device × training mode blocks, workloads by family and size
    panels = [
        (block, workload, rows[(rows["workload"] == workload) & rows["status"].isin(["ok", "oom"])])
        for block, rows in blocks(results)
        for workload in workload_order(rows)
    ]
    panels = [panel for panel in panels if len(panel[2])]
    if not panels:
        raise SkipFigure("no one-process ok or OOM cases")
    styles = _method_styles(results)
    per_block = max(sum(1 for b, _, _ in panels if b == block) for block, _, _ in panels)
    fig, axes = _grid(len(panels), ncols=min(3, per_block), size=(4.0, 3.2))
    any_oom = any_coinciding = False
    for ax, (block, workload, rows) in zip(axes, panels):
        oom, same = _peak_panel(ax, block, workload, rows, styles)
        any_oom, any_coinciding = any_oom or oom, any_coinciding or same
    any_predicted = any(block.predicted for block, _, _ in panels)
    bottom = _peak_legend(fig, axes, styles, any_oom, any_predicted)
    fig.suptitle("Peak memory vs batch size, by method")
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    notes = [
        *(["× = OOM"] if any_oom else []),
        *(["dashed, hollow = predicted"] if any_predicted else []),
        *([COINCIDING_NOTE.format(what="a line")] if any_coinciding else []),
    ]
    return fig, (
        "Look at the slopes: the memory each method adds per sample; the steepest line runs out of memory first. "
        "One panel per workload, machine · device and training mode, in the tables' order"
        + "".join(f"; {note}" for note in notes)
        + "."
    )


def _peak_panel(ax: plt.Axes, block: Block, workload: str, rows: pd.DataFrame, styles: dict) -> tuple[bool, bool]:
    """One workload's peak-vs-batch lines in one block; (an OOM was drawn, two lines coincide)."""
    metric = fit_metric_for(rows)
    ok = rows[(rows["status"] == "ok") & rows[metric].notna()]
    top = float(ok[metric].max()) if len(ok) else 2.0**20
    scale, unit = byte_unit(top)
    lines = {
        method: (list(good["batch_size"]), list(good[metric] / scale))
        for method, mrows in rows.groupby("method", sort=True)
        for good in [ok[ok["method"] == method].sort_values("batch_size")]
    }
    span = (top - float(ok[metric].min())) / scale if len(ok) else 1.0
    same = coinciding(lines, span or top / scale)
    any_oom = False
    for method, (batches, values) in lines.items():
        style = dict(styles[method])
        if block.predicted:
            style["linestyle"] = "--"
        # a line drawn over an identical one: hollow and larger, so the one underneath shows through it
        hollow = block.predicted or method in same
        marker = {"markerfacecolor": "none", "markersize": 9 if method in same else 6} if hollow else {}
        ax.plot(batches, values, label=method, **style, **marker)
        oom = rows[(rows["method"] == method) & (rows["status"] == "oom")]
        if len(oom):
            any_oom = True
            ax.scatter(oom["batch_size"], [top * 1.08 / scale] * len(oom), marker="x", s=70, color=style["color"])
    _name_coinciding(ax, same)
    ax.set_xscale("log", base=2)
    where = where_label(block.machine, block.device, block.predicted, *block.mode)
    ax.set_title(f"{workload}\n{where}", fontsize=9)
    ax.set_xlabel("batch size", fontsize=8)
    ax.set_ylabel(f"{METRIC_TITLES[metric]} [{unit}]", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    return any_oom, bool(same)


def _peak_legend(fig: plt.Figure, axes: list, styles: dict, any_oom: bool, any_predicted: bool) -> float:
    """The methods' legend below the panels (one entry per method, then the OOM and predicted keys); its top."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, plt.Line2D([], [], **styles[label]) if label in styles else handle)
    seen = dict(sorted(seen.items()))
    if any_oom:
        seen["OOM (×, drawn above the top)"] = plt.Line2D([], [], marker="x", linestyle="", color="k")
    if any_predicted:
        seen["predicted (meta device, dashed)"] = plt.Line2D([], [], marker="o", linestyle="--", color="k", mfc="none")
    return _legend_below(fig, list(seen.values()), list(seen.keys()), ncol=5)


# ---------------------------------------------------------------------------------------------------------------
# 2. Breakdown at the peak
# ---------------------------------------------------------------------------------------------------------------
def fig_breakdown(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    chosen = choose_case(results, options)
    rows = _case_rows(results, chosen)
    rows = rows[(rows["status"] == "ok")]
    records = [r for r in rows["record"] if r.memory.breakdown]
    if not records:
        raise SkipFigure(f"no breakdown at peak recorded for {chosen.workload} batch {chosen.batch}")
    scale, unit = byte_unit(max(sum(r.memory.breakdown.values()) for r in records))
    fig, ax = plt.subplots(figsize=(min(PAGE_WIDTH_IN, max(5.0, 1.2 * len(records) + 2)), 4.5))
    x = np.arange(len(records))
    bottom = np.zeros(len(records))
    cmap = plt.get_cmap("Set2")
    for i, category in enumerate(CATEGORIES):
        heights = np.array([r.memory.breakdown.get(category, 0) for r in records], dtype=float) / scale
        ax.bar(x, heights, bottom=bottom, label=category.replace("_", " "), color=cmap(i))
        bottom += heights
    ax.set_xticks(x, [r.method for r in records], rotation=20, ha="right")
    ax.set_ylabel(f"live tensor bytes at peak [{unit}]")
    ax.set_title(f"Memory at the peak by category — {chosen.label}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig, (
        f"What fills memory at each method's peak ({chosen.label}): compare the per-sample and activation bars, "
        "the part DP adds."
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. Step timeline
# ---------------------------------------------------------------------------------------------------------------
def fig_timeline(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    chosen = choose_case(results, options)
    if chosen.predicted:
        raise SkipFigure("only predicted (meta device) cases: a predicted step has no time axis")
    rows = _case_rows(results, chosen)
    records = [
        r
        for r in rows[rows["status"] == "ok"]["record"]
        if r.memory.timeline.t_s and any(getattr(r.memory.timeline, k) for k in TRACE_STYLES)
    ]
    if not records:
        raise SkipFigure(f"no timeline recorded for {chosen.workload} batch {chosen.batch}")

    step_keys = [k for k in TRACE_STYLES if k not in WHOLE_PROCESS_TRACES]
    scale, unit = byte_unit(max(max(getattr(r.memory.timeline, k) or [0]) for r in records for k in step_keys))
    # one time axis for every method: how long each step takes is part of the comparison
    fig, axes = _grid(len(records), ncols=2, size=(6.0, 3.0), sharex=True)
    plotted = []
    for index, (ax, record) in enumerate(zip(axes, records)):
        plotted += _timeline_panel(ax, record, step_keys, scale, unit)
        if index + 2 >= len(records):  # the lowest panel of its column carries the shared time axis' labels
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("time in step [ms]")
    bottom = _timeline_legend(fig, plotted, records)
    fig.suptitle(f"One DP step over time — {chosen.label}")
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    return fig, (
        "Where in the step the peak happens: shaded bands are the phases (forward, backward, clip, noise, "
        "optimizer). Solid lines (left axis): the step's own tensors; dashed (right axis): whole process (RSS) or "
        "whole device (NVML)."
    )


def _timeline_panel(ax: plt.Axes, record: CaseRecord, step_keys: list[str], scale: float, unit: str) -> list:
    """One method's step: its phases shaded, the step's traces on ``ax``, whole-process traces on a right axis; the
    axes drawn on."""
    timeline = record.memory.timeline
    t_ms = np.asarray(timeline.t_s) * 1e3
    for phase in record.memory.phases:
        ax.axvspan(
            phase.start_s * 1e3, phase.end_s * 1e3, color=PHASE_COLORS.get(phase.name, "#dddddd"), alpha=0.5, lw=0
        )
    step = {k: np.asarray(getattr(timeline, k), dtype=float) for k in step_keys if getattr(timeline, k)}
    whole = {k: np.asarray(getattr(timeline, k), dtype=float) for k in WHOLE_PROCESS_TRACES if getattr(timeline, k)}
    for key, values in step.items():
        label, color = TRACE_STYLES[key]
        ax.plot(t_ms, values / scale, "-", label=label, color=color, lw=1.4)
    step_span = _set_min_span(ax, step.values(), MIN_TRACE_SPAN_BYTES, scale)
    plotted = [ax]
    if whole:
        # never more magnified than the left axis: a few KiB of RSS must not look like the step's own growth
        right = ax.twinx()
        span = max(max(v.max() for v in whole.values()) - min(v.min() for v in whole.values()), step_span)
        rscale, runit = byte_unit(span)
        for key, values in whole.items():
            label, color = TRACE_STYLES[key]
            right.plot(t_ms, values / rscale, "--", label=label, color=color, lw=1.4)
        _set_min_span(right, whole.values(), step_span, rscale)
        right.set_ylabel(f"process / device [{runit}]", fontsize=8)
        right.ticklabel_format(axis="y", useOffset=False, style="plain")
        plotted.append(right)
    ax.set_title(record.method, fontsize=10)
    ax.set_ylabel(f"step memory [{unit}]")
    ax.grid(alpha=0.3)
    return plotted


def _timeline_legend(fig: plt.Figure, plotted: list, records: list[CaseRecord]) -> float:
    """The traces' and the phases' legend below the panels; its top."""
    handles = {lab: h for ax in plotted for h, lab in zip(*ax.get_legend_handles_labels())}
    phases = sorted(
        {p.name for r in records for p in r.memory.phases},
        key=lambda n: list(PHASE_COLORS).index(n) if n in PHASE_COLORS else 99,
    )
    for name in phases:
        handles[f"phase: {name}"] = Patch(color=PHASE_COLORS.get(name, "#dddddd"), alpha=0.5)
    return _legend_below(fig, list(handles.values()), list(handles.keys()), ncol=5)


# ---------------------------------------------------------------------------------------------------------------
# 4. GPU / machine comparison
# ---------------------------------------------------------------------------------------------------------------
MAX_COMPARED_CASES = 24


def fig_gpu_comparison(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    cases = _measured(results.cases[results.cases["status"] == "ok"])  # predictions do not depend on the machine
    machines = sorted(cases["machine"].unique())
    if len(machines) < 2:
        raise SkipFigure(f"results come from one machine only ({machines[0] if machines else 'none'})")
    # machines compared in one training mode: fp32 without checkpointing, full training where it ran, else the
    # mode with the most cases
    modes = cases.groupby(list(MODE_COLUMNS)).size()
    mode = DEFAULT_MODE if DEFAULT_MODE in modes.index else modes.idxmax()
    for column, value in zip(MODE_COLUMNS, mode):
        cases = cases[cases[column] == value]
    key = ["workload", "method", "batch_size", "device", "world_size", "parallel"]
    shared = cases.groupby(key).filter(lambda g: g["machine"].nunique() >= 2)
    if shared.empty:
        raise SkipFigure("no case ran ok on two or more machines")
    workload = (
        options.workload
        if options.workload in set(shared["workload"])
        else shared.groupby("workload").size().sort_values(ascending=False).index[0]
    )
    shared = shared[shared["workload"] == workload]
    # one device per figure (a GPU's and a CPU's bars on one axis would compare devices, not machines): the GPU
    # with the most shared cases, else the device with the most
    counts = shared.groupby("device").size()
    device = max(counts.index, key=lambda d: (str(d).startswith("cuda"), counts[d], str(d)))
    shared = shared[shared["device"] == device]
    shared = shared.assign(label=shared["method"] + _ranks_suffix(shared))  # e.g. "bk (fsdp8)" on many ranks
    labels = sorted({(m, b) for m, b in zip(shared["label"], shared["batch_size"])}, key=lambda mb: (mb[1], mb[0]))
    labels = labels[-MAX_COMPARED_CASES:]  # the largest batches read best when there are many
    metric = fit_metric_for(shared)
    scale, unit = byte_unit(float(shared[metric].max()))
    fig, (ax_mem, ax_time) = plt.subplots(
        2, 1, figsize=(min(PAGE_WIDTH_IN, max(7.0, 0.6 * len(labels) * len(machines))), 7.5)
    )
    width = 0.8 / len(machines)
    x = np.arange(len(labels))
    for i, machine in enumerate(machines):
        rows = shared[shared["machine"] == machine].set_index(["label", "batch_size"])
        memory = [rows.loc[lab, metric] / scale if lab in rows.index else np.nan for lab in labels]
        times = [rows.loc[lab, "time_median_s"] * 1e3 if lab in rows.index else np.nan for lab in labels]
        ax_mem.bar(x + i * width, memory, width, label=machine)
        ax_time.bar(x + i * width, times, width, label=machine)
    for ax in (ax_mem, ax_time):
        ax.set_xticks(x + width * (len(machines) - 1) / 2, [f"{m}\nB={b}" for m, b in labels], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax_mem.set_ylabel(f"{METRIC_TITLES[metric]} [{unit}]")
    ax_time.set_ylabel("median step time [ms]")
    ax_mem.set_title(f"Same cases across machines — {workload} on {device}")
    fig.tight_layout()
    return fig, (
        f"The same measured cases of {workload} on {device} of each machine (GPU / runner label), side by side: "
        "the bars of one case differ only by the machine; a case on many ranks shows its per-rank peak, "
        "labelled with its strategy and world size."
    )


def _ranks_suffix(cases: pd.DataFrame) -> pd.Series:
    """ " (ddp8)" for a case on 8 ranks under DDP, "" for one process."""
    many = cases["world_size"] > 1
    return (" (" + cases["parallel"] + cases["world_size"].astype(str) + ")").where(many, "")


# ---------------------------------------------------------------------------------------------------------------
# 5. Max batch per method per machine; 7. fixed vs per-sample memory
# ---------------------------------------------------------------------------------------------------------------
def _fits(results: Results) -> pd.DataFrame:
    if results.fits.empty:
        raise SkipFigure("no method has two ok batch sizes to fit and there are no max-batch records")
    return results.fits


def _with_where(fits: pd.DataFrame) -> pd.DataFrame:
    """``fits`` with a ``where`` column (machine · device, "(predicted)" for predicted rows)."""
    predicted = fits.apply(is_predicted, axis=1) if len(fits) else pd.Series([], dtype=bool)
    modes = zip(*(fits[column] for column in MODE_COLUMNS))
    labels = [where_label(m, d, p, *mode) for m, d, p, mode in zip(fits["machine"], fits["device"], predicted, modes)]
    return fits.assign(where=labels, predicted=predicted.to_numpy())


def _per_budget(fits: pd.DataFrame) -> pd.DataFrame:
    """``fits`` (with ``where``) whose meta budget rows name their budget in ``where`` ("… (predicted) · 24 GiB"):
    a meta search answers each budget exactly, a bar of its own."""
    budget = fits["source"] == BUDGET_SOURCE
    suffix = [f" · {size_text(m)}" if b else "" for b, m in zip(budget, fits["memory_bytes"])]
    return fits.assign(where=fits["where"] + suffix)


def _one_fit_per_method(fits: pd.DataFrame) -> pd.DataFrame:
    """One row per fit: a meta search's budget rows share their search's fit."""
    return fits.drop_duplicates([*BLOCK_KEY, "workload", "method"])


def _max_batch_bars(ax, rows: pd.DataFrame, offset: np.ndarray, width: float, color, where: str) -> tuple[bool, float]:
    """One machine · device's bars of a max-batch panel: the largest batch run (≥ where nothing larger failed) and
    the fit's prediction, hatched, capped at EXTRAPOLATION_LIMIT × the largest batch run and labelled "> N" beyond
    it; a meta budget's exact max batch alone. Returns (a prediction was capped, the tallest bar)."""
    measured = rows["measured max batch"].to_numpy(dtype=float, na_value=math.nan)
    predicted = rows["predicted max batch"].to_numpy(dtype=float, na_value=math.nan)
    caps = EXTRAPOLATION_LIMIT * measured
    capped = predicted > caps
    drawn = np.where(capped, caps, predicted)
    if rows["source"].eq(BUDGET_SOURCE).any():
        run_words = "exact max batch"
    else:
        run_words = "largest batch run" if where.endswith("(predicted)") else "measured"
    bars = ax.bar(offset, measured, width, color=color, label=f"{where}: {run_words}")
    for bar, lower in zip(bars, rows[LOWER_BOUND].eq(True)):  # False for a method with no row here
        if lower:
            ax.annotate("≥", (bar.get_x() + width / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if np.isnan(predicted).all():  # exact answers (a meta budget): no prediction to draw beside them
        return False, float(np.nanmax([1.0, *measured]))
    label = f"{where}: predicted (fit)"
    predicted_bars = ax.bar(offset + width, drawn, width, color=color, alpha=0.45, hatch="//", label=label)
    for bar, cap, is_capped in zip(predicted_bars, caps, capped):
        if is_capped:
            at = (bar.get_x() + width / 2, cap)
            ax.annotate(f"> {cap:.0f}", at, ha="center", va="bottom", fontsize=7, rotation=90)
    return bool(capped.any()), float(np.nanmax([1.0, *measured, *drawn]))


def fig_max_batch(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    fits = _per_budget(_with_where(_fits(results)))
    factors = [extrapolation_factor(p, m) for p, m in zip(fits["predicted max batch"], fits["measured max batch"])]
    informative = [f is None and pd.notna(p) for f, p in zip(factors, fits["predicted max batch"])]
    if not any(informative) and fits[LOWER_BOUND].all():
        raise SkipFigure(
            "every measured max batch is a lower bound (no batch failed) and every prediction extrapolates beyond "
            f"{EXTRAPOLATION_LIMIT}× the largest batch run: the table says all there is"
        )
    panels = list(fits.groupby("workload", sort=True))
    fig, axes = _grid(len(panels), ncols=2, size=(6.5, 3.8))
    cmap = plt.get_cmap("tab10")
    # by machine · device, then a meta search's budgets by size
    wheres = list(dict.fromkeys(fits.sort_values(["where", "memory_bytes"], key=_where_order)["where"]))
    width = 0.8 / (2 * len(wheres))
    any_capped = False
    for ax, (workload, rows) in zip(axes, panels):
        methods = sorted(rows["method"].unique())
        x = np.arange(len(methods))
        tallest = 1.0
        for i, where in enumerate(wheres):
            wrows = rows[rows["where"] == where].set_index("method").reindex(methods)
            capped, top = _max_batch_bars(ax, wrows, x + 2 * i * width, width, cmap(i), where)
            any_capped, tallest = any_capped or capped, max(tallest, top)
        ax.set_xticks(x + width * (2 * len(wheres) - 1) / 2, methods, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log", base=2)
        # bars start below batch 1 so every bar is visible on the log axis; room above for the "> N" labels
        ax.set_ylim(0.5, tallest * 16)
        ax.set_ylabel("max batch size")
        ax.set_title(workload, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    bottom = _legend_below(fig, handles, labels, ncol=4)
    sources = ", ".join(sorted(set(fits["source"]) - {BUDGET_SOURCE}))
    fig.suptitle(
        "Max batch per method: measured vs predicted from peak(B) = fixed + per_sample·B"
        if sources
        else "Max batch per method and memory budget (exact under the overhead model)"
    )
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    capped_words = (
        f"; a prediction beyond {EXTRAPOLATION_LIMIT}× the largest batch run is drawn capped there, labelled > N"
        if any_capped
        else ""
    )
    budget_words = (
        "; a meta budget (· size): the exact max batch in that budget under the overhead model, no prediction"
        if (fits["source"] == BUDGET_SOURCE).any()
        else ""
    )
    fitted = (
        "Where measured and predicted bars agree, the affine fit can be trusted for larger memories. Solid: largest "
        f"batch that ran ok (≥: no larger batch failed); hatched: the fit's prediction ({sources}){capped_words}"
    )
    return fig, (fitted + budget_words if sources else "Max batch per method and memory budget" + budget_words) + "."


def _where_order(column: pd.Series) -> pd.Series:
    """Sort key of fig_max_batch's series: ``where`` without its budget suffix, then the budget's bytes."""
    if column.name == "where":
        return column.str.replace(r" · [0-9.]+ [KMGTP]?i?B$", "", regex=True)
    return column


def _in_table_order(results: Results, fits: pd.DataFrame) -> tuple[list[tuple], list[str]]:
    """The :data:`BLOCK_KEY` blocks (machine, device, training mode) and the workloads of ``fits`` in the tables'
    order (those only a max-batch search has, after them by name)."""
    found = blocks(results)
    known = [(b.machine, b.device, *b.mode) for b, _ in found]
    keys = set(fits[list(BLOCK_KEY)].itertuples(index=False, name=None))
    where_keys = sorted(keys, key=lambda k: (known.index(k) if k in known else len(known), k))
    cases = one_process(results.cases)
    order = workload_order(cases) if len(cases) else []
    workloads = sorted(fits["workload"].unique(), key=lambda w: (order.index(w) if w in order else len(order), w))
    return where_keys, workloads


def fig_fixed_vs_per_sample(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    fits = _with_where(_one_fit_per_method(_fits(results)).dropna(subset=["fixed_bytes"]))
    where_keys, workloads = _in_table_order(results, fits)
    methods = sorted(fits["method"].unique())
    colors = _method_colors(results)
    # one row of panels per machine · device · training mode (the tables' blocks), workloads along x: the figure
    # grows downwards with the blocks, never wider than the page
    fig, axes = plt.subplots(
        len(where_keys), 2, figsize=(min(PAGE_WIDTH_IN, 11.0), 0.4 + 2.7 * len(where_keys)), squeeze=False
    )
    width = 0.8 / len(methods)
    x = np.arange(len(workloads))
    for (ax_fixed, ax_per_sample), key in zip(axes, where_keys):
        rows = fits[[tuple(k) == key for k in fits[list(BLOCK_KEY)].itertuples(index=False)]]
        where = rows["where"].iloc[0]
        for ax, column, title in (
            (ax_fixed, "fixed_bytes", "fixed memory"),
            (ax_per_sample, "per_sample_bytes", "per sample"),
        ):
            values = rows[column].clip(lower=0)
            scale, unit = byte_unit(float(values.max()))
            for i, method in enumerate(methods):
                mine = rows[rows["method"] == method].set_index("workload")
                heights = [max(mine.loc[w, column], 0) / scale if w in mine.index else np.nan for w in workloads]
                hatches = ["//" if w in mine.index and mine.loc[w, "predicted"] else "" for w in workloads]
                ax.bar(x + i * width, heights, width, color=colors[method], label=method, hatch=hatches)
            ax.set_xticks(
                x + width * (len(methods) - 1) / 2,
                workloads,
                fontsize=8,
                rotation=0 if len(workloads) <= 4 else 30,
                ha="center" if len(workloads) <= 4 else "right",
            )
            positive = values[values > 0]
            if len(positive) and positive.max() / positive.min() > 100:
                ax.set_yscale("log")
            ax.set_ylabel(f"{title} [{unit}]", fontsize=8)
            ax.set_title(f"{title} — {where}", fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3)
    seen = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if fits["predicted"].any():
        seen["predicted (meta device)"] = Patch(facecolor="white", edgecolor="k", hatch="//")
    bottom = _legend_below(fig, list(seen.values()), list(seen.keys()), ncol=5)
    fig.suptitle("Affine fit peak(B) = fixed + per_sample·B, per method")
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.4 / fig.get_size_inches()[1]))
    metrics = ", ".join(sorted(fits["fit metric"].unique()))
    return (
        fig,
        "Per-sample memory decides how far the batch can grow; fixed memory is paid once. From the affine fit of "
        f"{metrics}; one row per machine · device · training mode, as in the tables; negative fits are drawn at 0"
        + ("; hatched = predicted." if fits["predicted"].any() else "."),
    )


# ---------------------------------------------------------------------------------------------------------------
# 6. Proxy validity: GPT proxy vs DiT overhead at matched batch and tokens per sample
# ---------------------------------------------------------------------------------------------------------------
def proxy_pairs(results: Results) -> pd.DataFrame:
    """DiT and GPT DP-overhead ratios at the same machine, device, training mode, batch size, tokens per sample and
    method (one process)."""
    cases = one_process(results.cases)
    families = set(cases["family"])
    missing = [name for fam, name in (("dit", "DiT"), ("gpt", "GPT proxy")) if fam not in families]
    if missing:
        raise SkipFigure(f"the data lack the {' and '.join(missing)} family")
    where = ["machine", "device", "workload"]
    facts = cases.drop_duplicates(where)[[*where, "family", "tokens_per_sample"]].rename(
        columns={"tokens_per_sample": "tokens"}
    )
    overhead = one_process(results.overhead).merge(facts, on=where, how="left")
    numeric = overhead[overhead["peak tensor ×nondp"].notna() & overhead["tokens"].notna()]
    key = ["machine", "device", *MODE_COLUMNS, "batch_size", "tokens", "method"]
    dit = numeric[numeric["family"] == "dit"]
    gpt = numeric[numeric["family"] == "gpt"]
    pairs = dit.merge(gpt, on=key, suffixes=("_dit", "_gpt"))
    if pairs.empty:
        raise SkipFigure("no GPT and DiT cases ran ok at the same batch size and tokens per sample")
    return pairs


def fig_proxy_validity(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    pairs = proxy_pairs(results)
    predicted = pairs.apply(is_predicted, axis=1)
    facts = zip(pairs["machine"], pairs["device"], predicted, *(pairs[column] for column in MODE_COLUMNS))
    pairs = pairs.assign(where=[where_label(*fact) for fact in facts])
    wheres = sorted(pairs["where"].unique())
    # colour = method, marker shape = machine · device · training mode (hollow when predicted): one legend entry
    # per method and one per shape, never one per combination
    shapes = {w: MARKERS[i % len(MARKERS)] for i, w in enumerate(wheres)}
    colors = _method_colors(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    drawn_methods, drawn_wheres = set(), set()
    any_coinciding = False
    for ax, column, title in (
        (axes[0], "peak tensor ×nondp", "peak memory ÷ non-DP"),
        (axes[1], "median step ×nondp", "step time ÷ non-DP"),
    ):
        both = pairs[pairs[f"{column}_dit"].notna() & pairs[f"{column}_gpt"].notna()]
        ax.set_title(title)
        if both.empty:
            ax.text(0.5, 0.5, "no matched pairs with this figure", ha="center", va="center", transform=ax.transAxes)
            continue
        methods, drawn, same = _proxy_panel(ax, both, column, title, shapes, colors)
        drawn_methods |= methods
        drawn_wheres |= drawn
        any_coinciding |= same
    legend = {m: plt.Line2D([], [], marker="o", linestyle="", color=colors[m]) for m in sorted(drawn_methods)}
    if len(wheres) > 1:
        for where in sorted(drawn_wheres):
            fill = "none" if where.endswith("(predicted)") else "0.3"
            legend[where] = plt.Line2D([], [], marker=shapes[where], linestyle="", color="0.3", mfc=fill)
    legend["GPT = DiT"] = plt.Line2D([], [], linestyle="--", color="k", lw=1)
    bottom = _legend_below(fig, list(legend.values()), list(legend.keys()), ncol=4)
    fig.suptitle("Proxy validity: DP overhead of the GPT proxy vs DiT at matched batch and tokens per sample")
    fig.tight_layout(rect=(0, bottom, 1, 0.94))
    return (
        fig,
        "Points on the dashed line mean the GPT proxy predicts DiT's DP overhead. "
        f"{len(pairs)} matched (method, batch, tokens) pair(s) from {'; '.join(wheres)}"
        + (" (colour = method, one marker shape each, hollow = predicted)" if len(wheres) > 1 else "")
        + (f"; {COINCIDING_NOTE.format(what='a point')}." if any_coinciding else "."),
    )


def _proxy_panel(
    ax: plt.Axes, both: pd.DataFrame, column: str, title: str, shapes: dict[str, str], colors: dict[str, str]
) -> tuple[set[str], set[str], bool]:
    """One overhead's matched DiT/GPT points against the diagonal; (methods drawn, wheres drawn, two coincide)."""
    drawn_methods: set[str] = set()
    drawn_wheres: set[str] = set()
    # a method's points exactly over an earlier method's (bk-tiled's over bk's): hollow and larger, and named
    xy, keys = [f"{column}_dit", f"{column}_gpt"], ["where", "batch_size", "tokens"]
    points = {m: rows.sort_values(keys) for m, rows in both.groupby("method")}
    span = float(max(np.ptp(both[xy[0]]), np.ptp(both[xy[1]]))) or 1.0
    same = coinciding(
        {
            m: (list(rows[keys].itertuples(index=False)), list(rows[xy].to_numpy().ravel()))
            for m, rows in points.items()
        },
        span,
    )
    for (method, where), rows in both.groupby(["method", "where"]):
        hollow = where.endswith("(predicted)") or method in same
        ax.scatter(
            rows[xy[0]],
            rows[xy[1]],
            marker=shapes[where],
            facecolors="none" if hollow else colors[method],
            edgecolors=colors[method],
            s=90 if method in same else 40,
            linewidths=1.5 if method in same else 1.0,
        )
        drawn_methods.add(method)
        drawn_wheres.add(where)
    _name_coinciding(ax, same)
    low = min(both[f"{column}_dit"].min(), both[f"{column}_gpt"].min())
    high = max(both[f"{column}_dit"].max(), both[f"{column}_gpt"].max())
    if low > 0 and high / low > 10:  # ratios spanning decades (step times on a busy machine): log axes
        ax.set_xscale("log")
        ax.set_yscale("log")
        ends = [low / 1.2, high * 1.2]
    else:
        pad = 0.05 * (high - low or 1.0)
        ends = [low - pad, high + pad]
    ax.plot(ends, ends, "k--", lw=1)
    ax.set_xlabel(f"DiT overhead ({title}) [×]")
    ax.set_ylabel("GPT proxy overhead [×]")
    ax.grid(alpha=0.3)
    return drawn_methods, drawn_wheres, bool(same)


# ---------------------------------------------------------------------------------------------------------------
# 8. Many ranks: per-rank peak vs world size
# ---------------------------------------------------------------------------------------------------------------
STRATEGY_STYLES = {"ddp": "-", "fsdp": "--"}


def fig_per_rank_peak(results: Results, options: FigureOptions) -> tuple[plt.Figure, str]:
    """Per workload × machine at one global batch: each rank's peak (the highest rank's) and ×nondp at the same
    world size and strategy, against the world size; one process is world size 1 of every strategy's line."""
    # measured only (a meta prediction is one process), by device kind: rank r of a "cuda" case is on cuda:r
    cases = _measured(results.cases[results.cases["status"] == "ok"])
    cases = cases.assign(kind=_device_kind(cases["device"]))
    ranked = cases[cases["world_size"] > 1]
    if ranked.empty:
        raise SkipFigure("no case ran ok on many ranks (--world-sizes above 1)")
    # the global batch with the most many-rank cases (then the largest) per workload, machine, device kind and
    # training mode (a panel of two modes would draw each method twice under one name)
    where = ["machine", "kind", "workload", *MODE_COLUMNS]
    chosen = ranked.groupby([*where, "batch_size"]).size().reset_index(name="n")
    chosen = chosen.sort_values(["n", "batch_size"]).groupby(where).tail(1)
    colors = _method_colors(results)
    overhead = results.overhead.assign(kind=_device_kind(results.overhead["device"]))
    fig, axes = plt.subplots(2, len(chosen), figsize=(min(PAGE_WIDTH_IN, 5.2 * len(chosen)), 7.2), squeeze=False)
    for column, (_, panel) in enumerate(chosen.iterrows()):
        machine, kind, workload, batch = panel["machine"], panel["kind"], panel["workload"], panel["batch_size"]
        mode = tuple(panel[column] for column in MODE_COLUMNS)
        at, ratios = (
            frame[(frame[[*where, "batch_size"]] == panel[[*where, "batch_size"]].to_numpy()).all(axis=1)]
            for frame in (cases, overhead)
        )
        scale, unit = byte_unit(float(at["peak_tensor_bytes"].max()))
        ax_peak, ax_ratio = axes[0][column], axes[1][column]
        for method, parallel in sorted({(m, p) for m, p in zip(at["method"], at["parallel"]) if p != ONE_PROCESS}):
            line = dict(color=colors[method], linestyle=STRATEGY_STYLES[parallel], marker="o")
            rows = at[(at["method"] == method) & at["parallel"].isin([ONE_PROCESS, parallel])].sort_values("world_size")
            ax_peak.plot(rows["world_size"], rows["peak_tensor_bytes"] / scale, label=f"{method} {parallel}", **line)
            mine = ratios[(ratios["method"] == method) & ratios["parallel"].isin([ONE_PROCESS, parallel])]
            mine = mine[mine["peak tensor ×nondp"].notna()].sort_values("world_size")
            ax_ratio.plot(mine["world_size"], mine["peak tensor ×nondp"], **line)
        ax_peak.set_title(f"{workload} — B={batch} global — {where_label(machine, kind, False, *mode)}", fontsize=10)
        ax_peak.set_ylabel(f"per-rank peak live tensors [{unit}]")
        ax_ratio.set_ylabel("per-rank peak ×nondp (same strategy)")
        for ax in (ax_peak, ax_ratio):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("world size (ranks)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    bottom = _legend_below(fig, handles, labels, ncol=6)
    fig.suptitle("Per-rank peak memory vs world size (solid: DDP, dashed: FSDP)")
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    return fig, (
        "Each rank measures its own step; the figure is the highest rank's peak live tensor bytes at a fixed "
        "global batch (split over the ranks). World size 1 is the one-process case. Bottom: over nondp's per-rank "
        "peak at the same world size and strategy."
    )


def _device_kind(devices: pd.Series) -> pd.Series:
    """ "cuda" for every GPU ("cuda:0" of a one-process case, "cuda" of a many-rank one), else the device."""
    return devices.astype(str).where(~devices.astype(str).str.startswith("cuda"), "cuda")


# name -> (title, function); the order is the report's order.
FIGURES: dict[str, tuple[str, Callable[[Results, FigureOptions], tuple[plt.Figure, str]]]] = {
    "peak_vs_batch": ("Peak memory vs batch size", fig_peak_vs_batch),
    "breakdown": ("Breakdown at the peak", fig_breakdown),
    "timeline": ("Step timeline", fig_timeline),
    "gpu_comparison": ("GPU comparison", fig_gpu_comparison),
    "max_batch": ("Max batch per method", fig_max_batch),
    "proxy_validity": ("Proxy validity (GPT vs DiT)", fig_proxy_validity),
    "fixed_vs_per_sample": ("Fixed vs per-sample memory", fig_fixed_vs_per_sample),
    "per_rank_peak": ("Per-rank peak vs world size", fig_per_rank_peak),
}


def render_figures(results: Results, out_dir: Path, options: FigureOptions | None = None) -> list[FigureResult]:
    """Render every figure whose data exist into ``out_dir`` (PNG + SVG); the rest come back as skipped."""
    options = options or FigureOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    produced = []
    for name, (title, function) in FIGURES.items():
        try:
            fig, caption = function(results, options)
        except SkipFigure as exc:
            produced.append(FigureResult(name, title, skipped=str(exc)))
            continue
        width_px = round(fig.get_size_inches()[0] * DPI)
        try:
            paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
            fig.savefig(paths[0], dpi=DPI)
            fig.savefig(paths[1])
        finally:
            plt.close(fig)
        produced.append(FigureResult(name, title, paths, caption=caption, width_px=width_px))
    return produced
