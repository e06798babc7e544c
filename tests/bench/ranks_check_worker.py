"""Run by torchrun (2 ranks, gloo) from tests/bench/test_ranks.py: every method × strategy, in sequence, on each rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.bench.ranks_check_worker OUT.json

For each (method, strategy), fused parallel steps of the bench (bench/dp/parallel.py) on this rank's half of the
global batch:

1. every pair, noise off (σ = 0, SGD at lr 0): the gradient the step leaves, × the global batch, gathered whole,
   compared with the one-process clipped sum over the whole global batch (the per-sample loop; Σ g_i for nondp);
2. one pair per noise path (NOISE_CHECKED: Opacus' DistributedDPOptimizer, its ghost-clipping twin under DPDDP,
   ghost_fsdp, and the clipped-sum methods' shared reducer): σ = 1, the noise in that gradient (× B, less the
   noise-free sum), its standard deviation over every element relative to σ·C, and whether the ranks agree;
3. the pairs whose per-rank memory the tests compare with the fake-process-group prediction (MEASURED): the
   bench's own rank step (bench.ranks.step.run_rank), as a many-rank case measures it, its tensor tracker also
   noting the storages whose last reference another thread dropped (:class:`ReleaseThreadTracker`).

Rank 0 writes one JSON object: {"<method>/<strategy>": {...}} (tests/bench/test_ranks.py reads it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

import models
from bench import dp
from bench.case.spec import CaseSpec
from bench.dp.parallel import build_parallel_step
from bench.ranks.job import RankJob
from bench.ranks.step import local_batch, run_rank
from bench.trackers.memory import measure
from bench.trackers.memory.tensors import TensorTracker

WORKLOAD = "dit-tiny-cond"
BATCH = 4  # global: 2 samples per rank
CLIP = 0.5  # small enough that some of the tiny model's samples are clipped and some not
NOISE_CHECKED = {("opacus-hooks", "ddp"), ("opacus-ghost", "ddp"), ("opacus-ghost", "fsdp"), ("bk", "ddp")}
MEASURED = {("nondp", "fsdp"), ("opacus-ghost", "fsdp"), ("bk", "ddp")}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP's sharded DTensor


def _gradient(method: str, parallel: str, sigma: float, mesh, rank: int) -> tuple[str, str, dict]:
    """(status, reason, {name: gradient × B}) after one fused parallel step."""
    workload = models.get_workload(WORKLOAD)
    model = workload.build_model("cpu")
    case = CaseSpec(WORKLOAD, method, BATCH, "cpu", 2, parallel)
    job = RankJob(case, dp.resolve_privacy(CLIP, noise_multiplier=sigma))
    try:
        step = build_parallel_step(
            method,
            parallel,
            workload,
            model,
            privacy=job.privacy,
            batch_size=BATCH,
            optimizer="sgd",
            lr=0.0,
            noise_generator=torch.Generator().manual_seed(7),
            mesh=mesh,
        )
    except dp.MethodUnsupported as exc:
        return "unsupported", str(exc), {}
    try:
        step(local_batch(workload, job, rank, torch.device("cpu")))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return "ok", "", {n: _whole(p.grad).detach() * BATCH for n, p in params.items()}
    finally:
        step.close()


def measured_job(method: str, parallel: str) -> RankJob:
    """The job of a MEASURED pair (the tests predict the same job); RSS sampled slowly: only tensors are compared."""
    case = CaseSpec(WORKLOAD, method, BATCH, "cpu", 2, parallel)
    return RankJob(case, dp.resolve_privacy(1.0), rounds=0, sample_interval_s=0.05)


class ReleaseThreadTracker(TensorTracker):
    """The tensor tracker, also summing the bytes of the storages made during the step whose last reference a
    thread other than the step's dropped: gloo's worker threads. A gloo worker keeps the Work of the collective
    it ran (which holds the collective's input and output) until it loops back for the next one, after the
    step's thread was woken; on a busy machine it is descheduled in between and a buffer FSDP has already let go
    (the previous reduce-scatter input, an all-gather output) stays alive past where the program frees it."""

    def __enter__(self):
        self.step_thread = threading.get_ident()
        self.released_elsewhere_bytes = 0
        return super().__enter__()

    def _on_free(self, key: int) -> None:
        entry = self._live.get(key)
        late = entry is not None and self._recording and threading.get_ident() != self.step_thread
        if late and entry[0] not in self._adopted:  # adopted storages are gloo's own, counted from the start
            self.released_elsewhere_bytes += entry[1]
        super()._on_free(key)


@contextmanager
def _observing_release_threads() -> Iterator[list[ReleaseThreadTracker]]:
    """The measured round's tracker is a :class:`ReleaseThreadTracker`; the list gets each one made."""
    made: list[ReleaseThreadTracker] = []

    def tracker(*args, **kwargs) -> ReleaseThreadTracker:
        made.append(ReleaseThreadTracker(*args, **kwargs))
        return made[-1]

    original, measure.TensorTracker = measure.TensorTracker, tracker
    try:
        yield made
    finally:
        measure.TensorTracker = original


def _measured(method: str, parallel: str, rank: int, mesh) -> list[dict]:
    """Every rank's record of the pair (status and memory figures, and the bytes gloo's threads released last:
    ``released_by_other_threads_bytes``), gathered."""
    job = measured_job(method, parallel)
    with _observing_release_threads() as trackers:
        record = run_rank(job, rank, torch.device("cpu"), mesh=mesh)
    mine = {"status": record.status, "reason": record.reason, **dataclasses.asdict(record.memory)}
    assert len(trackers) == 1, f"one measured round, {len(trackers)} trackers"
    mine["released_by_other_threads_bytes"] = trackers[0].released_elsewhere_bytes
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _relative_error(got: dict, want: dict) -> float:
    num = sum(float((got[n] - want[n]).pow(2).sum()) for n in want)
    return math.sqrt(num) / math.sqrt(sum(float(w.pow(2).sum()) for w in want.values()))


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    workload = models.get_workload(WORKLOAD)
    whole = workload.make_batch(BATCH, generator=torch.Generator().manual_seed(0))
    clipped = dp.clipped_grad_sum("microbatch", workload, workload.build_model("cpu"), whole, CLIP)
    summed = dp.clipped_grad_sum("nondp", workload, workload.build_model("cpu"), whole, math.inf)
    results = {}
    for parallel in ("ddp", "fsdp"):
        for method in dp.available_methods():
            reference = summed if method == "nondp" else clipped
            status, reason, quiet = _gradient(method, parallel, 0.0, mesh, rank)
            entry = {"status": status, "reason": reason}
            if status == "ok":
                entry["relative_error"] = _relative_error(quiet, reference)
                if (method, parallel) in NOISE_CHECKED:
                    _, _, noisy = _gradient(method, parallel, 1.0, mesh, rank)
                    noise = torch.cat([(noisy[n] - quiet[n]).flatten() for n in reference])
                    entry["noise_std_over_sigma_c"] = float(noise.std()) / CLIP
                    entry["noise_elements"] = noise.numel()
                    mine = torch.cat([noisy[n].flatten() for n in reference])
                    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
                    dist.all_gather(theirs, mine)
                    entry["ranks_agree"] = all(torch.equal(mine, other) for other in theirs)
            if (method, parallel) in MEASURED:
                entry["ranks"] = _measured(method, parallel, rank, mesh)
            results[f"{method}/{parallel}"] = entry
    if rank == 0:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
