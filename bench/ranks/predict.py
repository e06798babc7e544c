"""Per-rank tensor bytes of a many-rank case without the ranks: FakeTensorMode and a fake process group.

    python -m bench.ranks.predict dit-xl-2-cond --parallel fsdp --world-size 8 --batch-size 64 \\
        --methods nondp,opacus-ghost

One process plays rank r of N: ``torch.distributed`` is initialised with the "fake" backend
(``torch.testing._internal.distributed.fake_pg``: every collective returns at once, nothing is exchanged) and
the model, the optimizer and the batch are FakeTensors (shapes, dtypes and storages, no values, no kernels) on
the CPU device type — FSDP2's all-gathers then land on the mesh's device like the activations. The rank step is
the one the real ranks run (:func:`bench.ranks.step.run_rank`: same model, same share of the batch, same
parallel wrapper, two warm-up steps, one measured round under the tensor tracker), so the prediction is the
tracker's exact live tensor bytes of that rank: what the measured round of a real rank reports, less what its
communication backend allocates out of the tracker's sight (gloo's reduce-scatter copies on CPU; NCCL allocates
no tensors). A method a fake tensor cannot run (an op that needs values) is ``unsupported`` with the op named.
No timing, no RSS, no NVML.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import models
from bench import dp
from bench.case.spec import CaseSpec
from bench.config.cli import OneLineParser, run, usage_error
from bench.config.options import check_names, comma_list, non_negative_float, positive_int
from bench.dp.parallel import uneven_split
from bench.dp.privacy import resolve_privacy
from bench.results.record import PARALLEL_STRATEGIES, CaseRecord, RankFigures, combine_rank_records

from .job import RankJob
from .step import run_rank

__all__ = ["predict_case", "predict_rank"]

PROG = "python -m bench.ranks.predict"
PREDICTED_NOTE = "predicted: one process as this rank, FakeTensorMode + fake process group (exact tensor bytes)"


class FakeRun:
    """The fake world of one predicted rank: a FakeTensorMode (real constants a workload caches, e.g. DiT's noise
    schedule, are taken as fake inputs) and, between it and the tensor tracker, :class:`_DistinctRows`."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._rows = _DistinctRows()

    def from_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.mode.from_tensor(tensor)

    def __enter__(self):
        self.mode.__enter__()
        self._rows.__enter__()
        return self

    def __exit__(self, *exc_info):
        try:
            self._rows.__exit__(*exc_info)
        finally:
            self.mode.__exit__(*exc_info)


