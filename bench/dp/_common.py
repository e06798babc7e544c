"""Pieces the DP method families share: per-sample losses, flat clipping, Gaussian noise, gradient bookkeeping.

Private to ``bench.dp``: method files import it; nothing outside the package does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
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


def stack_norms(per_param_norms: list[Tensor]) -> Tensor:
    """Global per-sample norms ``[B]`` from a list of per-parameter per-sample norms (each ``[B]``)."""
    return torch.stack(per_param_norms, dim=1).norm(2, dim=1)


def set_noisy_grads(
    params: Iterable[nn.Parameter],
    summed_clipped: Iterable[Tensor],
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    generator: torch.Generator | None,
) -> None:
    """p.grad = (Σ_i clipped g_i + N(0, σ²C²)) / B — what Opacus' DPOptimizer does with loss_reduction='mean'."""
    std = noise_multiplier * max_grad_norm
    for p, g in zip(params, summed_clipped):
        # In place: an out-of-place sum would keep the caller's noise-free g alive beside it until the
        # optimizer step (a second parameter-sized copy); only one parameter's noise is transient at a time.
        if std > 0:
            g.add_(torch.normal(0.0, std, size=g.shape, device=g.device, dtype=g.dtype, generator=generator))
        p.grad = g.div_(batch_size)
