"""Synthetic dpmem results for the reports tests, built with the real record classes (bench.results.record).

A two-GPU (A100 40 GB, H100 80 GB), two-workload (DiT, GPT proxy), four-method run with a per-method memory model
peak = fixed + per_sample · B, written in both formats the bench produces (pytest-benchmark JSON with timed cases
in ``benchmarks`` and untimed ones in ``dpmem_untimed``, and JSON lines).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from bench.results.record import CaseRecord, Phase, RankFigures, Timeline, combine_rank_records, to_jsonl_line

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
GIB = 2**30

# Per-method memory model: peak = fixed + per_sample · B (bytes), and step time relative to nondp.
METHODS = {
    "nondp": (1.20 * GIB, 60 * MIB, 1.00),
    "bk": (1.21 * GIB, 62 * MIB, 1.18),
    "opacus-ghost": (1.25 * GIB, 66 * MIB, 1.60),
    "opacus-hooks": (1.30 * GIB, 700 * MIB, 1.35),
}
BATCHES = (8, 16, 32, 64)
GPUS = {"a100": ("NVIDIA A100-SXM4-40GB", 40 * GIB, 1.0), "h100": ("NVIDIA H100 80GB HBM3", 80 * GIB, 0.55)}
WORKLOADS = {"dit-s-2-cond": ("dit", 256, 1.0), "gpt-proxy-256": ("gpt", 256, 0.8)}
RELATIVE_IQR = 0.02  # every synthetic timed case: IQR = 2 % of its median (so every DP time ratio is beyond noise)


def make_case(
    workload: str, method: str, batch: int, gpu: str, *, scale: float = 1.0, status: str | None = None
) -> CaseRecord:
    """One CUDA case with every figure a GPU run fills; OOM where the modelled peak exceeds the GPU's memory."""
    fixed, per_sample, time_factor = METHODS[method]
    _family, tokens, size = WORKLOADS[workload]
    gpu_name, gpu_memory, speed = GPUS[gpu]
    peak_tensor = int((fixed + per_sample * batch) * size * scale)
    oom = peak_tensor * 1.1 > gpu_memory
    status = status or ("oom" if oom else "ok")
    record = CaseRecord(
        workload=workload,
        method=method,
        batch_size=batch,
        device="cuda:0",
        status=status,
        device_name=gpu_name,
        device_memory_bytes=gpu_memory,
        runner_label=gpu,
        tokens_per_sample=tokens,
        params_total=32_963_360,
        params_trainable=32_897_824,
    )
    if status == "oom":
        record.reason = f"CUDA out of memory. Tried to allocate {per_sample // MIB} MiB"
        return record
    baseline = int(fixed * size * 0.6)
    memory = record.memory
    memory.peak_tensor_bytes = peak_tensor
    memory.baseline_tensor_bytes = baseline
    memory.peak_allocated_bytes = int(peak_tensor * 1.02)
    memory.peak_reserved_bytes = int(peak_tensor * 1.10)
    memory.nvml_baseline_bytes = 520 * MIB
    memory.nvml_peak_used_bytes = memory.peak_reserved_bytes + memory.nvml_baseline_bytes
    memory.nvml_peak_minus_baseline_bytes = memory.peak_reserved_bytes
    memory.peak_rss_bytes = 3 * GIB
    memory.nvml_samples = 40
    share = (peak_tensor - baseline) // 3
    memory.breakdown = {
        "parameters": baseline // 4,
        "gradients": baseline // 4,
        "optimizer_state": baseline // 2,
        "activations": share * (1 if method == "opacus-hooks" else 3),
        "per_sample": 2 * share if method == "opacus-hooks" else 0,
        "other": 0,
    }
    memory.peak_phase = "backward"
    step = batch * time_factor * speed * size * 2e-3
    memory.phases = [
        Phase("forward", 0.0, 0.3 * step),
        Phase("backward", 0.3 * step, 0.8 * step),
        Phase("clip", 0.8 * step, 0.85 * step),
        Phase("noise", 0.85 * step, 0.9 * step),
        Phase("optimizer", 0.9 * step, step),
    ]
    t = [step * i / 20 for i in range(21)]
    shape = [baseline + (peak_tensor - baseline) * min(i, 20 - i) / 10 for i in range(21)]
    memory.timeline = Timeline(
        t_s=t,
        tensor_bytes=[int(v) for v in shape],
        allocated_bytes=[int(v * 1.02) for v in shape],
        nvml_used_bytes=[int(v * 1.1) + 520 * MIB for v in shape],
    )
    timing = record.timing
    timing.time_median_s, timing.time_mean_s, timing.time_min_s = step, step * 1.01, step * 0.98
    timing.time_stddev_s, timing.time_iqr_s = step * 0.01, step * RELATIVE_IQR
    timing.rounds, timing.torch_threads = 5, 8
    record.noise_multiplier, record.max_grad_norm, record.optimizer = 1.0, 1.0, "adamw"
    return record


