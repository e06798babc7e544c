"""The DP methods on data-parallel ranks: DDP and FSDP2 wrappers of the registered methods, built from outside.

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

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bench.trackers.channel import PhaseMarker, no_mark

from ._common import per_sample_loss, trainable_parameters
from .base import DEFAULT_LR, DPStep, get_method, make_optimizer
from .errors import MethodUnsupported, error_text, is_out_of_memory
from .nondp import NonDPStep
from .opacus import OpacusGhostStep, OpacusGradSampleStep, _GradSampleMethod, _PerSampleCriterion, _release
from .privacy import PrivacyParams

__all__ = ["STRATEGIES", "build_parallel_step", "refusal", "shard_model"]

STRATEGIES = ("ddp", "fsdp")
_CLIPPED_SUM_METHODS = ("bk", "bk-tiled", "torch-func", "microbatch")


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
    if parallel == "fsdp" and method in _CLIPPED_SUM_METHODS:
        return MethodUnsupported(
            method,
            f"{method} under FSDP is not implemented by dpmem",
            "it forms each parameter's whole clipped sum outside autograd, which FSDP's reduce-scatter never "
            "sees; run it with --parallel ddp",
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
    if parallel not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {parallel!r}; valid: {', '.join(STRATEGIES)}")
    world_size = dist.get_world_size()
    if batch_size % world_size:
        raise ValueError(f"batch {batch_size} does not split evenly over {world_size} ranks")
    local_batch = batch_size // world_size
    refused = refusal(method, parallel)
    if refused is not None:
        raise refused
    impl.check(workload, model)  # one process, one sample: the library's refusals of the model itself
    if parallel == "fsdp":
        return _fsdp_step(
            method, workload, shard_model(model, mesh), privacy, local_batch, optimizer, lr, noise_generator
        )
    if method == "nondp":
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        opt = make_optimizer(optimizer, trainable_parameters(model).values(), lr)
        return DDPNonDPStep(workload, ddp, opt, privacy)
    opt = make_optimizer(optimizer, trainable_parameters(model).values(), lr)
    if method in _CLIPPED_SUM_METHODS:
        step = impl.build(workload, model, opt, privacy, batch_size, noise_generator)
        step.reduce_clipped_sums = all_reduce_sum
        return step
    if method == "opacus-ghost":
        return _ddp_ghost_step(impl, workload, model, opt, privacy, local_batch, noise_generator)
    if isinstance(impl, _GradSampleMethod):
        return _ddp_grad_sample_step(impl, workload, model, opt, privacy, local_batch, noise_generator)
    raise MethodUnsupported(method, f"dpmem has no data-parallel version of {method!r}", "run it with world size 1")


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum each tensor over the ranks, in place, one collective per tensor (no flat copy of all of them)."""
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


# ---------------------------------------------------------------------------------------------------------------
# nondp under DDP


class DDPNonDPStep(NonDPStep):
    """nondp under torch DDP: its gradients are views of DDP's buckets (``gradient_as_bucket_view``), which live
    as long as the wrapper, so they are zeroed in place rather than freed; DDP averages them over the ranks."""

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        mark("forward")
        self.optimizer.zero_grad(set_to_none=False)
        loss = per_sample_loss(self.workload, self.model, batch).mean()
        mark("backward")
        loss.backward()  # DDP all-reduces the buckets as they fill
        mark("clip")
        mark("noise")
        mark("optimizer")
        self.optimizer.step()
        mark("end")
        return loss.detach()


# ---------------------------------------------------------------------------------------------------------------
# Opacus under DPDDP: per-sample work on the local samples; the optimizer all-reduces the clipped, noised sums


def _rank_dp_optimizer(optimizer_class, opt, privacy, local_batch: int, noise_generator):
    """One of Opacus' distributed DP optimizers around ``opt``. ``expected_batch_size`` is the per-rank batch:
    Opacus' own rule (make_private divides the batch by the world size)."""
    return optimizer_class(
        opt,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=local_batch,
        loss_reduction="mean",
        generator=noise_generator,
    )


def _ddp_grad_sample_step(impl, workload, model, opt, privacy, local_batch, noise_generator) -> DPStep:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer

    wrapper = impl._wrap_for_step(workload, model, lambda: impl.wrap(DPDDP(model)))
    dp_optimizer = _rank_dp_optimizer(DistributedDPOptimizer, opt, privacy, local_batch, noise_generator)
    return DistributedOpacusStep(workload, model, wrapper, dp_optimizer, privacy)


class DistributedOpacusStep(OpacusGradSampleStep):
    """``DistributedDPOptimizer.step()`` in phases: clip the local per-sample gradients, noise on rank 0 only,
    scale by the local batch, then all-reduce (sum / world) — inside the noise phase."""

    def noise(self, opt) -> None:
        super().noise(opt)
        opt.reduce_gradients()