class _DistinctRows(TorchDispatchMode):
    """``torch.unique(x, dim=0)`` needs values (its output has one row per distinct row): predicted as if every
    row were distinct, the most it can be. Opacus' ghost norm of an Embedding calls it on (sample, index) pairs:
    exact for DiT's one label per sample; for GPT it assumes every token of a sample distinct (random 1024 of
    50257: about 1 % more rows than the real count, on one B×T×D temporary)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.unique_dim.default:
            return _all_rows_distinct(*args, **kwargs)
        return func(*args, **kwargs)


def _all_rows_distinct(x, dim, sorted=True, return_inverse=False, return_counts=False):
    if dim not in (0, -x.dim()):
        raise NotImplementedError(f"unique along dim {dim} on fake tensors")
    rows = x.shape[0]
    inverse = torch.empty(rows if return_inverse else 0, dtype=torch.int64, device=x.device)
    counts = torch.empty(rows if return_counts else 0, dtype=torch.int64, device=x.device)
    return torch.empty_like(x), inverse, counts


def predict_rank(job: RankJob, rank: int) -> CaseRecord:
    """Rank ``rank``'s record of ``job``, predicted in this process (which must not be in a process group).
    What fake tensors cannot run (torch DDP's C++ reducer needs real storage) is ``unsupported``, said so."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # importing it registers the "fake" backend

    if (job.case.method, job.case.parallel) in NOT_PREDICTABLE:
        return _not_predictable(job, rank, NOT_PREDICTABLE[job.case.method, job.case.parallel])
    _forget_sharding_decisions()
    dist.init_process_group("fake", rank=rank, world_size=job.case.world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (job.case.world_size,))  # outside the fake mode: the mesh holds real ranks
        record = run_rank(job, rank, torch.device("cpu"), mesh=mesh, fake_mode=FakeRun())
    finally:
        dist.destroy_process_group()
    if record.status == "error":
        record.status, record.reason = "unsupported", f"not predictable on fake tensors: {record.reason}"
        record.ranks[0].status, record.ranks[0].reason = record.status, record.reason
    record.memory.peak_rss_bytes = record.memory.baseline_rss_bytes = None  # this process's, not the rank's
    record.memory.timeline.rss_bytes = []
    for figures in record.ranks:
        figures.peak_rss_bytes = None
    record.notes = [PREDICTED_NOTE, *(n for n in record.notes if "rss" not in n.lower())]
    return record


# Pairs that cannot run on fake tensors at all (a crash, not an exception), refused before they start.
NOT_PREDICTABLE = {
    ("opacus-ghost", "ddp"): "Opacus' DPOptimizerFastGradientClipping.accumulate copies gradients with copy.deepcopy, "
    "which corrupts the heap on FakeTensors (torch 2.13: the process aborts); ghost_fsdp clones instead",
}


def _not_predictable(job: RankJob, rank: int, why: str) -> CaseRecord:
    reason = f"not predictable on fake tensors: {why}"
    return job.new_record(status="unsupported", reason=reason, ranks=[RankFigures(rank, "unsupported", reason)])


def _forget_sharding_decisions() -> None:
    """DTensor caches its sharding decisions by mesh and placements, not by rank: a decision made while this
    process played rank 0 (a replicated tensor's local slice) would be reused for rank 1. Forget them all."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import _gen_transform_infos

    torch._C._clear_DTensor_sharding_propagator_cache()
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    _gen_transform_infos.cache_clear()


def predict_case(job: RankJob, ranks: list[int] | None = None) -> CaseRecord:
    """One record of ``job`` from the predicted ranks (default every rank), combined as the launcher does."""
    return combine_rank_records([predict_rank(job, r) for r in (ranks or range(job.case.world_size))])


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help="workload spec, e.g. dit-xl-2-cond or gpt2:seq_len=128")
    parser.add_argument("--parallel", default="fsdp", choices=PARALLEL_STRATEGIES)
    parser.add_argument("--world-size", type=positive_int, default=8)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch (default: 2 per rank)")
    parser.add_argument(
        "--methods", type=comma_list, default=("nondp", "opacus-ghost"), help="comma list (default nondp,opacus-ghost)"
    )
    parser.add_argument("--ranks", default="0,last", help="ranks to predict: comma list, 'last' or 'all'")
    parser.add_argument("--optimizer", default="adamw", help="adamw (default), adam or sgd")
    parser.add_argument("--noise-multiplier", type=non_negative_float, default=1.0, help="σ (default 1.0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    world = args.world_size
    batch = args.batch_size or 2 * world
    uneven = uneven_split(batch, world)
    if uneven:
        parser.error(f"--batch-size: {uneven}")
    ranks = _ranks(args.ranks, world, parser)
    try:
        models.get_workload(args.workload)
        check_names("--methods", args.methods, dp.available_methods())
        check_names("--optimizer", [args.optimizer], list(dp.OPTIMIZERS))
    except (ValueError, models.WorkloadError) as exc:
        return usage_error(PROG, str(exc))
    privacy = resolve_privacy(1.0, noise_multiplier=args.noise_multiplier)
    print(f"{args.workload}: {args.parallel} at world size {world}, global batch {batch} ({batch // world} per rank)")
    for method in args.methods:
        case = CaseSpec(args.workload, method, batch, "cpu", world, args.parallel)
        job = RankJob(case, privacy, optimizer=args.optimizer)
        record = predict_case(job, ranks)
        if record.status != "ok":
            print(f"  {method}: {record.status}: {record.reason}")
            continue
        peaks = ", ".join(f"rank {r.rank} {r.peak_tensor_bytes:,} B" for r in record.ranks)
        top = record.rank_max["peak_tensor_bytes"]
        print(f"  {method}: per-rank peak {top / 2**20:,.1f} MiB ({peaks}); peak in {record.memory.peak_phase}")
    return 0


def _ranks(text: str, world: int, parser: argparse.ArgumentParser) -> list[int]:
    if text == "all":
        return list(range(world))
    ranks = []
    for item in text.split(","):
        item = item.strip()
        rank = world - 1 if item == "last" else int(item) if item.isdigit() else -1
        if not 0 <= rank < world:
            parser.error(f"--ranks: {item!r} is not a rank of {world} (0 … {world - 1}, 'last' or 'all')")
        ranks.append(rank)
    return list(dict.fromkeys(ranks))


if __name__ == "__main__":
    sys.exit(run(main, PROG))
