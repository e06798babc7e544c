"""The non-private baseline step.

``nondp`` is what every DP method is measured against: mean loss, one backward, optimizer step. It does not
clip, so its :meth:`NonDP.clipped_grad_sum` is only defined for ``max_grad_norm = inf`` (Σ_i g_i, the summed
per-sample gradient, from one backward of the summed loss).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bench.channel import PhaseMarker, no_mark

from ._common import per_sample_loss, preserved_grads, trainable_parameters
from .base import DPMethod, DPStep, register_method
from .errors import MethodUnsupported
from .privacy import PrivacyParams


class NonDPStep(DPStep):
    def __init__(self, workload, model, optimizer, privacy):
        super().__init__(model, optimizer, privacy)
        self.workload = workload

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        loss = per_sample_loss(self.workload, self.model, batch).mean()
        mark("backward")
        loss.backward()
        # No clipping and no noise: the two phases are empty but marked so every method has the same timeline.
        mark("clip")
        mark("noise")
        mark("optimizer")
        self.optimizer.step()
        mark("end")
        return loss.detach()


@register_method
class NonDP(DPMethod):
    """non-private step: mean loss, one backward, optimizer (the baseline)."""

    name = "nondp"

    def build(self, workload, model, optimizer, privacy: PrivacyParams, batch_size, noise_generator) -> DPStep:
        return NonDPStep(workload, model, optimizer, privacy)

    def clipped_grad_sum(self, workload, model: nn.Module, batch, max_grad_norm: float) -> dict[str, Tensor]:
        if not math.isinf(max_grad_norm):
            raise MethodUnsupported(
                self.name,
                "nondp does not clip per sample",
                f"max_grad_norm={max_grad_norm} needs a DP method; nondp only gives Σ_i g_i (max_grad_norm=inf)",
            )
        params = trainable_parameters(model)
        with preserved_grads(model):
            # Σ_i g_i is the gradient of the summed per-sample loss.
            total = per_sample_loss(workload, model, batch).sum()
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        return {
            name: (g if g is not None else torch.zeros_like(p)).detach() for (name, p), g in zip(params.items(), grads)
        }
