"""Run the bench on every GPU of one machine at once: one pytest process per GPU.

pytest-benchmark disables itself under pytest-xdist, so parallel GPUs need separate pytest processes. Each
child sees one GPU (``CUDA_VISIBLE_DEVICES=<that GPU>``, so inside it the GPU is ``cuda:0``) and writes its own
``gpu<i>.json`` (pytest-benchmark) and ``gpu<i>.jsonl`` (crash-safe records) into ``--out``; the report then
reads them all:

    python -m bench.multi_gpu --out results/multi -- --preset gpu-small
    python -m reports results/multi/*.json --out report/

``--gpus`` takes positions in this process's visible GPUs, like torch's ``cuda:<i>``: under
``CUDA_VISIBLE_DEVICES=2,3``, ``--gpus 0`` is physical GPU 2 (entries that are UUIDs or MIG ids are handed on
as they are). Child ``i`` is labelled ``<parent label>-gpu<i>`` (the parent label: ``--runner-label`` among the
pytest arguments, else ``$DPMEM_RUNNER_LABEL``) or ``gpu<i>`` without one, so every GPU is its own report row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.config.cli import OneLineParser, pytest_bench_command, run

USAGE_ERROR = 2


class LaunchError(ValueError):
    """A bad ``--gpus`` / visible-device combination; one line."""


@dataclass(frozen=True)
class Child:
    """One pytest process: the GPU's position in the parent's visible list, what the child's
    CUDA_VISIBLE_DEVICES holds (an ordinal, ``GPU-<uuid>`` or ``MIG-<uuid>``), and its runner label."""

    position: int
    visible_entry: str
    runner_label: str


def visible_entries(cuda_visible_devices: str | None, device_count: int | None = None) -> list[str]:
    """The parent's visible GPUs in torch's order: the CUDA_VISIBLE_DEVICES entries when set, else ordinals
    ``0..device_count-1`` (``device_count`` defaults to torch's)."""
    if cuda_visible_devices is not None:
        return [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def plan_children(gpus: str | None, visible: list[str], parent_label: str | None) -> list[Child]:
    """One :class:`Child` per ``--gpus`` position (every visible GPU when None); :class:`LaunchError` for a
    position that is not an integer, not visible, or repeated."""
    if not visible:
        raise LaunchError("no GPU visible (CUDA_VISIBLE_DEVICES is empty or torch sees no CUDA device)")
    valid = f"valid positions: 0..{len(visible) - 1} (visible GPUs: {','.join(visible)})"
    if gpus is None:
        positions = list(range(len(visible)))
    else:
        items = [item.strip() for item in gpus.split(",") if item.strip()]
        if not items:
            raise LaunchError(f"--gpus is empty; {valid}")
        positions = []
        for item in items:
            if not item.isdigit() or int(item) >= len(visible):
                raise LaunchError(f"--gpus {item!r} is not a visible GPU position; {valid}")
            if int(item) in positions:
                raise LaunchError(f"--gpus {item!r} given more than once")
            positions.append(int(item))
    return [Child(i, visible[i], f"{parent_label}-gpu{i}" if parent_label else f"gpu{i}") for i in positions]


def split_runner_label(pytest_args: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--runner-label X`` / ``--runner-label=X`` out of the children's pytest arguments: it is the parent
    label the children's own labels are built from (left in, every child would carry the same label)."""
    label, rest = None, []
    args = iter(pytest_args)
    for arg in args:
        if arg == "--runner-label":
            label = next(args, None)
            if label is None:
                raise LaunchError("--runner-label needs a value")
        elif arg.startswith("--runner-label="):
            label = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return label, rest


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineParser(
        prog="python -m bench.multi_gpu",
        description="One pytest-benchmark process per GPU, in parallel; arguments after -- go to each pytest.",
    )
    parser.add_argument(
        "--gpus",
        default=None,
        help="comma list of GPU positions among the visible GPUs, as in cuda:<i> (default: every visible GPU)",
    )
    parser.add_argument(
        "--out", default="results/multi", help="folder for gpu<i>.json/.jsonl/.log (default results/multi)"
    )
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between progress lines (default 10)")
    # The device each child benchmarks. With CUDA_VISIBLE_DEVICES=<one GPU> it is cuda:0; tests use cpu.
    parser.add_argument("--child-device", default="cuda:0", help=argparse.SUPPRESS)
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args and pytest_args[0] == "--":
        pytest_args = pytest_args[1:]
    return args, pytest_args


def _child_command(child: Child, child_device: str, out: Path, pytest_args: list[str]) -> list[str]:
    name = f"gpu{child.position}"
    return pytest_bench_command(
        "--devices",
        child_device,
        f"--benchmark-json={out / f'{name}.json'}",
        f"--results={out / f'{name}.jsonl'}",
        *pytest_args,
    )


def _wait(running: list[tuple[Child, subprocess.Popen]], out: Path, poll_s: float) -> None:
    """Wait for every child, printing each one's finished case count every ``poll_s`` seconds."""
    start = last_report = time.monotonic()
    while any(proc.poll() is None for _, proc in running):
        time.sleep(0.2)
        if time.monotonic() - last_report >= poll_s:
            last_report = time.monotonic()
            done = ", ".join(
                f"GPU {c.position}: {_count_lines(out / f'gpu{c.position}.jsonl')} cases"
                + ("" if p.poll() is None else " (done)")
                for c, p in running
            )
            print(f"multi_gpu: {last_report - start:.0f} s — {done}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = _parse(argv)
    try:
        if args.poll <= 0:
            raise LaunchError(f"--poll must be > 0, got {args.poll}")
        label_arg, pytest_args = split_runner_label(pytest_args)
        parent_label = label_arg or os.environ.get("DPMEM_RUNNER_LABEL") or None
        children = plan_children(args.gpus, visible_entries(os.environ.get("CUDA_VISIBLE_DEVICES")), parent_label)
    except LaunchError as exc:
        print(f"multi_gpu: {exc}", file=sys.stderr)
        return USAGE_ERROR
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    running = []
    with ExitStack() as logs:  # each child's log stays open until every child exited
        for child in children:
            cmd = _child_command(child, args.child_device, out, pytest_args)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": child.visible_entry, "DPMEM_RUNNER_LABEL": child.runner_label}
            log = logs.enter_context(open(out / f"gpu{child.position}.log", "w"))
            print(
                f"multi_gpu: GPU {child.position} (CUDA_VISIBLE_DEVICES={child.visible_entry}, label "
                f"{child.runner_label}): {' '.join(cmd[1:])} (log {log.name})",
                flush=True,
            )
            running.append((child, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        _wait(running, out, args.poll)

    worst = 0
    for child, proc in running:
        result = out / f"gpu{child.position}.json"
        print(f"multi_gpu: GPU {child.position} exited {proc.returncode}; results {result}", flush=True)
        worst = worst or proc.returncode
    files = " ".join(str(out / f"gpu{c.position}.json") for c in children)
    print(f"multi_gpu: render with: python -m reports {files} --out report/", flush=True)
    return worst


if __name__ == "__main__":
    sys.exit(run(main, "python -m bench.multi_gpu"))
