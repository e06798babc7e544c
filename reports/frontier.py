"""The memory–time frontier of a capacity plan: ``python -m reports frontier PLAN.json --out FIGURE.png``.

The plan is ``python -m bench.plan WORKLOAD --format json`` (bench/plan/planner.py ``plan_json``). One point per
method that has a time estimate:

    x = its max batch on the plan's GPU (memory: how large a batch fits)
    y = its estimated samples/s at that batch = max_batch / estimated step seconds (time)

both on log axes. A point no other method beats on both axes is on the frontier (joined by a line): the methods
a user chooses between; every other one is worse in memory and time than some frontier method. A max batch
that is a lower bound (the per-sample loop's search cap, the host's limit) is drawn hollow and labelled "≥".
Methods without a point — unsupported, failed, or without an estimate — are listed under the figure with their
reason. The title names the workload, the GPU, the precision and what the times rest on ("estimated,
uncalibrated" unless the plan's ``time_calibrated`` says its rates were fitted to measured records).
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from bench.messages import first_line

from .load import ReportInputError
from .tables import BASELINE_METHOD

__all__ = ["FrontierPlan", "FrontierPoint", "draw_frontier", "frontier_methods", "read_plan"]

DPI = 110
REASON_CHARS = 90  # an unplotted method's reason, in the caption under the figure
CAPTION_CHARS = 150  # caption line length at the figure's width
CAPTION_LINE = 0.022  # of the figure's height, per caption line


@dataclass(frozen=True)
class FrontierPoint:
    method: str
    max_batch: int
    samples_per_s: float
    step_seconds: float
    lower_bound: bool  # the true max batch may be larger


@dataclass(frozen=True)
class FrontierPlan:
    """What the figure needs of a plan: its facts, the timed methods, and the others with why."""

    path: str
    workload: str
    gpu: str  # the catalogue GPU's name, or the memory planned for ("40.00 GiB") without one
    precision: str
    training_mode: str
    time_model: str
    calibrated: bool  # the plan's time_calibrated: its rates were fitted to measured records
    points: tuple[FrontierPoint, ...]
    unplotted: tuple[tuple[str, str], ...]  # (method, why it has no point)

    @property
    def title(self) -> str:
        kind = "estimated, calibrated" if self.calibrated else "estimated, uncalibrated"
        return f"{self.workload} on {self.gpu}, {self.training_mode}: max batch vs samples/s ({kind})"


def _bad(path: Path, problem: str) -> ReportInputError:
    return ReportInputError(f"{path}: {problem}")


def read_plan(path: str | Path) -> FrontierPlan:
    """The plan JSON at ``path``; ReportInputError (one line) when it is not one or has no timed row."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _bad(path, f"cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not JSON ({exc}); give `python -m bench.plan WORKLOAD --format json` output") from None
    needed = ("workload", "rows", "time_model")
    if not isinstance(data, dict) or any(k not in data for k in needed) or not isinstance(data["rows"], list):
        raise _bad(
            path, "not a plan JSON (`python -m bench.plan WORKLOAD --format json`): needs workload, rows, time_model"
        )
    points, unplotted = [], []
    for index, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise _bad(path, f"rows[{index}]: not a plan row (no method)")
        point = _point(row)
        if point is not None:
            points.append(point)
        else:
            unplotted.append((row["method"], _why_unplotted(row, data["time_model"])))
    if not points:
        raise _bad(path, f"no timed row: no method has an estimated samples/s ({first_line(str(data['time_model']))})")
    gpu = data.get("gpu")
    where = (
        gpu["name"] if isinstance(gpu, dict) and gpu.get("name") else f"{data.get('memory_bytes', 0) / 2**30:.2f} GiB"
    )
    return FrontierPlan(
        path=str(path),
        workload=str(data["workload"]),
        gpu=where,
        precision=str(data.get("precision", "")),
        training_mode=str(data.get("training_mode") or data.get("precision", "")),
        time_model=str(data["time_model"]),
        calibrated=data.get("time_calibrated") is True,  # plans older than the time fit were uncalibrated
        points=tuple(points),
        unplotted=tuple(unplotted),
    )


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _point(row: dict) -> FrontierPoint | None:
    batch, rate, step = (_number(row.get(k)) for k in ("max_batch", "samples_per_s", "step_seconds"))
    if row.get("status") != "ok" or not batch or not rate or not step or not math.isfinite(rate) or rate <= 0:
        return None
    return FrontierPoint(row["method"], int(batch), rate, step, bool(row.get("max_batch_is_lower_bound")))


