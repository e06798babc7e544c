"""Capacity planner: which DP method trains this model at what batch on that GPU, before renting one.

    python -m bench.plan dit-xl-2-cond --gpu h100-80gb
    python -m bench.plan gpt2-large:seq_len=128 --memory 40GiB --methods nondp,bk,opacus-hooks
    python -m bench.plan dit-xl-2-cond --gpu a100-80gb --calibrate results/a100.jsonl

Every figure comes from real fused DP steps on the meta device (bench/meta.py: exact live tensor bytes, nothing
allocated), turned into device bytes by the overhead model (bench/overhead.py: defaults, ``--budget-overhead``,
or ``--calibrate`` from real GPU results). Per method it prints the largest batch that fits — exact under the
overhead model: that batch fits and the next one was run and does not (bench/maxbatch.py, ``search_budgets``) —
the fixed and per-sample bytes (the line through those two steps), the breakdown of the peak at that batch, and
how the method compares with non-DP: its max batch over non-DP's, and its peak over non-DP's at the same batch
(non-DP is run at that batch too).

The per-sample loop (``microbatch``) is the exception: it runs B forward/backward passes, each as costly on meta
as a whole batched step, and its peak grows only by the batch and one loss scalar per sample, so its search
stops at ``--microbatch-limit`` (default 8) and reports "≥" that batch.

Exit status: 0 the plan was printed (unsupported methods are part of it), 1 a method failed unexpectedly,
2 a usage error (one line on stderr), 130 interrupted (Ctrl-C: one line).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field

from bench.cli import OneLineParser, run, usage_error
from bench.gpus import GPUS, get_gpu
from bench.options import ATTENTION_CHOICES, byte_size, comma_list, positive_int

PROG = "python -m bench.plan"
GIB = 2**30
MIB = 2**20
DEFAULT_GPU = "h100-80gb"
DEFAULT_MICROBATCH_LIMIT = 8


@dataclass
class PlanRow:
    """One method's answer for one memory budget."""

    method: str
    status: str = "ok"
    reason: str = ""
    max_batch: int | None = None
    at_limit: bool = False  # the search limit itself fits: the true max batch is at least max_batch
    peak_tensor_bytes: int | None = None  # at max_batch
    device_bytes: int | None = None  # at max_batch, through the overhead model
    fixed_bytes: float | None = None  # the line through the probes at max_batch and max_batch + 1
    per_sample_bytes: float | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    nondp_peak_bytes: int | None = None  # non-DP's peak at the same batch
    probes: int = 0
    seconds: float = 0.0


class _Prober:
    """Runs meta cases of one workload and remembers them by (method, batch)."""

    def __init__(self, workload: str, config):
        self.workload, self.config = workload, config
        self.records: dict[tuple[str, int], object] = {}

    def __call__(self, method: str, batch_size: int):
        from bench.case import CaseSpec, run_case

        key = (method, batch_size)
        if key not in self.records:
            precision, checkpointing = self.config.precisions[0], self.config.checkpointings[0]
            spec = CaseSpec(self.workload, method, batch_size, "meta", precision=precision, checkpointing=checkpointing)
            self.records[key] = run_case(spec, self.config, None)
        return self.records[key]


def plan_method(prober: _Prober, method: str, budget: int, limit: int) -> PlanRow:
    """Search ``method``'s exact max batch for ``budget`` and describe it (see the module docstring)."""
    from bench import maxbatch
    from bench.record import BatchProbe

    start = time.perf_counter()
    row = PlanRow(method)

    def probe(b: int):
        record = prober(method, b)
        result = BatchProbe(b, record.status, record.memory.peak_tensor_bytes)
        return result, dict(record.memory.breakdown)

    (answer,), probes = maxbatch.search_budgets(probe, [budget], prober.config.overhead, limit)
    row.probes, row.seconds = len(probes), time.perf_counter() - start
    failed = next((p for p in probes if p.status != "ok"), None)
    if failed is not None:
        record = prober(method, failed.batch_size)
        row.status, row.reason = record.status, record.reason
        return row
    row.max_batch, row.at_limit = answer.max_batch, answer.max_batch == limit and answer.first_failing_batch is None
    row.peak_tensor_bytes, row.device_bytes, row.breakdown = (
        answer.peak_tensor_bytes,
        answer.device_bytes,
        answer.breakdown,
    )
    if answer.max_batch is not None:
        near = [
            b for b in (answer.max_batch - 1, answer.max_batch, answer.max_batch + 1) if (method, b) in prober.records
        ]
        if len(near) >= 2:
            b0, b1 = near[-2], near[-1]
            y0, y1 = prober(method, b0).memory.peak_tensor_bytes, prober(method, b1).memory.peak_tensor_bytes
            row.per_sample_bytes = (y1 - y0) / (b1 - b0)
            row.fixed_bytes = y0 - row.per_sample_bytes * b0
    return row


