"""Tables from the loaded results: DP overhead over non-DP, and the affine memory fit per method.

Both tables are typed DataFrames: a figure is a number, or NaN / <NA> where it does not exist, and explicit
columns say why (``status`` and ``nondp status`` of the overhead table, ``max batch is lower bound`` of the fit
table). Text such as "OOM", "nondp OOM", "≥12" or "n/a" is produced only when a table is written out, by
:func:`overhead_display` / :func:`fit_display` (Markdown and HTML). The CSV files hold the typed table: numbers
(empty where there is none) beside the status columns, so a spreadsheet or ``pandas.read_csv`` gets numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bench.config.sizes import size_text
from bench.messages import first_line
from bench.plan.maxbatch import affine_fit, answer_text, predict_max_batch  # the one fit, shared with the search
from bench.results.record import CHECKPOINTINGS, PRECISIONS, BudgetAnswer

__all__ = [
    "BASELINE_METHOD",
    "BUDGET_SOURCE",
    "DEFAULT_MODE",
    "EXTRAPOLATION_LIMIT",
    "FIT_NOTES",
    "MIB",
    "MIN_NOISE_ROUNDS",
    "MODE_COLUMNS",
    "OVERHEAD_NOTES",
    "RATIO_COLUMNS",
    "TIME_BASES",
    "TIME_BASIS",
    "TIME_UNRELIABLE",
    "TIME_VERDICTS",
    "TimeComparison",
    "affine_fit_table",
    "all_ok_batches",
    "budget_answer",
    "extrapolation_factor",
    "fit_display",
    "fit_metric_for",
    "format_number",
    "markdown_text",
    "measured_max_batch_text",
    "mode_label",
    "mode_order",
    "overhead_display",
    "overhead_table",
    "overhead_warnings",
    "predicted_max_batch_text",
    "present",
    "reason_text",
    "status_label",
    "time_noise",
    "time_verdict",
    "to_markdown",
    "unreliable_time_reason",
]

BASELINE_METHOD = "nondp"
MIB = 2**20
# A max-batch prediction above this multiple of the largest batch that ran is an extrapolation: written as a
# bound ("> N (extrapolated ×K)"), drawn capped, never as a bare number (bk's fit on dit-tiny-cond, 5.4 MiB at
# batch 16, "fits" 119024 samples in 23.5 GiB of RAM).
EXTRAPOLATION_LIMIT = 4

# Ratio columns of the overhead table: column title -> the record's figure it divides.
RATIO_COLUMNS = {
    "peak tensor ×nondp": "peak_tensor_bytes",
    "peak allocated ×nondp": "peak_allocated_bytes",
    "peak reserved ×nondp": "peak_reserved_bytes",
    "median step ×nondp": "time_median_s",
}
TIME_RATIO = "median step ×nondp"
TIME_NOISE = "step time noise"  # the time ratio's relative spread (a fraction)
TIME_VERDICT = "time vs noise"  # one of TIME_VERDICTS, or missing where there is no time ratio
TIME_BASIS = "time ratio of"  # one of TIME_BASES, or missing where there is no time ratio
TIME_UNRELIABLE = "time unreliable because"  # the record's reason where the verdict is "unreliable", else ""

# A quartile of fewer timed rounds says nothing about the spread (pytest-benchmark's IQR of 1 round is 0).
MIN_NOISE_ROUNDS = 3
TIME_VERDICTS = ("beyond noise", "within noise", "noise unknown", "threads differ", "unreliable")
# "paired rounds": the DP case's own rounds, each over the non-DP rounds either side of it (bench/trackers/timing.py);
# "case medians": the DP case's median over the nondp case's (records written before paired timing, and cases
# whose non-DP rounds could not run)
TIME_BASES = ("paired rounds", "case medians")

OVERHEAD_NOTES = (
    "Each ratio is the DP method's figure divided by `nondp`'s at the same workload, batch size, device, "
    "machine, training mode (precision, activation checkpointing and `trainable`: nondp fine-tuned the same way), "
    "world size and strategy (`parallel`; a case on many ranks "
    "compares per-rank peaks, the batch is global). `peak tensor` = peak live tensor bytes (exact tracker, every "
    "device); `peak allocated` / "
    '`peak reserved` = torch CUDA allocator max allocated / max reserved (CUDA only, "n/a" on CPU); '
    "`median step ×nondp` = the step time ratio. `time ratio of` says where it comes from: `paired rounds` — the "
    "DP case timed its rounds between rounds of the non-DP step (same workload, batch, mode and device, in the "
    "same case), and the ratio is the median over its rounds of each one ÷ the non-DP rounds either side of it, "
    "so both sides saw the same load; `case medians` — records written before paired timing (or whose non-DP "
    "rounds could not run): the DP case's median seconds per step ÷ the nondp case's, timed at another moment. "
    "MiB columns are peak tensor bytes. `step time noise` = the ratio's relative spread: IQR / median of the "
    "per-round ratios (paired), or √(r_DP² + r_nondp²) with r = IQR / median of a side's timed rounds (case "
    "medians); `time vs noise` says whether the time ratio can be trusted: `unreliable` when the run could not "
    "vouch for it (`time unreliable because`: the rule of bench/trackers/timing.py — its threads waited for a CPU "
    ""
    "other processes held, or its round pairs disagree; for case medians, either case's), `beyond noise` when "
    "|ratio − 1| > noise, `within noise` otherwise (the DP and non-DP step times cannot be told apart), `noise "
    f"unknown` when a side has fewer than {MIN_NOISE_ROUNDS} timed rounds or no IQR, `threads differ` when the "
    "two cases were timed with different torch CPU thread counts. The CSV holds the numbers (empty where there "
    "is none) and the `status` / `nondp status` columns that say why."
)

# The fit-table source of a meta max-batch search's rows: one per asked --memory-budget, each exact under the
# overhead model (bench/plan/maxbatch.py, search_budgets), so no prediction is needed.
BUDGET_SOURCE = "meta search, exact per budget"

FIT_NOTES = (
    "Affine fit peak(B) = fixed + per_sample · B of each method's peak memory over the batch sizes that ran "
    "(`fit metric`: peak_reserved_bytes on CUDA where every point has it, else peak_tensor_bytes). "
    "`predicted max batch` is the largest B with peak(B) ≤ `memory`; `measured max batch` is the largest batch "
    'that ran ok ("≥" when no larger batch failed). A prediction above '
    f"{EXTRAPOLATION_LIMIT}× the measured max batch is an extrapolation of the fit far outside the batches it saw: "
    'it is written "> N (extrapolated ×K)": N is that limit, '
    f"{EXTRAPOLATION_LIMIT} × the measured max batch, the most the table claims, and K is how many times the "
    "measured max batch the fit predicted (×7439: the fit's answer is 7439 times the largest batch that ran). "
    'Where a batch at or below N failed, the bound would contradict it: the prediction is written "fit ~P, but '
    'batch F failed". '
    f"Rows from `{BUDGET_SOURCE}` (the meta device, `--max-batch --devices meta`) are one per asked "
    "`--memory-budget` (`memory`): the max batch is exact under the overhead model (it fits, the next batch was "
    "run and does not), so there is no prediction; `nothing fits` names what batch 1 needs, `≥N` is a lower "
    "bound at the search limit or where the host could not draw a larger batch (`host_limit_batch`). "
    "The CSV holds the numbers (the prediction as computed, empty where there is none), `memory_bytes` exactly, "
    "`first_failing_device_bytes` (what the first failing batch needs, meta) and a `max batch is lower bound` "
    'column for the "≥".'
)

ONE_PROCESS = "none"  # the `parallel` column of a one-process case (world size 1)

# A case's training mode (bench.dp.modes.TrainingMode): precision, activation checkpointing and which parameters
# train. Every ratio, fit, block and panel is taken within one mode: across modes it would measure the mode too
# (a LoRA case over a full nondp case is mostly the frozen base's missing gradients).
MODE_COLUMNS = ("precision", "checkpointing", "trainable")
DEFAULT_MODE = ("fp32", "none", "full")

_STATUS_LABELS = {"oom": "OOM", "unsupported": "unsupported", "error": "error"}


def status_label(status: str) -> str:
    return _STATUS_LABELS.get(status, status)


def present(value: Any) -> bool:
    """True unless ``value`` is None, NaN or pandas' <NA> (how a missing figure reaches a DataFrame cell)."""
    if value is None or value is pd.NA:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def mode_label(precision: str, checkpointing: str, trainable: str = "full") -> str:
    """ "" for the default mode (fp32, no checkpointing, full training: what every figure assumes unnamed), else
    its parts joined by "+" as bench.dp.TrainingMode.label writes them: "amp-bf16+blocks", "fp32+lora:r=8",
    "amp-bf16+blocks+bitfit"."""
    if (precision, checkpointing, trainable) == DEFAULT_MODE:
        return ""
    return "+".join([str(precision), *([str(checkpointing)] if checkpointing != "none" else [])]) + (
        "" if trainable == "full" else f"+{trainable}"
    )


