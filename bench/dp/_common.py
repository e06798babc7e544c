"""Pieces the DP method families share: per-sample losses, flat clipping, Gaussian noise, gradient bookkeeping.

Private to ``bench.dp``: method files import it; nothing outside the package does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import DPConfigError

# Opacus' flat clipping factor, min(1, C / (‖g_i‖ + 1e-6)); every method uses the same one so results agree.
CLIP_EPS = 1e-6


def clip_factors(per_sample_norms: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, C / (‖g_i‖ + 1e-6)) for a ``[B]`` tensor of per-sample gradient norms."""
    return (max_grad_norm / (per_sample_norms + CLIP_EPS)).clamp(max=1.0)


def check_max_grad_norm(max_grad_norm: float, *, allow_inf: bool = True) -> float:
    value = float(max_grad_norm)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise DPConfigError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
    return value


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by ``named_parameters()`` name (shared/tied parameters appear once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def checked_per_sample_losses(workload, losses: Tensor, batch_size: int) -> Tensor:
    """``losses`` if it has shape ``[B]``; a ValueError naming the workload otherwise."""
    if losses.shape != (batch_size,):
        raise ValueError(
            f"workload {workload.name!r}: loss_per_sample returned shape {tuple(losses.shape)}, "
            f"expected ({batch_size},)"
        )
    return losses


def per_sample_loss(workload, model: nn.Module, batch) -> Tensor:
    """``workload.loss_per_sample(model(*inputs), target)``, checked to be of shape ``[B]``."""
    losses = workload.loss_per_sample(model(*batch.inputs), batch.target)  # (B,)
    return checked_per_sample_losses(workload, losses, batch.batch_size)


@contextmanager
def preserved_grads(model: nn.Module) -> Iterator[None]:
    """Put every parameter's ``.grad`` back as it was on exit (also on error): clipped_grad_sum must not
    leave gradients behind or destroy the caller's."""
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in saved:
            p.grad = grad


def sample_norms(per_sample: Tensor) -> Tensor:
    """‖g_i‖ over all but dim 0 of ``per_sample`` (B, ...), accumulated and returned in float32 whatever its dtype:
    a bf16 or fp16 norm would round to 8 or 11 bits and move samples across the clipping threshold."""
    return torch.linalg.vector_norm(per_sample.reshape(per_sample.shape[0], -1), 2, dim=1, dtype=torch.float32)


def stack_norms(per_param_norms: list[Tensor]) -> Tensor:
    """Global per-sample norms ``[B]`` (float32) from a list of per-parameter per-sample norms (each ``[B]``)."""
    return torch.stack([n.float() for n in per_param_norms], dim=1).norm(2, dim=1)


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def unscaled(norms: Tensor, loss_scale: Tensor | None) -> Tensor:
    """Per-sample norms of gradients taken from a loss multiplied by ``loss_scale``, divided back by it: the
    clipping norm of a GradScaler'd step must not include the scale."""
    return norms if loss_scale is None else norms / loss_scale


def scaled(loss: Tensor, loss_scale: Tensor | None) -> Tensor:
    return loss if loss_scale is None else loss * loss_scale


# GradScaler halves its scale after a step whose gradients overflowed (its default backoff_factor); from 2^16,
# 24 halvings reach 2^-8: an fp16 backward still overflowing there would overflow unscaled too.
_MAX_BACKOFFS = 24


def noise_free_sums(mode, device: torch.device, compute: Callable[[Tensor | None], dict[str, Tensor]]):
    """``compute(loss_scale)`` — clipped sums by name from a backward on the loss times ``loss_scale`` — as the
    noise-free API returns them: unscaled. Without loss scaling, ``compute(None)``. With it, the first scale is
    a fresh GradScaler's and, as the fused step's GradScaler does over its first steps, it is halved while the
    sums hold an inf or nan (an overflowed fp16 backward)."""
    loss_scale = mode.initial_loss_scale(device)
    if loss_scale is None:
        return compute(None)
    for _ in range(_MAX_BACKOFFS):
        sums = compute(loss_scale)
        if all(bool(torch.isfinite(g).all()) for g in sums.values()):
            break
        loss_scale = loss_scale * 0.5
    for g in sums.values():
        g.div_(loss_scale)
    return sums


def noise_and_average(
    params: Iterable[nn.Parameter],
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    generator: torch.Generator | None,
) -> None:
    """p.grad ← (p.grad + N(0, σ²C²)) / B in place, p.grad holding Σ_i clipped g_i — what Opacus' DPOptimizer
    does with loss_reduction='mean'."""
    std = noise_multiplier * max_grad_norm
    for p in params:
        g = p.grad
        # In place: an out-of-place sum would keep the noise-free sum alive beside it until the optimizer step
        # (a second parameter-sized copy); only one parameter's noise is transient at a time.
        if std > 0:
            g.add_(torch.normal(0.0, std, size=g.shape, device=g.device, dtype=g.dtype, generator=generator))
        g.div_(batch_size)


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum each tensor over the ranks, in place, one collective per tensor (no flat copy of all of them)."""
    for tensor in tensors:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
