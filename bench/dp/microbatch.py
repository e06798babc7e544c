"""The naive per-sample loop: B forward + backward passes of one sample each, each gradient clipped and summed.

It runs any model that runs at all (nothing is vectorised, no hooks), so it is the reference the equivalence
tests compare every other method against, and the "Solution 3" of the seed note — correct but B times slower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.trackers.channel import PhaseMarker, annotate_dp_buffer, no_mark

from ._common import (
    clip_factors,
    model_device,
    per_sample_loss,
    sample_norms,
    scaled,
    stack_norms,
    trainable_parameters,
    unscaled,
)
from .base import ClippedSumMethod, ClippedSumStep, register_method
from .modes import DEFAULT_MODE, TrainingMode


def clipped_sum_by_loop(
    workload,
    model: nn.Module,
    batch,
    params: list[nn.Parameter],
    max_grad_norm: float,
    mark: PhaseMarker = no_mark,
    mode: TrainingMode = DEFAULT_MODE,
    loss_scale: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """(Σ_i min(1, C/‖g_i‖)·g_i per parameter, mean loss) by a loop over the samples of ``batch``, in ``mode``.
    With ``loss_scale`` each backward runs on the scaled loss and the sums come out scaled (clip factors from
    the unscaled norms).

    The loop interleaves the phases, so the marks forward → backward → clip repeat once per sample."""
    device = model_device(model)
    summed = [torch.zeros_like(p) for p in params]
    losses = []
    for i in range(batch.batch_size):
        mark("forward")
        with mode.forward_context(device):
            loss = per_sample_loss(workload, model, batch.select(i))[0]
        mark("backward")
        grads = torch.autograd.grad(scaled(loss, loss_scale), params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        annotate_dp_buffer(*grads)
        mark("clip")
        norm = unscaled(stack_norms([sample_norms(g.unsqueeze(0)) for g in grads]), loss_scale)  # (1,) float32
        factor = clip_factors(norm, max_grad_norm)[0]
        for acc, g in zip(summed, grads):
            acc.add_(g * factor.to(g.dtype))  # factor stays a tensor: no host sync
        losses.append(loss.detach().float())
    return summed, torch.stack(losses).mean()


class MicrobatchStep(ClippedSumStep):
    def clipped_sum(self, batch, mark: PhaseMarker, loss_scale: Tensor | None):
        params = list(self.params.values())
        return clipped_sum_by_loop(
            self.workload, self.model, batch, params, self.privacy.max_grad_norm, mark, self.mode, loss_scale
        )


@register_method
class Microbatch(ClippedSumMethod):
    """per-sample loop: B forward+backward passes of one sample, clip each, sum (naive reference)."""

    name = "microbatch"
    step_class = MicrobatchStep

    def noise_free_pass(self, workload, model, batch, max_grad_norm, mode, loss_scale):
        params = trainable_parameters(model)
        args = (workload, model, batch, list(params.values()), max_grad_norm, no_mark, mode, loss_scale)
        return dict(zip(params, clipped_sum_by_loop(*args)[0]))