def mode_order(precision: str, checkpointing: str, trainable: str = "full") -> tuple:
    """Sort key of training modes: full training first, the fine-tuning modes by name (numbers as numbers:
    lora:r=8 before lora:r=16); within one, fp32 before the other precisions (bench.results.record.PRECISIONS'
    order), no checkpointing before blocks; unknown names after the known ones."""
    natural = tuple((int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", str(trainable)))
    return (
        trainable != "full",
        natural,
        *(_rank(order, value) for order, value in ((PRECISIONS, precision), (CHECKPOINTINGS, checkpointing))),
    )


def _rank(order: tuple[str, ...], value: str) -> tuple[int, str]:
    return (order.index(value) if value in order else len(order), str(value))


def all_ok_batches(rows: pd.DataFrame) -> list[int]:
    """Batch sizes of ``rows`` (one workload on one machine) at which every method of ``rows`` ran ok."""
    methods = rows["method"].nunique()
    return [
        int(b)
        for b, at in rows.groupby("batch_size")
        if (at["status"] == "ok").all() and at["method"].nunique() == methods
    ]


# ---------------------------------------------------------------------------------------------------------------
# Overhead over non-DP
# ---------------------------------------------------------------------------------------------------------------
def with_default_columns(cases: pd.DataFrame) -> pd.DataFrame:
    """``cases`` with ``world_size`` and ``parallel`` (1 and ONE_PROCESS) and the :data:`MODE_COLUMNS`
    (:data:`DEFAULT_MODE`) where a frame built without them lacks them: every such row is a one-process case in
    the default mode, as a record older than those fields reads."""
    defaults = (("world_size", 1), ("parallel", ONE_PROCESS), *zip(MODE_COLUMNS, DEFAULT_MODE))
    missing = {k: v for k, v in defaults if k not in cases}
    return cases.assign(**missing) if missing else cases


def one_process(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``frame`` (cases or overhead) of one process, world size 1: the views of one device."""
    return frame[frame["world_size"] == 1]


def overhead_table(cases: pd.DataFrame) -> pd.DataFrame:
    """One row per DP case: its peak memory and median step time divided by ``nondp``'s (see OVERHEAD_NOTES) at
    the same training mode (:data:`MODE_COLUMNS`: nondp fine-tuned the same way), world size and strategy (a case
    on many ranks: per-rank peak over nondp's per-rank peak)."""
    cases = with_default_columns(cases)
    group_key = ["machine", "device", "workload", "batch_size", *MODE_COLUMNS, "world_size", "parallel"]
    columns = [
        *group_key,
        "method",
        "status",
        "nondp status",
        "peak tensor MiB",
        "nondp peak tensor MiB",
        *RATIO_COLUMNS,
        TIME_NOISE,
        TIME_VERDICT,
        TIME_BASIS,
        TIME_UNRELIABLE,
    ]
    rows = []
    for _, group in cases.groupby(group_key, sort=True):
        baselines = group[group["method"] == BASELINE_METHOD]
        baseline = baselines.iloc[0] if len(baselines) else None
        base_ok = baseline is not None and baseline["status"] == "ok"
        for _, case in group[group["method"] != BASELINE_METHOD].sort_values("method").iterrows():
            both_ok = base_ok and case["status"] == "ok"
            row = {k: case[k] for k in group_key}
            row["method"] = case["method"]
            row["status"] = case["status"]
            row["nondp status"] = "missing" if baseline is None else baseline["status"]
            row["peak tensor MiB"] = _mib(case["peak_tensor_bytes"]) if case["status"] == "ok" else math.nan
            row["nondp peak tensor MiB"] = _mib(baseline["peak_tensor_bytes"]) if base_ok else math.nan
            for title, figure in RATIO_COLUMNS.items():
                row[title] = _ratio(case[figure], baseline[figure]) if both_ok else math.nan
            row[TIME_NOISE], row[TIME_VERDICT], row[TIME_BASIS], row[TIME_UNRELIABLE] = math.nan, None, None, ""
            if both_ok:
                row.update(_time_ratio(case, baseline))
            rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    for column in ("peak tensor MiB", "nondp peak tensor MiB", *RATIO_COLUMNS, TIME_NOISE):
        table[column] = table[column].astype(float)
    return table


def _ratio(numerator: Any, denominator: Any) -> float:
    if not (present(numerator) and present(denominator)) or float(denominator) <= 0:
        return math.nan
    return round(float(numerator) / float(denominator), 3)


def _mib(value: Any) -> float:
    return round(float(value) / MIB, 2) if present(value) else math.nan


def _relative_iqr(row: pd.Series) -> float:
    """IQR / median of one side's timed rounds; NaN when it says nothing (too few rounds, no IQR)."""
    median, iqr, rounds = row.get("time_median_s"), row.get("time_iqr_s"), row.get("rounds")
    if not (present(median) and present(iqr) and present(rounds)) or rounds < MIN_NOISE_ROUNDS or median <= 0:
        return math.nan
    return float(iqr) / float(median)


def time_noise(case: pd.Series, baseline: pd.Series) -> float:
    """The relative spread of a time ratio: both sides' IQR/median combined in quadrature (NaN if unknown)."""
    return round(math.hypot(_relative_iqr(case), _relative_iqr(baseline)), 4)


def time_verdict(ratio: float, noise: float, case: pd.Series, baseline: pd.Series | None) -> str | None:
    """Whether a time ratio can be trusted (one of TIME_VERDICTS but "unreliable", the record's own verdict; None
    when there is no ratio). ``baseline``: the nondp case divided by, None for a paired ratio (one process)."""
    if not present(ratio):
        return None
    threads = case.get("torch_threads"), baseline.get("torch_threads") if baseline is not None else None
    if all(present(t) for t in threads) and threads[0] != threads[1]:
        return "threads differ"
    if not present(noise):
        return "noise unknown"
    return "beyond noise" if abs(ratio - 1.0) > noise else "within noise"


def _time_ratio(case: pd.Series, baseline: pd.Series) -> dict[str, Any]:
    """The time columns of an overhead row (both cases ok): the DP case's paired ratio where its record has one,
    else the ratio of the two cases' medians (TIME_BASES); "unreliable" where the bench's rule said so."""
    paired = case.get("paired_time_ratio")
    if present(paired):
        ratio, noise, basis = round(float(paired), 3), _paired_noise(case), TIME_BASES[0]
        unreliable = unreliable_time_reason(case)
        verdict = time_verdict(ratio, noise, case, None)
    else:
        ratio, noise = _ratio(case["time_median_s"], baseline["time_median_s"]), time_noise(case, baseline)
        basis = TIME_BASES[1] if present(ratio) else None
        sides = (("this case", unreliable_time_reason(case)), ("nondp", unreliable_time_reason(baseline)))
        unreliable = "; ".join(f"{side}: {reason}" for side, reason in sides if reason)
        verdict = time_verdict(ratio, noise, case, baseline)
    if unreliable and present(ratio):
        verdict = "unreliable"
    return {
        TIME_RATIO: ratio,
        TIME_NOISE: noise,
        TIME_VERDICT: verdict,
        TIME_BASIS: basis,
        TIME_UNRELIABLE: unreliable if verdict == "unreliable" else "",
    }


@dataclass(frozen=True)
class TimeComparison:
    """A DP case's step time against nondp's, as its overhead row holds it (the TIME_* columns, typed)."""

    ratio: float  # NaN where there is no ratio
    noise: float  # its relative spread, NaN where unknown
    verdict: str | None  # one of TIME_VERDICTS, None where there is no ratio
    basis: str | None  # one of TIME_BASES, None where there is no ratio
    unreliable: str  # why the run could not vouch for the ratio (verdict "unreliable"), else ""

    @classmethod
    def of(cls, ratios: pd.Series | None) -> TimeComparison:
        """The comparison in an overhead row; ``None`` (no row: nondp or the case did not run ok) has no ratio."""
        if ratios is None:
            return cls(math.nan, math.nan, None, None, "")
        verdict, basis = ratios[TIME_VERDICT], ratios[TIME_BASIS]
        return cls(
            ratio=float(ratios[TIME_RATIO]),
            noise=float(ratios[TIME_NOISE]),
            verdict=verdict if present(verdict) else None,
            basis=basis if present(basis) else None,
            unreliable=str(ratios[TIME_UNRELIABLE]),
        )


def _paired_noise(case: pd.Series) -> float:
    """IQR / median of a paired case's per-round ratios; NaN when it says nothing (too few rounds, no IQR)."""
    ratio, iqr, pairs = case.get("paired_time_ratio"), case.get("paired_time_ratio_iqr"), case.get("round_times_s")
    pairs = len(pairs) if isinstance(pairs, list) else 0
    if not (present(iqr) and float(ratio) > 0) or pairs < MIN_NOISE_ROUNDS:
        return math.nan
    return round(float(iqr) / float(ratio), 4)


def unreliable_time_reason(case: pd.Series) -> str:
    """The bench's reason where it judged ``case``'s step times unreliable (bench/trackers/timing.py), else "" (also for
    records written before the bench judged them)."""
    reliable = case.get("time_reliable")
    if not present(reliable) or bool(reliable):
        return ""
    return str(case.get("time_unreliable_reason") or "unreliable (no reason recorded)")


def overhead_display(table: pd.DataFrame) -> pd.DataFrame:
    """The overhead table as text: a missing number says why (case status, nondp's status, or n/a)."""
    shown = table.drop(columns=["nondp status"]).astype(object)
    for i, row in table.iterrows():
        case_problem = None if row["status"] == "ok" else status_label(row["status"])
        base_problem = _baseline_problem(row["nondp status"])
        shown.at[i, "peak tensor MiB"] = _number_or(row["peak tensor MiB"], case_problem or "n/a")
        shown.at[i, "nondp peak tensor MiB"] = _number_or(row["nondp peak tensor MiB"], base_problem or "n/a")
        for title in RATIO_COLUMNS:
            shown.at[i, title] = _number_or(row[title], case_problem or base_problem or "n/a")
        noise = row[TIME_NOISE]
        shown.at[i, TIME_NOISE] = f"±{noise:.1%}" if present(noise) else ""
        for title in (TIME_VERDICT, TIME_BASIS):
            shown.at[i, title] = row[title] if present(row[title]) else ""
    return shown


def _baseline_problem(nondp_status: str) -> str | None:
    """Why the nondp baseline gives no number ("no nondp", "nondp OOM", ...), or None when it ran ok."""
    if nondp_status == "missing":
        return "no nondp"
    return None if nondp_status == "ok" else f"nondp {status_label(nondp_status)}"


def _number_or(value: Any, reason: str) -> str:
    return format_number(value) if present(value) else reason


# ---------------------------------------------------------------------------------------------------------------
# Affine fit: fixed + per-sample memory, predicted max batch
# ---------------------------------------------------------------------------------------------------------------
FIT_INT_COLUMNS = (
    "points",
    "measured max batch",
    "first failing batch",
    "predicted max batch",
    "memory_bytes",
    "first_failing_device_bytes",
    "host_limit_batch",
)
LOWER_BOUND = "max batch is lower bound"
# Raw figures of the fit table (CSV only; the display writes them into the other columns' text).
_RAW_FIT_COLUMNS = ("fixed_bytes", "per_sample_bytes", "memory_bytes", "first_failing_device_bytes", "host_limit_batch")


def fit_metric_for(rows: pd.DataFrame) -> str:
    """The peak figure to fit/plot for these rows: allocator reserved on CUDA where every ok row has it."""
    ok = rows[rows["status"] == "ok"]
    if len(ok) and ok["device"].astype(str).str.startswith("cuda").all() and ok["peak_reserved_bytes"].notna().all():
        return "peak_reserved_bytes"
    return "peak_tensor_bytes"


def affine_fit_table(cases: pd.DataFrame, max_batches: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per machine × device × training mode × workload × method: the affine fit and max batch (measured vs
    predicted); a meta max-batch search gives one row per asked memory budget instead, its exact answer.

    A max-batch search record, where present, is the source; otherwise the fit uses the case rows (at least two
    ok batch sizes) and the measured max batch is the largest ok batch among them. One-process cases only: the
    max-batch search runs one process, and a many-rank case's batch is split over its ranks."""
    key = ["machine", "device", *MODE_COLUMNS, "workload", "method"]
    cases = one_process(with_default_columns(cases))
    columns = [
        *key,
        "source",
        "fit metric",
        "points",
        "fixed MiB",
        "per-sample MiB",
        "memory GiB",
        "measured max batch",
        LOWER_BOUND,
        "first failing batch",
        "predicted max batch",
        *_RAW_FIT_COLUMNS,
    ]
    rows: list[dict[str, Any]] = []
    searched: set[tuple] = set()
    if max_batches is not None and len(max_batches):
        for _, mb in max_batches.iterrows():
            identity = tuple(mb[k] for k in key)
            if mb["status"] == "ok" and mb["budgets"]:
                rows += [_budget_fit_row(mb, key, answer) for answer in mb["budgets"]]
                searched.add(identity)
            elif present(mb["fit_fixed_bytes"]) and present(mb["fit_per_sample_bytes"]):
                rows.append(_search_fit_row(mb, key))
                searched.add(identity)
    for group_key, group in cases.groupby(key, sort=True):
        if group_key not in searched:
            row = _case_fit_row(group)
            if row is not None:
                rows.append({**dict(zip(key, group_key)), **row})
    for row in rows:
        row["fixed MiB"] = round(row["fixed_bytes"] / MIB, 2)
        row["per-sample MiB"] = round(row["per_sample_bytes"] / MIB, 3)
        memory = row["memory_bytes"]
        row["memory GiB"] = round(float(memory) / 2**30, 2) if present(memory) else math.nan
    table = pd.DataFrame(rows, columns=columns)
    for column in FIT_INT_COLUMNS:
        table[column] = pd.array([int(v) if present(v) else pd.NA for v in table[column]], dtype="Int64")
    table[LOWER_BOUND] = table[LOWER_BOUND].astype(bool)
    for column in ("fixed_bytes", "per_sample_bytes", "fixed MiB", "per-sample MiB", "memory GiB"):
        table[column] = table[column].astype(float)
    return table.sort_values([*key, "memory_bytes"]).reset_index(drop=True) if len(table) else table


def _fit_of(mb: pd.Series) -> tuple[float, float]:
    """A max-batch record's (fixed, per-sample) fit bytes, NaN where it has none."""
    fixed, per_sample = mb["fit_fixed_bytes"], mb["fit_per_sample_bytes"]
    return (float(fixed), float(per_sample)) if present(fixed) and present(per_sample) else (math.nan, math.nan)


def _search_fit_row(mb: pd.Series, key: list[str]) -> dict[str, Any]:
    """A fit-table row from a max-batch search record (the search found the max batch itself)."""
    fixed, per_sample = _fit_of(mb)
    return {
        **{k: mb[k] for k in key},
        "source": "max-batch search",
        "fit metric": mb["fit_metric"],
        "points": None,
        "fixed_bytes": fixed,
        "per_sample_bytes": per_sample,
        "memory_bytes": mb["memory_limit_bytes"],
        "measured max batch": mb["max_batch_measured"],
        # the search stopped at its limit without a failure: the true max batch may be larger
        LOWER_BOUND: present(mb["max_batch_measured"]) and not present(mb["first_failing_batch"]),
        "first failing batch": mb["first_failing_batch"],
        "predicted max batch": mb["predicted_max_batch"],
    }


def _budget_fit_row(mb: pd.Series, key: list[str], answer: BudgetAnswer) -> dict[str, Any]:
    """A fit-table row of one budget of a meta max-batch search: its exact answer, the search's fit beside it."""
    fixed, per_sample = _fit_of(mb)
    return {
        **{k: mb[k] for k in key},
        "source": BUDGET_SOURCE,
        "fit metric": mb["fit_metric"],
        "points": None,
        "fixed_bytes": fixed,
        "per_sample_bytes": per_sample,
        "memory_bytes": answer.budget_bytes,
        "measured max batch": answer.max_batch,
        # the search limit fits, or the host stopped the search: the true max batch may be larger
        LOWER_BOUND: answer.max_batch is not None and answer.first_failing_batch is None,
        "first failing batch": answer.first_failing_batch,
        "predicted max batch": None,
        "first_failing_device_bytes": answer.first_failing_device_bytes,
        "host_limit_batch": answer.host_limit_batch,
    }


def budget_answer(row: pd.Series) -> BudgetAnswer | None:
    """The exact answer of a fit-table row from a meta search's budget (None for any other row)."""
    if row["source"] != BUDGET_SOURCE:
        return None

    def number(name: str) -> int | None:
        return int(row[name]) if present(row[name]) else None

    return BudgetAnswer(
        int(row["memory_bytes"]),
        max_batch=number("measured max batch"),
        first_failing_batch=number("first failing batch"),
        first_failing_device_bytes=number("first_failing_device_bytes"),
        host_limit_batch=number("host_limit_batch"),
    )


def _case_fit_row(group: pd.DataFrame) -> dict[str, Any] | None:
    """A fit-table row from one method's case rows (None with fewer than two ok batch sizes)."""
    metric = fit_metric_for(group)
    ok = group[(group["status"] == "ok") & group[metric].notna()]
    if ok["batch_size"].nunique() < 2:
        return None
    fixed, per_sample = affine_fit(list(zip(ok["batch_size"].astype(int), ok[metric].astype(float))))
    largest_ok = int(ok["batch_size"].max())
    failing = group[(group["status"] == "oom") & (group["batch_size"] > largest_ok)]["batch_size"]
    memory = group["device_memory_bytes"].dropna()
    memory_bytes = float(memory.iloc[0]) if len(memory) else None
    return {
        "source": "fit to cases",
        "fit metric": metric,
        "points": len(ok),
        "fixed_bytes": fixed,
        "per_sample_bytes": per_sample,
        "memory_bytes": memory_bytes,
        "measured max batch": largest_ok,
        LOWER_BOUND: not len(failing),
        "first failing batch": int(failing.min()) if len(failing) else None,
        "predicted max batch": predict_max_batch(fixed, per_sample, memory_bytes) if memory_bytes else None,
    }


def measured_max_batch_text(row: pd.Series) -> str:
    """A fit-table row's max batch as text: "32", "≥64" (nothing larger failed), "none"; a meta budget's exact
    answer in words ("nothing fits in 1 KiB: batch 1 needs 2.52 MiB", "≥8 in 80 GiB (host memory limit at …)")."""
    answer = budget_answer(row)
    measured = row["measured max batch"]
    if answer is not None and (not present(measured) or row[LOWER_BOUND]):
        return answer_text(answer)
    if present(measured):
        return f"≥{measured}" if row[LOWER_BOUND] else str(measured)
    return "none"


def fit_display(table: pd.DataFrame) -> pd.DataFrame:
    """The fit table as text: "≥N" for a lower bound, "none" / "n/a" where there is no number, the memory in
    binary units ("memory" instead of "memory GiB": a meta budget may be 1 KiB)."""
    shown = table.drop(columns=[LOWER_BOUND, *_RAW_FIT_COLUMNS]).astype(object)
    for i, row in table.iterrows():
        measured = row["measured max batch"]
        shown.at[i, "measured max batch"] = measured_max_batch_text(row)
        shown.at[i, "first failing batch"] = _number_or(row["first failing batch"], "none")
        shown.at[i, "predicted max batch"] = (
            ""  # exact: nothing to predict
            if row["source"] == BUDGET_SOURCE
            else predicted_max_batch_text(row["predicted max batch"], measured, row["first failing batch"])
        )
        shown.at[i, "memory GiB"] = size_text(row["memory_bytes"]) if present(row["memory_bytes"]) else "n/a"
        shown.at[i, "points"] = _number_or(row["points"], "")
        for column in ("fixed MiB", "per-sample MiB"):
            shown.at[i, column] = _number_or(row[column], "n/a")
    return shown.rename(columns={"memory GiB": "memory"})


def extrapolation_factor(predicted: Any, largest_run: Any) -> float | None:
    """predicted / largest_run when the prediction lies beyond EXTRAPOLATION_LIMIT × the largest batch that ran
    (an extrapolation), else None (no prediction, or one within the limit)."""
    if not present(predicted):
        return None
    if not present(largest_run) or int(largest_run) <= 0:
        return math.inf  # nothing ran: every prediction is an extrapolation
    factor = float(predicted) / float(largest_run)
    return factor if factor > EXTRAPOLATION_LIMIT else None


def predicted_max_batch_text(predicted: Any, largest_run: Any, first_failing: Any = None) -> str:
    """A predicted max batch as text: "619"; "> 64 (extrapolated ×7439)" beyond the extrapolation limit (64 =
    EXTRAPOLATION_LIMIT × the largest batch that ran, 7439 = the prediction over that batch); "fit ~P, but batch
    F failed" where that bound would contradict a failed batch F ≤ 64; "n/a" without a prediction."""
    if not present(predicted):
        return "n/a"
    factor = extrapolation_factor(predicted, largest_run)
    if factor is None:
        return str(int(predicted))
    if math.isinf(factor):
        return "n/a (no batch ran)"
    bound = EXTRAPOLATION_LIMIT * int(largest_run)
    if present(first_failing) and int(first_failing) <= bound:
        return f"fit ~{int(predicted)}, but batch {int(first_failing)} failed"
    return f"> {bound} (extrapolated ×{factor:.0f})"


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def format_number(value: Any) -> str:
    """A cell as text: "" when missing, floats in %g (tiny ones in e-notation), anything else with str()."""
    if not present(value):
        return ""
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


# The most of a record's reason the report writes (a table's footnote and hover, compare's verdict): a library's
# error is a few hundred characters, but nothing bounds it; the record keeps every byte.
REASON_CHARS = 1000


def reason_text(reason: object) -> str:
    """A record's reason as the reports write it: its first line, cut at :data:`REASON_CHARS` characters with an
    ellipsis and a note that the full text is in the result record."""
    line = first_line(reason)
    if len(line) <= REASON_CHARS:
        return line
    return f"{line[:REASON_CHARS]}… (cut at {REASON_CHARS:,} of {len(line):,} characters; full text in the record)"


def markdown_text(text: Any) -> str:
    """Text safe inside Markdown: raw HTML (tags, ``<!--`` comments) and entities escaped, one line, no `|`
    cell breaks. Result names (workloads, methods, error messages) come from input files."""
    escaped = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return escaped.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``table`` (a display frame, or any frame: cells via :func:`format_number`)."""
    header = "| " + " | ".join(markdown_text(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(markdown_text(format_number(v)) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def overhead_warnings(table: pd.DataFrame) -> list[str]:
    """Report warnings about the overhead table: time ratios the run could not vouch for, ratios of two cases'
    medians, and ratios across different torch thread counts."""
    warnings = []
    unreliable = table[table[TIME_VERDICT] == "unreliable"]
    if len(unreliable):
        warnings.append(
            f"{len(unreliable)} time ratio(s) are marked `unreliable`: the run could not vouch for them (other "
            "load on the machine, or round pairs that disagree; overhead.md says which); they are not ranked"
        )
    medians = table[table[TIME_BASIS] == TIME_BASES[1]]
    if len(medians):
        warnings.append(
            f"{len(medians)} time ratio(s) divide two cases' medians timed at different moments (records without "
            "paired non-DP rounds, e.g. written before paired timing): any change of load between them is in the ratio"
        )
    differ = table[table[TIME_VERDICT] == "threads differ"]
    if len(differ):
        warnings.append(
            f"{len(differ)} time ratio(s) divide step times timed with different torch CPU thread counts (e.g. "
            "results merged from different runs); they are marked `threads differ` and not stated in the summary"
        )
    return warnings