def _ddp_ghost_step(impl, workload, model, opt, privacy, local_batch, noise_generator) -> DPStep:
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    wrapper = impl._wrap_for_step(workload, model, lambda: impl.wrap(DPDDP(model), privacy.max_grad_norm))
    ghost_optimizer = DistributedDPOptimizerFastGradientClipping
    dp_optimizer = _rank_dp_optimizer(ghost_optimizer, opt, privacy, local_batch, noise_generator)
    criterion = DPLossFastGradientClipping(wrapper, dp_optimizer, _PerSampleCriterion(workload), "mean")
    return DistributedGhostStep(workload, model, wrapper, dp_optimizer, criterion, privacy, _reduce_gradients)


def _reduce_gradients(opt) -> None:
    opt.reduce_gradients()


def _noise_replicated(opt) -> None:
    """``ghost_fsdp``'s noise: a plain (replicated) noise tensor added to sharded gradients needs DTensor's
    implicit replication, as ``FSDPOptimizerFastGradientClipping.pre_step`` does."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        opt.add_noise()


class DistributedGhostStep(OpacusGhostStep):
    """Ghost clipping on ranks: the two backward passes on the local samples, then ``after_noise(opt)`` after
    the noise — DPDDP all-reduces the sums, ghost_fsdp's sharded gradients were reduce-scattered by FSDP."""

    def __init__(self, workload, model, wrapper, dp_optimizer, criterion, privacy, after_noise, noise=None):
        super().__init__(workload, model, wrapper, dp_optimizer, criterion, privacy)
        self.after_noise: Callable = after_noise
        self.add_noise: Callable = noise or (lambda opt: opt.add_noise())

    def noise(self, opt) -> None:
        self.add_noise(opt)
        opt.scale_grad()
        self.after_noise(opt)


# ---------------------------------------------------------------------------------------------------------------
# FSDP


def _fsdp_step(method, workload, sharded, privacy, local_batch, optimizer, lr, noise_generator) -> DPStep:
    opt = make_optimizer(optimizer, trainable_parameters(sharded).values(), lr)  # over the sharded parameters
    if method == "nondp":
        return NonDPStep(workload, sharded, opt, privacy)
    if method == "opacus-ghost":
        return _fsdp_ghost_step(workload, sharded, opt, privacy, local_batch, noise_generator)
    raise _opacus_fsdp_refusal(method, workload, sharded, opt, privacy, local_batch)


def _fsdp_ghost_step(workload, sharded, opt, privacy, local_batch, noise_generator) -> DPStep:
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
        GradSampleModuleFastGradientClippingFSDP,
    )
    from opacus.optimizers import FSDPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    impl = get_method("opacus-ghost")
    wrapper = impl._wrap_for_step(
        workload,
        sharded,
        lambda: GradSampleModuleFastGradientClippingFSDP(
            sharded, batch_first=True, loss_reduction="mean", max_grad_norm=privacy.max_grad_norm
        ),
    )
    dp_optimizer = _rank_dp_optimizer(FSDPOptimizerFastGradientClipping, opt, privacy, local_batch, noise_generator)
    criterion = DPLossFastGradientClipping(wrapper, dp_optimizer, _PerSampleCriterion(workload), "mean")
    return DistributedGhostStep(
        workload, sharded, wrapper, dp_optimizer, criterion, privacy, lambda opt: None, _noise_replicated
    )


def _opacus_fsdp_refusal(method, workload, sharded, opt, privacy, local_batch) -> MethodUnsupported:
    """Opacus 1.6 offers FSDP2 only in ghost_fsdp mode; its other modes wrap an FSDP model without complaint and
    fail in the backward. Run one probe step on one local sample to get that real error (every rank fails
    alike, after the same collectives), and return it as :class:`MethodUnsupported`."""
    from opacus.optimizers import DistributedDPOptimizer

    impl = get_method(method)
    wrapper = None
    probe = workload.make_batch(1, device=next(sharded.parameters()).device)
    try:
        wrapper = impl.wrap(sharded)
        dp_optimizer = DistributedDPOptimizer(
            opt, noise_multiplier=0.0, max_grad_norm=privacy.max_grad_norm, expected_batch_size=local_batch
        )
        OpacusGradSampleStep(workload, sharded, wrapper, dp_optimizer, privacy)(probe)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        return MethodUnsupported(
            method,
            error_text(exc),
            "Opacus 1.6 runs FSDP2 only in ghost_fsdp mode (opacus-ghost); its per-sample-gradient modes keep "
            "state on parameters that FSDP swaps between sharded and unsharded",
        )
    finally:
        _release(wrapper, sharded)
    return MethodUnsupported(
        method,
        "Opacus ran one probe step under FSDP without error, but dpmem has not verified its clipped gradient there",
        "only ghost_fsdp (opacus-ghost) is checked under FSDP",
    )
