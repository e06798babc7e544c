"""Per-sample gradients with ``torch.func``: ``vmap(grad(loss of one sample))`` over *every* model input.

The seed note's claim was that vmap "only vectorizes the first argument of forward()". It vectorises whatever
``in_dims`` says: here the trainable parameters are shared (``None``) and every input (x, t, y, ... ) and the
target are mapped over dim 0 (``0``), so a conditional DiT's timesteps and labels travel with their sample.
Frozen parameters and buffers are closed over, unbatched. Cost: all B per-sample gradients exist at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bench.trackers.channel import PhaseMarker, annotate_dp_buffer, no_mark

from ._common import (
    clip_factors,
    model_device,
    sample_norms,
    scaled,
    stack_norms,
    trainable_parameters,
    unscaled,
)
from .base import ClippedSumMethod, ClippedSumStep, register_method
from .diagnose import diagnose
from .errors import MethodUnsupported, error_text, is_out_of_memory
from .modes import DEFAULT_MODE, TrainingMode


def per_sample_grad_fn(
    workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE, loss_scale: Tensor | None = None
) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """``f(params, *inputs, target) -> (per-sample grads {name: (B, *shape)}, per-sample losses (B,))``.

    ``params`` are the trainable parameters by name; the rest of the model's state (frozen parameters, buffers)
    is read from the module at call time and passed unbatched. The forward runs in ``mode``'s context; with
    ``loss_scale`` the gradients are those of the scaled loss (the returned losses are not scaled)."""
    trainable = set(trainable_parameters(model))
    device = model_device(model)

    def one_sample_loss(params: dict[str, Tensor], *sample: Tensor) -> tuple[Tensor, Tensor]:
        *inputs, target = (t.unsqueeze(0) for t in sample)  # re-add a batch dim of 1 for the model
        frozen = {n: p for n, p in model.named_parameters() if n not in trainable}
        buffers = dict(model.named_buffers())
        with mode.forward_context(device):
            output = functional_call(model, (params, frozen, buffers), tuple(inputs))
            loss = workload.loss_per_sample(output, target)[0]
        return scaled(loss, loss_scale), loss.detach()

    grad_and_loss = grad(one_sample_loss, has_aux=True)

    def per_sample(params: dict[str, Tensor], *inputs_and_target: Tensor):
        in_dims = (None,) + (0,) * len(inputs_and_target)
        return vmap(grad_and_loss, in_dims=in_dims)(params, *inputs_and_target)

    return per_sample


def clipped_sum_by_vmap(
    workload,
    model: nn.Module,
    batch,
    max_grad_norm: float,
    mark: PhaseMarker = no_mark,
    mode: TrainingMode = DEFAULT_MODE,
    loss_scale: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """(Σ_i min(1, C/‖g_i‖)·g_i by parameter name, mean loss); forward and backward are one vmapped call. With
    ``loss_scale`` the sums come out scaled (clip factors from the unscaled norms)."""
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    mark("forward")
    try:
        grad_fn = per_sample_grad_fn(workload, model, mode, loss_scale)
        per_sample_grads, losses = grad_fn(params, *batch.inputs, batch.target)
    except Exception as exc:  # vmap's limits (data-dependent control flow, .item(), in-place on inputs) surface here
        if is_out_of_memory(exc):  # B per-sample gradients at once: a result of its own, never "unsupported"
            raise
        diagnosis = diagnose("torch-func", workload, model, exc, mode)
        raise MethodUnsupported("torch-func", error_text(exc), diagnosis) from exc
    # Forward and backward happen inside one vmapped grad call: the backward mark can only follow it.
    mark("backward")
    annotate_dp_buffer(*per_sample_grads.values())
    mark("clip")
    norms = unscaled(stack_norms([sample_norms(g) for g in per_sample_grads.values()]), loss_scale)  # (B,) fp32
    annotate_dp_buffer(norms)
    factors = clip_factors(norms, max_grad_norm)  # (B,)
    summed = {n: torch.einsum("i,i...->...", factors.to(g.dtype), g) for n, g in per_sample_grads.items()}
    return summed, losses.mean()


class TorchFuncStep(ClippedSumStep):
    def clipped_sum(self, batch, mark: PhaseMarker, loss_scale: Tensor | None):
        summed, loss = clipped_sum_by_vmap(
            self.workload, self.model, batch, self.privacy.max_grad_norm, mark, self.mode, loss_scale
        )
        return [summed[n] for n in self.params], loss


@register_method
class TorchFunc(ClippedSumMethod):
    """functional_call + vmap(grad(per-sample loss)) batching every input (x, t, y, ...)."""

    name = "torch-func"
    step_class = TorchFuncStep

    def noise_free_pass(self, workload, model, batch, max_grad_norm, mode, loss_scale):
        return clipped_sum_by_vmap(workload, model, batch, max_grad_norm, no_mark, mode, loss_scale)[0]
