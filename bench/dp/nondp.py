"""The non-private baseline step.

``nondp`` is what every DP method is measured against: mean loss, one backward, optimizer step. It does not
clip, so its :meth:`NonDP.clipped_grad_sum` is only defined for ``max_grad_norm = inf`` (Σ_i g_i, the summed
per-sample gradient, from one backward of the summed loss). On ranks it runs under torch's DDP or on the
FSDP-sharded model (bench/dp/parallel.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from bench.trackers.channel import PhaseMarker, no_mark

from ._common import model_device, noise_free_sums, per_sample_loss, preserved_grads, scaled, trainable_parameters
from .base import DataParallel, DPMethod, DPStep, StepInputs, register_method
from .errors import MethodUnsupported
from .modes import DEFAULT_MODE, TrainingMode


class NonDPStep(DPStep):
    def __init__(self, inputs: StepInputs):
        super().__init__(inputs)
        self.scaler = inputs.mode.new_scaler(self.device)

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        mark("forward")
        self.optimizer.zero_grad(set_to_none=True)
        with self.mode.forward_context(self.device):
            loss = per_sample_loss(self.workload, self.model, batch).mean()
        mark("backward")
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        # No clipping and no noise: the two phases are empty but marked so every method has the same timeline.
        mark("clip")
        mark("noise")
        mark("optimizer")
        if self.scaler is None:
            self.optimizer.step()
        else:  # the usual AMP step: unscale p.grad, skip the update on inf/nan, adapt the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        mark("end")
        return loss.detach()


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


@register_method
class NonDP(DPMethod):
    """non-private step: mean loss, one backward, optimizer (the baseline)."""

    name = "nondp"
    step_class = NonDPStep

    def build_parallel(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        """Under FSDP the plain step on the sharded model; under DDP torch's DistributedDataParallel."""
        if ranks.strategy == "fsdp":
            return self.build(inputs)
        ddp = nn.parallel.DistributedDataParallel(
            inputs.model, device_ids=ranks.device_ids, gradient_as_bucket_view=True
        )
        return DDPNonDPStep(replace(inputs, model=ddp))

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        if not math.isinf(max_grad_norm):
            raise MethodUnsupported(
                self.name,
                "nondp does not clip per sample",
                f"max_grad_norm={max_grad_norm} needs a DP method; nondp only gives Σ_i g_i (max_grad_norm=inf)",
            )
        params = trainable_parameters(model)
        device = model_device(model)

        def compute(loss_scale: Tensor | None) -> dict[str, Tensor]:
            with preserved_grads(model):
                # Σ_i g_i is the gradient of the summed per-sample loss.
                with mode.forward_context(device):
                    total = per_sample_loss(workload, model, batch).sum()
                grads = torch.autograd.grad(scaled(total, loss_scale), list(params.values()), allow_unused=True)
            return {
                name: (g if g is not None else torch.zeros_like(p)).detach()
                for (name, p), g in zip(params.items(), grads)
            }

        return noise_free_sums(mode, device, compute)