def _gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def format_plan(workload: str, budget_text: str, config, rows: list[PlanRow]) -> str:
    """The plan as a Markdown table plus the lines that say what it rests on."""
    from bench.dp import TrainingMode

    nondp = next((r for r in rows if r.method == "nondp" and r.status == "ok"), None)
    lines = [
        f"Capacity plan: {workload} on {budget_text} (predicted on the meta device; "
        f"{TrainingMode(config.precisions[0], config.checkpointings[0]).label}; attention {config.attention})",
        f"Overhead model: {config.overhead.describe()}",
        "",
        "| method | max batch | × nondp batch | peak tensor GiB | device GiB | fixed GiB | per sample MiB "
        "| peak × nondp @ batch | breakdown at max batch (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.method} | {r.status} | | | | | | | {r.reason.splitlines()[0][:140]} |")
            continue
        batch = "none" if r.max_batch is None else (f"≥{r.max_batch}" if r.at_limit else str(r.max_batch))
        ratio = (
            f"{r.max_batch / nondp.max_batch:.2f}"
            if nondp is not None and nondp.max_batch and r.max_batch and not (nondp.at_limit or r.at_limit)
            else "—"
        )
        mem_ratio = f"{r.peak_tensor_bytes / r.nondp_peak_bytes:.3f}" if r.nondp_peak_bytes else "—"
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.breakdown.items() if v >= 0.005 * GIB)
        per_sample = "—" if r.per_sample_bytes is None else f"{r.per_sample_bytes / MIB:.1f}"
        lines.append(
            f"| {r.method} | {batch} | {ratio} | {_gib(r.peak_tensor_bytes)} | {_gib(r.device_bytes)} "
            f"| {_gib(r.fixed_bytes)} | {per_sample} | {mem_ratio} | {parts} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("workload", help="workload spec, e.g. dit-xl-2-cond or gpt2-large:seq_len=128")
    parser.add_argument("--methods", type=comma_list, help="comma list of DP methods (default: every one)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--gpu", help=f"a GPU from the catalogue (default {DEFAULT_GPU}): {', '.join(GPUS)}")
    where.add_argument("--memory", type=byte_size, help="the memory to plan for instead, e.g. 80GiB")
    parser.add_argument("--attention", default="auto", help=f"attention kernel: {', '.join(ATTENTION_CHOICES)}")
    parser.add_argument("--budget-overhead", help="FIXED+PERCENT beyond tensor bytes (default 1GiB+10%%)")
    parser.add_argument("--calibrate", type=comma_list, metavar="FILES", help="fit the overhead from GPU results")
    parser.add_argument("--calibrate-gpu", metavar="NAME", help="with --calibrate: the GPU model to use")
    parser.add_argument("--optimizer", default="adamw", help="adamw (default), adam or sgd")
    parser.add_argument(
        "--precision", default="fp32", help="fp32 (default) or bf16 (weights, gradients, optimizer state in bf16)"
    )
    parser.add_argument("--checkpointing", default="none", help="none (default) or blocks (every block checkpointed)")
    parser.add_argument("--max-batch-limit", type=positive_int, default=4096, help="largest batch searched (4096)")
    parser.add_argument(
        "--microbatch-limit",
        type=positive_int,
        default=DEFAULT_MICROBATCH_LIMIT,
        help=f"largest batch searched for the per-sample loop (default {DEFAULT_MICROBATCH_LIMIT})",
    )
    return parser


def _config(args: argparse.Namespace, sm: tuple[int, int]):
    """The BenchConfig of the plan's meta cases; ValueError (one line) for a bad value."""
    import models
    from bench import dp
    from bench.config import BenchConfig, resolve_overhead
    from bench.options import check_names, overhead_model

    workload = models.get_workload(args.workload).name
    methods = tuple(args.methods or dp.available_methods())
    check_names("--methods", methods, dp.available_methods())
    check_names("--attention", [args.attention], ATTENTION_CHOICES)
    check_names("--optimizer", [args.optimizer], list(dp.OPTIMIZERS))
    check_names("--precision", [args.precision], dp.PRECISIONS)
    check_names("--checkpointing", [args.checkpointing], dp.CHECKPOINTINGS)
    if dp.TrainingMode(args.precision).autocast_dtype is not None:  # refused on meta: say so before any step runs
        raise ValueError(
            f"--precision {args.precision}: autocast does not run on the meta device, so a plan would predict an fp32 "
            "forward; plan fp32 or bf16 (with or without --checkpointing blocks), measure amp on a GPU"
        )
    given = overhead_model(args.budget_overhead) if args.budget_overhead else None
    return BenchConfig(
        preset="plan",
        workloads=(workload,),
        methods=methods,
        batch_sizes=(),
        devices=("meta",),
        rounds=1,
        privacy=dp.resolve_privacy(1.0),
        optimizer=args.optimizer,
        precisions=(args.precision,),
        checkpointings=(args.checkpointing,),
        attention=args.attention,
        attention_sm=sm,
        overhead=resolve_overhead(given, args.calibrate, args.calibrate_gpu),
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import models
    from bench import dp

    try:
        gpu = get_gpu(args.gpu or DEFAULT_GPU) if args.memory is None else None
        config = _config(args, gpu.sm if gpu else (8, 0))
    except (ValueError, argparse.ArgumentTypeError, models.WorkloadError, dp.DPConfigError) as exc:
        return usage_error(PROG, str(exc))
    budget = gpu.memory_bytes if gpu else args.memory
    budget_text = f"{gpu.name} ({gpu.memory_bytes / GIB:.0f} GiB)" if gpu else f"{budget / GIB:.2f} GiB"
    warnings.filterwarnings("ignore")  # Opacus' and torch's UserWarnings would bury the table
    prober = _Prober(config.workloads[0], config)
    rows = []
    for method in config.methods:
        limit = min(args.max_batch_limit, args.microbatch_limit) if method == "microbatch" else args.max_batch_limit
        rows.append(plan_method(prober, method, budget, limit))
        print(f"  {method}: {rows[-1].status}, {rows[-1].probes} meta steps, {rows[-1].seconds:.1f} s", file=sys.stderr)
    for row in rows:  # non-DP's peak at each method's max batch: one more meta step per distinct batch
        if row.status == "ok" and row.max_batch is not None:
            nondp = prober("nondp", row.max_batch)
            row.nondp_peak_bytes = nondp.memory.peak_tensor_bytes if nondp.status == "ok" else None
    print(format_plan(config.workloads[0], budget_text, config, rows))
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
