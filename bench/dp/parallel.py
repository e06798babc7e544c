"""The DP methods on data-parallel ranks: DDP and FSDP2 versions of the registered methods.

:func:`build_parallel_step` does what every pair shares (the checks, FSDP's sharding, the optimizer) and asks
the method for its step (``DPMethod.build_parallel``; each family's is in its own file).

Every rank holds ``batch_size / world_size`` samples of the global logical batch (``batch_size`` below is the
*global* one: DP accounting and the noise scale are per logical batch). What each (method, strategy) runs:

==================================  ====================================================  ==============================
method                              ``ddp``                                               ``fsdp``
==================================  ====================================================  ==============================
``nondp``                           torch ``DistributedDataParallel``, gradients as        FSDP2 ``fully_shard``
                                    views of its buckets (no second gradient copy)
``opacus-hooks/-functorch/-ew``     Opacus ``DPDDP`` + ``DistributedDPOptimizer``          unsupported (Opacus' error)
``opacus-ghost``                    ``DPDDP`` + ``DistributedDPOptimizerFastGradient…``    Opacus ``ghost_fsdp``
``bk``, ``bk-tiled``, ``torch-func``  each rank's clipped sum, all-reduced (summed)          unsupported (dpmem builds
``microbatch``                      before the noise                                       whole-parameter sums)
==================================  ====================================================  ==============================

Noise is added once per logical batch, σ·C on the global clipped sum, never once per rank:

* Opacus' distributed optimizers add it on rank 0 only, then all-reduce (``DistributedDPOptimizer.add_noise``);
  under ``ghost_fsdp`` every rank adds σ·C/world noise to its own shard of the averaged gradient, so each
  element gets noise once;
* the clipped-sum methods all-reduce the clipped sums first, then every rank draws *the same* noise from the
  same seeded generator (``noise_generator`` must be seeded alike on every rank), so the ranks' parameters stay
  equal without a broadcast.

FSDP units: every element of every ``nn.ModuleList`` (the transformer blocks), then the root, for every method
— so ×nondp compares like with like. (Opacus' own ``FSDP2Wrapper`` makes every layer a unit and, on a DiT whose
root owns the frozen ``pos_embed``, shards the root twice and fails in DeviceMesh; per block it needs no change
to the model.) The mesh is built by the caller (outside any FakeTensorMode) and passed in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bench.results.record import PARALLEL_STRATEGIES

from ._common import trainable_parameters
from .base import DEFAULT_LR, DataParallel, DPStep, StepInputs, get_method, make_optimizer
from .errors import MethodUnsupported
from .privacy import PrivacyParams

__all__ = [
    "build_parallel_step",
    "refusal",
    "shard_model",
    "uneven_split",
]


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 ``fully_shard`` every element of every ``nn.ModuleList``, then the root (in place; returned)."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for module in model.modules() if isinstance(module, nn.ModuleList) for m in module]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def refusal(method: str, parallel: str) -> MethodUnsupported | None:
    """dpmem's own refusal of a pair, known without running anything (the launcher records it without ranks)."""
    return get_method(method).refusal(parallel)


def uneven_split(batch_size: int, world_size: int) -> str | None:
    """Why ``batch_size`` (the global logical batch) cannot run on ``world_size`` ranks, or None: it must split
    evenly, each rank holding ``batch_size / world_size`` samples."""
    if batch_size % world_size:
        return (
            f"batch {batch_size} does not split evenly over {world_size} ranks (batch sizes are the "
            f"global logical batch; choose a multiple of {world_size})"
        )
    return None


def build_parallel_step(
    method: str,
    parallel: str,
    workload,
    model: nn.Module,
    *,
    privacy: PrivacyParams,
    batch_size: int,
    optimizer: str = "adamw",
    lr: float = DEFAULT_LR,
    noise_generator: torch.Generator | None = None,
    mesh=None,
    device_ids: list[int] | None = None,
) -> DPStep:
    """The fused DP step of ``method`` on this rank under ``parallel`` ("ddp" or "fsdp"); the process group is
    initialised and ``model`` is this rank's replica (equal on every rank). ``batch_size`` is the global batch.
    A combination a library (or dpmem) cannot run raises :class:`MethodUnsupported` with the real error."""
    impl = get_method(method)
    if parallel not in PARALLEL_STRATEGIES:
        raise ValueError(f"unknown parallel strategy {parallel!r}; valid: {', '.join(PARALLEL_STRATEGIES)}")
    world_size = dist.get_world_size()
    uneven = uneven_split(batch_size, world_size)
    if uneven:
        raise ValueError(uneven)
    refused = impl.refusal(parallel)
    if refused is not None:
        raise refused
    impl.check(workload, model)  # one process, one sample: the library's refusals of the model itself
    if parallel == "fsdp":
        model = shard_model(model, mesh)
    opt = make_optimizer(optimizer, trainable_parameters(model).values(), lr)  # under FSDP, the sharded parameters
    ranks = DataParallel(parallel, batch_size // world_size, mesh, device_ids)
    return impl.build_parallel(StepInputs(workload, model, opt, privacy, batch_size, noise_generator), ranks)