def make_ranked_case(
    method: str, world: int, parallel: str, per_rank_mib: float, *, batch: int = 16, gpu: str = "a100", ranks=None
) -> CaseRecord:
    """A case of ``world`` ranks on ``gpu`` (all of them, or the given ``ranks``: one node's share); rank r peaks at
    ``per_rank_mib`` + r MiB."""
    base = make_case("dit-s-2-cond", method, batch, gpu)
    parts = []
    for rank in ranks if ranks is not None else range(world):
        peak = int((per_rank_mib + rank) * MIB)
        memory = dataclasses.replace(base.memory, peak_tensor_bytes=peak, breakdown={"other": peak})
        part = dataclasses.replace(base, device="cuda", world_size=world, parallel=parallel, memory=memory)
        part.ranks = [RankFigures(rank=rank, device=f"cuda:{rank % 8}", peak_tensor_bytes=peak)]
        part.peak_rank = rank
        parts.append(part)
    return combine_rank_records(parts)


def make_run(gpu: str, *, scale: float = 1.0) -> list[CaseRecord]:
    return [make_case(w, m, b, gpu, scale=scale) for w in WORKLOADS for m in METHODS for b in BATCHES]


def copy_record(record: CaseRecord) -> CaseRecord:
    return CaseRecord.from_dict(record.to_dict())


def benchmark_json(records: list[CaseRecord], gpu: str | None) -> dict:
    """What pytest-benchmark writes with the dpmem hooks: timed cases in benchmarks, the rest in dpmem_untimed."""
    benchmarks, untimed = [], []
    for r in records:
        entry = {
            "name": f"test_dp_step[{r.workload}-{r.method}-{r.batch_size}-{r.device}]",
            "params": {"workload": r.workload, "method": r.method, "batch_size": r.batch_size, "device": r.device},
            "extra_info": r.to_dict(),
        }
        if r.timing.time_median_s is None:
            untimed.append(entry)
            continue
        stats = {
            "median": r.timing.time_median_s,
            "mean": r.timing.time_mean_s,
            "min": r.timing.time_min_s,
            "max": r.timing.time_median_s * 1.05,
            "stddev": r.timing.time_stddev_s,
            "iqr": r.timing.time_iqr_s,
            "rounds": r.timing.rounds,
        }
        benchmarks.append({**entry, "stats": stats})
    gpus = []
    if gpu:
        gpus = [
            {
                "name": GPUS[gpu][0],
                "memory_total_bytes": GPUS[gpu][1],
                "driver_version": "550.54",
                "cuda_version": "12.4",
                "mig_mode": None,
            }
        ]
    return {
        "machine_info": {
            "node": "runner",
            "dpmem": {
                "gpus": gpus,
                "runner_label": gpu,
                "torch": "2.13.0",
                "opacus": "1.6.0",
                "nvidia_ml_py": "12.560",
                "cpu": "x86_64",
            },
        },
        "commit_info": {"id": "0" * 40},
        "benchmarks": benchmarks,
        "dpmem_untimed": untimed,
        "datetime": "2025-01-01T00:00:00",
        "version": "5.3.0",
    }


