"""Check the time model on this CPU: predicted step time ×nondp against measured, per method.

    python -m bench.plan.validate_time dit-s-2-cond --batch 16 --rounds 5
    python -m bench.plan.validate_time gpt-tiny --batch 4 --methods nondp,bk,microbatch

Everything runs on one torch thread and is timed by this thread's CPU time (``time.thread_time``), so that other
load on the machine (a shared CI runner, two cores) does not inflate it. The machine's rates are measured first
(bench/plan/calibrate_cpu.py). Per method the fused step is built on CPU, warmed up, run once under the work
counter (its op groups), then timed: ``--rounds`` rounds of the method, each between two rounds of the non-DP step
of the same workload and batch (a round's ratio is over the mean of the non-DP rounds either side of it, as the
bench pairs them, bench/trackers/timing.py). The table gives the
estimated seconds (roofline over the op groups), the predicted ×nondp, the measured ×nondp (median of the
rounds' ratios, and their min–max), the relative error of the prediction, and which op class takes most of the
estimate.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import models
from bench import dp
from bench.config.cli import OneLineParser
from bench.config.options import comma_list, positive_int
from bench.plan.calibrate_cpu import cpu_roofline
from bench.plan.timemodel import Roofline, estimate
from bench.results.record import StepWork
from bench.trackers.channel import no_mark
from bench.trackers.work import WorkCounter

DEFAULT_METHODS = ("nondp", "bk", "bk-tiled", "opacus-hooks", "opacus-ghost", "torch-func", "microbatch")


def _step(method: str, workload, batch_size: int, seed: int = 0):
    model = workload.build_model("cpu")
    dp.prepare_model(model, workload, dp.DEFAULT_MODE, "cpu")
    privacy = dp.resolve_privacy(1.0)
    generator = torch.Generator().manual_seed(seed + 1)
    return dp.build_step(method, workload, model, privacy=privacy, batch_size=batch_size, noise_generator=generator)


def _seconds(run) -> float:
    start = time.thread_time()
    run()
    return time.thread_time() - start


def _counted(step, batch) -> StepWork:
    counter = WorkCounter()
    with counter:
        step(batch, counter.marker(no_mark))
    return counter.work()


def validate(workload_spec: str, batch_size: int, methods: list[str], rounds: int, machine: Roofline) -> list[dict]:
    """One row per method (module docstring); a method that cannot run has its error as ``reason``."""
    workload = models.get_workload(workload_spec)
    batch = workload.make_batch(batch_size, generator=torch.Generator().manual_seed(0), device="cpu")
    base = _step("nondp", workload, batch_size)
    base(batch)
    base_work = _counted(base, batch)
    base_estimate = estimate(base_work, machine).seconds
    rows = []
    for method in methods:
        try:
            step = base if method == "nondp" else _step(method, workload, batch_size)
            step(batch)  # warm-up: optimizer state, Opacus' lazy state
            work = base_work if method == "nondp" else _counted(step, batch)
            ratios, method_s = [], []
            before = _seconds(lambda: base(batch))
            for _ in range(rounds):
                seconds = _seconds(lambda: step(batch))  # noqa: B023 (called at once)
                after = _seconds(lambda: base(batch))
                ratios.append(seconds / ((before + after) / 2))
                method_s.append(seconds)
                before = after
            if step is not base:
                step.close()
        except Exception as exc:  # a method that cannot run this workload: its error, in the table
            rows.append({"method": method, "reason": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        est = estimate(work, machine)
        predicted = est.seconds / base_estimate
        measured = statistics.median(ratios)
        rows.append(
            {
                "method": method,
                "estimated_s": est.seconds,
                "measured_s": statistics.median(method_s),
                "predicted_x": predicted,
                "measured_x": measured,
                "measured_min_x": min(ratios),
                "measured_max_x": max(ratios),
                "error": predicted / measured - 1,
                "gflop": work.flops / 1e9,
                "gbyte": work.bytes_accessed / 1e9,
                "ops": work.op_count,
                "top_class": max(est.by_class, key=est.by_class.get) if est.by_class else "-",
                "launch_share": est.launch_s / est.seconds,
            }
        )
    base.close()
    return rows


def table(rows: list[dict]) -> str:
    head = "| method | est. s | measured s | pred. ×nondp | meas. ×nondp (min–max) | error | GFLOP | GB | ops | top |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "reason" in r:
            lines.append(f"| {r['method']} | – | – | – | – | – | – | – | – | {r['reason']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['estimated_s']:.3f} | {r['measured_s']:.3f} | {r['predicted_x']:.2f} | "
            f"{r['measured_x']:.2f} ({r['measured_min_x']:.2f}–{r['measured_max_x']:.2f}) | {r['error']:+.0%} | "
            f"{r['gflop']:.1f} | {r['gbyte']:.2f} | {r['ops']} | {r['top_class']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.plan.validate_time", description=__doc__.splitlines()[0])
    parser.add_argument("workload")
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--methods", type=comma_list, default=list(DEFAULT_METHODS))
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    machine = cpu_roofline(clock=time.thread_time)
    print(
        f"CPU roofline: matmul {machine.matmul_flops['float32'] / 1e9:.1f} GFLOP/s, elementwise "
        f"{machine.elementwise_flops / 1e9:.2f} GFLOP/s, bandwidth {machine.bandwidth / 1e9:.1f} GB/s, "
        f"launch {machine.launch_s * 1e6:.1f} µs; {args.workload} batch {args.batch}, {args.rounds} rounds"
    )
    print(table(validate(args.workload, args.batch, args.methods, args.rounds, machine)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
