"""What torchrun runs on every rank: ``python -m bench.ranks.worker JOB.json OUT_DIR``.

Ties itself to its launch (bench/ranks/lifeline.py: the kernel kills it when torchrun exits), reads the job,
joins the process group (nccl with GPU ``LOCAL_RANK`` when the case is on cuda, gloo on CPU; its collective
timeout is the case's), runs :func:`bench.ranks.step.run_rank` and writes this rank's record to
``OUT_DIR/rank<RANK>.json`` (written whole, then renamed: a reader never sees half a file). It exits 0 when its
step was ``ok`` or ``unsupported`` (every rank refuses alike), 1 otherwise, so torchrun stops the other ranks
instead of leaving them waiting in a collective.
"""

# ruff: noqa: E402 (the tie to the launch comes before torch's imports)
from __future__ import annotations

import sys

from .lifeline import tie_rank_to_launch

# First of all, only when torchrun runs this module: importing torch takes seconds, and a launch killed meanwhile
# would leave this rank running, orphaned, for all of them.
_LAUNCH_GONE = tie_rank_to_launch() if __name__ == "__main__" else None
if _LAUNCH_GONE is not None:
    sys.exit(f"bench.ranks.worker: {_LAUNCH_GONE}; not running")

import dataclasses
import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import models
from bench.dp.errors import error_text
from bench.results.record import CaseRecord
from bench.results.record import to_jsonl_line as record_line

from .job import RankJob
from .step import rank_figures, run_rank


def rank_file(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.json"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: torchrun ... -m bench.ranks.worker JOB.json OUT_DIR", file=sys.stderr)
        return 2
    job = RankJob.read(argv[0])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    for module in job.workload_modules:
        models.load_workload_module(module)
    if job.torch_threads is not None:
        torch.set_num_threads(job.torch_threads)
    if job.case.device == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=job.timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        record = run_rank(job, rank, device, mesh=mesh)
    except Exception as exc:  # outside the step (mesh, imports): still one line for the record
        record = _failed(job, rank, device, exc)
    _write(rank_file(argv[1], rank), record)
    dist.destroy_process_group()
    return 0 if record.status in ("ok", "unsupported") else 1


def _failed(job: RankJob, rank: int, device: torch.device, exc: BaseException) -> CaseRecord:
    traceback.print_exc()
    record = job.new_record(device, status="error", reason=error_text(exc), peak_rank=rank)
    return dataclasses.replace(record, ranks=[rank_figures(record, rank)])


def _write(path: Path, record: CaseRecord) -> None:
    partial = path.with_suffix(".part")
    partial.write_text(record_line(record) + "\n", encoding="utf-8")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
