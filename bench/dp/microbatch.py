"""The naive per-sample loop: B forward + backward passes of one sample each, each gradient clipped and summed.

It runs any model that runs at all (nothing is vectorised, no hooks), so it is the reference the equivalence
tests compare every other method against, and the "Solution 3" of the seed note — correct but B times slower.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.channel import PhaseMarker, annotate_dp_buffer, no_mark

from ._common import clip_factors, per_sample_loss, stack_norms, trainable_parameters
from .base import ClippedSumStep, DPMethod, DPStep, register_method
from .privacy import PrivacyParams


def clipped_sum_by_loop(
    workload, model: nn.Module, batch, params: list[nn.Parameter], max_grad_norm: float, mark: PhaseMarker = no_mark
) -> tuple[list[Tensor], Tensor]:
    """(Σ_i min(1, C/‖g_i‖)·g_i per parameter, mean loss) by a loop over the samples of ``batch``.

    The loop interleaves the phases, so the marks forward → backward → clip repeat once per sample."""
    summed = [torch.zeros_like(p) for p in params]
    losses = []
    for i in range(batch.batch_size):
        mark("forward")
        loss = per_sample_loss(workload, model, batch.select(i))[0]
        mark("backward")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        annotate_dp_buffer(*grads)
        mark("clip")
        norm = stack_norms([g.reshape(1, -1).norm(2, dim=1) for g in grads])  # (1,)
        factor = clip_factors(norm, max_grad_norm)[0]
        for acc, g in zip(summed, grads):
            acc.add_(g * factor)  # factor stays a tensor: no host sync
        losses.append(loss.detach())
    return summed, torch.stack(losses).mean()


class MicrobatchStep(ClippedSumStep):
    def __init__(self, workload, model, optimizer, privacy, batch_size, noise_generator):
        super().__init__(workload, model, optimizer, privacy, batch_size, noise_generator)
        self.params = list(trainable_parameters(model).values())

    def clipped_sum(self, batch, mark: PhaseMarker):
        summed, loss = clipped_sum_by_loop(
            self.workload, self.model, batch, self.params, self.privacy.max_grad_norm, mark
        )
        return self.params, summed, loss


@register_method
class Microbatch(DPMethod):
    """per-sample loop: B forward+backward passes of one sample, clip each, sum (naive reference)."""

    name = "microbatch"

    def build(self, workload, model, optimizer, privacy: PrivacyParams, batch_size, noise_generator) -> DPStep:
        return MicrobatchStep(workload, model, optimizer, privacy, batch_size, noise_generator)

    def clipped_grad_sum(self, workload, model: nn.Module, batch, max_grad_norm: float) -> dict[str, Tensor]:
        params = trainable_parameters(model)
        summed, _ = clipped_sum_by_loop(workload, model, batch, list(params.values()), max_grad_norm)
        return dict(zip(params, summed))