def write_benchmark(path: Path, records: list[CaseRecord], gpu: str | None) -> Path:
    path.write_text(json.dumps(benchmark_json(records, gpu), indent=4))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(to_jsonl_line(r) + "\n" for r in records))
    return path


def write_two_gpu_files(folder: Path) -> tuple[Path, Path]:
    """An A100 run as pytest-benchmark JSON and an H100 run as JSON lines."""
    return (
        write_benchmark(folder / "a100.json", make_run("a100"), "a100"),
        write_jsonl(folder / "h100.jsonl", make_run("h100")),
    )


def run_cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m reports ARGS`` in a subprocess (for exit codes and what reaches stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "reports", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def independent_ratios(benchmark_path: Path) -> dict[tuple, dict[str, object]]:
    """Overhead cells recomputed from the raw pytest-benchmark JSON with the json module only: a number, or the
    DP case's status where it did not run ok."""
    data = json.loads(benchmark_path.read_text())
    label = data["machine_info"]["dpmem"]["runner_label"]
    by_case = {}
    for bench in [*data["benchmarks"], *data["dpmem_untimed"]]:
        e = bench["extra_info"]
        median = bench["stats"]["median"] if "stats" in bench else None
        by_case[(e["workload"], e["batch_size"], e["method"])] = (e, median)
    out = {}
    for (workload, batch, method), (e, median) in by_case.items():
        if method == "nondp":
            continue
        base, base_median = by_case[(workload, batch, "nondp")]
        if e["status"] != "ok":
            out[(label, workload, batch, method)] = {"status": e["status"]}
        else:
            out[(label, workload, batch, method)] = {
                "status": "ok",
                "tensor": e["peak_tensor_bytes"] / base["peak_tensor_bytes"],
                "reserved": e["peak_reserved_bytes"] / base["peak_reserved_bytes"],
                "time": median / base_median,
            }
    return out


def make_jax_case(method: str, batch: int, *, peak_tensor_bytes: int, paired_time_ratio: float) -> CaseRecord:
    """A JAX method's CPU case with the fields a real one has (bench/case/jax_case.py, a real ``jax-vmap`` record
    of dit-tiny-cond read for them): ``measurement`` "xla-compiled", XLA's buffer assignment in
    ``peak_tensor_bytes``, RSS measured, timed rounds paired with torch nondp, no tracker breakdown or phases and
    no work counts."""
    record = CaseRecord(
        workload="dit-tiny-cond",
        method=method,
        batch_size=batch,
        device="cpu",
        measurement="xla-compiled",
        device_name="AMD EPYC",
        device_memory_bytes=25 * GIB,
        family="dit",
        params_total=183_200,
        params_trainable=182_176,
        tokens_per_sample=16,
        optimizer="adamw",
        optimizer_impl="optax",
        notes=[
            "jax: step compiled in 20.12 s (setup: not in any timed round)",
            "xla: temp 6239232 B, arguments 2198444 B, outputs 2186896 B, aliases 2186124 B",
        ],
    )
    record.memory.peak_tensor_bytes = peak_tensor_bytes
    record.memory.baseline_tensor_bytes = 2_198_444
    record.memory.peak_rss_bytes, record.memory.baseline_rss_bytes = 1_304_088_576, 1_297_276_928
    timing = record.timing
    timing.time_median_s = timing.time_mean_s = timing.time_min_s = 0.0271
    timing.time_iqr_s, timing.rounds, timing.iterations, timing.torch_threads = 0.0003, 3, 5, 2
    timing.paired_time_ratio, timing.paired_time_ratio_iqr = paired_time_ratio, 0.01
    timing.round_times_s = [0.0271, 0.0270, 0.0273]
    timing.paired_nondp_round_times_s = [t / paired_time_ratio for t in (0.0271, 0.0270, 0.0273, 0.0271)]
    timing.time_reliable = True
    return record