def _why_unplotted(row: dict, time_model: str) -> str:
    status = row.get("status", "?")
    if status != "ok":
        reason = first_line(str(row.get("reason") or "no reason given")).removeprefix(f"{row['method']}: ")
        return f"{status}: {reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + '…'}"
    if not row.get("max_batch"):
        return "no batch fits"
    return f"no time estimate ({first_line(time_model)})"


def frontier_methods(points: tuple[FrontierPoint, ...]) -> list[str]:
    """The DP methods no other DP method beats on both axes (a batch at least as large and at least as many
    samples/s, one of them strictly), by max batch. nondp is the reference, not a choice: never on it."""
    points = tuple(p for p in points if p.method != BASELINE_METHOD)
    best = [
        p
        for p in points
        if not any(
            (q.max_batch >= p.max_batch and q.samples_per_s >= p.samples_per_s)
            and (q.max_batch > p.max_batch or q.samples_per_s > p.samples_per_s)
            for q in points
        )
    ]
    return [p.method for p in sorted(best, key=lambda p: (p.max_batch, -p.samples_per_s))]


def _caption(plan: FrontierPlan) -> list[str]:
    """The lines under the figure: what the times rest on, the notation, the methods without a point."""
    text = [
        f"Times: {first_line(plan.time_model)}. ★ nondp (no privacy): the reference. Blue: the DP frontier, grey: "
        "beaten on both axes by a frontier method. Hollow: the max batch is a lower bound."
    ]
    if plan.unplotted:
        text.append("Not plotted: " + "; ".join(f"{m} ({why})" for m, why in plan.unplotted))
    return [line for paragraph in text for line in textwrap.wrap(paragraph, CAPTION_CHARS)]


def _same_points(points: tuple[FrontierPoint, ...]) -> list[list[FrontierPoint]]:
    """Points grouped where methods give the same max batch and samples/s (bk and bk-tiled at paper size): one
    marker, one label naming them all."""
    groups: dict[tuple, list[FrontierPoint]] = {}
    for p in points:
        groups.setdefault((p.max_batch, round(p.samples_per_s, 6), p.lower_bound), []).append(p)
    return list(groups.values())


def draw_frontier(plan: FrontierPlan, out: Path) -> Path:
    """The figure of ``plan`` written to ``out`` (PNG, or whatever matplotlib makes of its suffix)."""
    on_frontier = set(frontier_methods(plan.points))
    fig, ax = plt.subplots(figsize=(9.0, 6.0), layout="constrained")
    best = sorted((p for p in plan.points if p.method in on_frontier), key=lambda p: p.max_batch)
    ax.plot(
        [p.max_batch for p in best],
        [p.samples_per_s for p in best],
        "-",
        color="tab:blue",
        alpha=0.5,
        lw=1,
        zorder=1,
        label="DP frontier: no DP method beats these on both axes",
    )
    for group in _same_points(plan.points):
        p = group[0]
        reference = p.method == BASELINE_METHOD
        colour = "black" if reference else "tab:blue" if p.method in on_frontier else "tab:gray"
        ax.scatter(
            p.max_batch,
            p.samples_per_s,
            s=130 if reference else 46,
            marker="*" if reference else "o",
            zorder=2,
            edgecolors=colour,
            facecolors="none" if p.lower_bound else colour,
        )
        batch = f"≥{p.max_batch}" if p.lower_bound else str(p.max_batch)
        ax.annotate(
            f"{' = '.join(q.method for q in group)}\nB {batch}, {p.step_seconds * 1e3:.0f} ms/step",
            (p.max_batch, p.samples_per_s),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # a few labelled ticks within a decade
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"max batch on {plan.gpu} (exact meta search, overhead model applied)")
    ax.set_ylabel(f"estimated samples/s at that batch ({'calibrated' if plan.calibrated else 'uncalibrated'})")
    ax.set_title(plan.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    _pad_log_axes(ax, plan.points)
    caption = _caption(plan)
    bottom = CAPTION_LINE * (len(caption) + 0.5)
    fig.text(0.01, 0.005, "\n".join(caption), fontsize=7.5, va="bottom")
    fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return out


def _pad_log_axes(ax, points: tuple[FrontierPoint, ...]) -> None:
    """Room for the labels right of and above the points (log axes: a factor, not an offset)."""
    xs, ys = [p.max_batch for p in points], [p.samples_per_s for p in points]
    ax.set_xlim(min(xs) / 1.6, max(xs) * 3.0)
    ax.set_ylim(min(ys) / 1.6, max(ys) * 2.0)
