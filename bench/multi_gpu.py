"""Run the bench on every GPU of one machine at once: one pytest process per GPU.

pytest-benchmark disables itself under pytest-xdist, so parallel GPUs need separate pytest processes. Each
child sees one GPU (``CUDA_VISIBLE_DEVICES=<index>``, so inside it the GPU is ``cuda:0``) and writes its own
``gpu<index>.json`` (pytest-benchmark) and ``gpu<index>.jsonl`` (crash-safe records) into ``--out``; the
report then reads them all:

    python -m bench.multi_gpu --out results/multi -- --preset gpu-small
    python -m reports results/multi/*.json --out report/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _visible_gpu_indices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [s.strip() for s in env.split(",") if s.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.multi_gpu",
        description="One pytest-benchmark process per GPU, in parallel; arguments after -- go to each pytest.",
    )
    parser.add_argument("--gpus", default=None, help="comma list of GPU indices (default: every visible GPU)")
    parser.add_argument(
        "--out", default="results/multi", help="folder for gpu<i>.json/.jsonl/.log (default results/multi)"
    )
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between progress lines (default 10)")
    # The device each child benchmarks. With CUDA_VISIBLE_DEVICES=<i> it is cuda:0; tests use cpu.
    parser.add_argument("--child-device", default="cuda:0", help=argparse.SUPPRESS)
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args and pytest_args[0] == "--":
        pytest_args = pytest_args[1:]

    gpus = [s.strip() for s in args.gpus.split(",") if s.strip()] if args.gpus else _visible_gpu_indices()
    if not gpus:
        print("multi_gpu: no GPU visible (give --gpus to choose indices)", file=sys.stderr)
        return 2
    if args.poll <= 0:
        print(f"multi_gpu: --poll must be > 0, got {args.poll}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    children = []
    for index in gpus:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "bench/",
            "-q",
            "-p",
            "no:cacheprovider",
            "--devices",
            args.child_device,
            f"--benchmark-json={out / f'gpu{index}.json'}",
            f"--results={out / f'gpu{index}.jsonl'}",
            *pytest_args,
        ]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": index}
        env.setdefault("DPMEM_RUNNER_LABEL", f"gpu{index}")
        log = open(out / f"gpu{index}.log", "w")  # noqa: SIM115 - closed when the child exits
        print(f"multi_gpu: GPU {index}: {' '.join(cmd[1:])} (log {log.name})", flush=True)
        children.append((index, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))

    start = last_report = time.monotonic()
    while any(proc.poll() is None for _, proc, _ in children):
        time.sleep(0.2)
        if time.monotonic() - last_report >= args.poll:
            last_report = time.monotonic()
            done = ", ".join(
                f"GPU {i}: {_count_lines(out / f'gpu{i}.jsonl')} cases" + ("" if p.poll() is None else " (done)")
                for i, p, _ in children
            )
            print(f"multi_gpu: {last_report - start:.0f} s — {done}", flush=True)

    worst = 0
    for index, proc, log in children:
        log.close()
        print(f"multi_gpu: GPU {index} exited {proc.returncode}; results {out / f'gpu{index}.json'}", flush=True)
        worst = worst or proc.returncode
    files = " ".join(str(out / f"gpu{i}.json") for i in gpus)
    print(f"multi_gpu: render with: python -m reports {files} --out report/", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(main())
