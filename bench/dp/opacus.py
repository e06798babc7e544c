"""Opacus 1.6's four per-sample-gradient modes, driven without a data loader or PrivacyEngine.

* ``opacus-hooks``: ``GradSampleModule`` with per-layer grad samplers (forward hooks keep activations, backward
  hooks build ``p.grad_sample`` of shape (B, *p.shape));
* ``opacus-functorch``: the same module with ``force_functorch=True`` (every layer's per-sample gradient by
  ``vmap(grad)`` of that layer alone);
* ``opacus-ew``: ``GradSampleModuleExpandedWeights`` (torch's ExpandedWeights);
* ``opacus-ghost``: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``: per-sample *norms* by ghost clipping, then a second backward on Σ_i c_i·loss_i.

The DPOptimizer is built directly (noise_multiplier, max_grad_norm, expected_batch_size=B, loss_reduction="mean",
``generator`` = the step's noise generator). The fused step calls its pieces one by one (clip_and_accumulate,
add_noise, scale_grad, the wrapped optimizer's step) — exactly what ``DPOptimizer.step()`` does — so that each
phase can be marked. Any exception the library raises while wrapping the model (``build``) or running and
clipping it (``check``, ``clipped_grad_sum``) becomes :class:`MethodUnsupported` with the library's own text and
a one-line diagnosis (bench/dp/diagnose.py) — except running out of memory, which is re-raised unchanged; the
fused step itself lets errors through unchanged.

Training modes (bench/dp/modes.py):

* **autocast** (amp-bf16): the forward runs under the mode's autocast, as a user would write it. hooks, functorch
  and ghost run; ew fails in the backward (ExpandedWeights computes a per-sample gradient from the layer's fp32
  input and bf16 output gradient) and is ``unsupported`` with torch's error.
* **loss scaling** (amp-fp16) is refused up front: Opacus 1.6 has no GradScaler support. Its DPOptimizer clips
  ``p.grad_sample``, which ``GradScaler.unscale_`` never touches (it unscales ``p.grad``), and ghost clipping
  takes its norms from the scaled output gradients, so the clipping norm would include the loss scale (2^16 at
  the first step: every sample clipped to C/2^16) — a silently wrong step (shown in tests/dp/test_modes.py).
* **activation checkpointing**: Opacus' forward hook captures a layer's input on every call, so a checkpointed
  block captures twice — in the forward and again when the backward recomputes it — while the backward hook
  runs once: per-sample gradients are then "not initialized" (hooks, functorch) or the layer looks tied
  (ghost: "Parameter tying is not supported"). The wrapped modules here skip the capture in the original
  forward of a checkpointed block (models.checkpointing.checkpoint_pass() == "forward") and capture in the
  recompute, which runs the whole block (``early_stop=False``) just before the backward reaches it: each layer
  is captured once, with the same input. ew uses no hooks and fails in torch's checkpoint (``CheckpointError``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from opacus.grad_sample import (
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn

from bench.trackers.channel import PhaseMarker, annotate_dp_buffer, no_mark
from models.checkpointing import checkpoint_pass

from ._common import model_device, per_sample_loss, preserved_grads, trainable_parameters
from .base import DPMethod, DPStep, register_method
from .diagnose import diagnose
from .errors import MethodUnsupported, error_text, is_out_of_memory
from .modes import DEFAULT_MODE, TrainingMode
from .privacy import PrivacyParams

# Opacus 1.6 warns about secure_mode / RNG on every DPOptimizer; those warnings say nothing about a benchmark.
logging.getLogger("opacus").setLevel(logging.ERROR)

# Attributes Opacus leaves on modules / parameters when a run stops half-way (an exception inside a hook).
_MODULE_LEFTOVERS = ("activations", "max_batch_len", "ft_compute_sample_grad")
_PARAM_LEFTOVERS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")

# Probe sample count of check(): one sample is enough to hit every structural failure and is cheap.
_PROBE_BATCH = 1


def _release(wrapper, model: nn.Module) -> None:
    """Remove Opacus' hooks and every attribute it put on the model, leaving a plain, usable module."""
    if wrapper is not None:
        wrapper._close()  # remove_hooks() + delete grad_sample/_forward_counter/... from parameters
    for module in model.modules():
        for attr in _MODULE_LEFTOVERS:
            if attr in module.__dict__:
                delattr(module, attr)
        if "autograd_grad_sample_hooks" in module.__dict__:  # only if remove_hooks did not get to it
            for handle in module.autograd_grad_sample_hooks:
                handle.remove()
            delattr(module, "autograd_grad_sample_hooks")
    for p in model.parameters():
        for attr in _PARAM_LEFTOVERS:
            if hasattr(p, attr):
                delattr(p, attr)


class _CaptureOncePerStep:
    """Opacus' activation capture, skipped in the original forward of a checkpointed block: the recompute
    during the backward captures the same input again, just before the layer's backward hook consumes it."""

    def capture_activations_hook(self, module, forward_input, _forward_output):
        if checkpoint_pass() == "forward":
            return
        super().capture_activations_hook(module, forward_input, _forward_output)


class _GradSampleModule(_CaptureOncePerStep, GradSampleModule):
    pass


class _GhostClippingModule(_CaptureOncePerStep, GradSampleModuleFastGradientClipping):
    pass


LOSS_SCALING_REASON = "Opacus 1.6 has no loss-scaling (GradScaler) support"


def _loss_scaling_diagnosis(method: str) -> str:
    what = (
        "its ghost norms come from the scaled output gradients"
        if method == "opacus-ghost"
        else "DPOptimizer clips p.grad_sample, which GradScaler.unscale_ never divides by the scale"
    )
    return (
        f"{what}, so the clipping norm would include the loss scale (2^16 at the first step) and clip every "
        "sample to C/2^16, silently; use amp-bf16 (no loss scaling) or bk / microbatch with amp-fp16"
    )


class _PerSampleCriterion:
    """The criterion DPLossFastGradientClipping wants: has ``reduction`` and, set to "none", returns loss [B]."""

    def __init__(self, workload):
        self.workload = workload
        self.reduction = "mean"

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        losses = self.workload.loss_per_sample(output, target)  # (B,)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


class _OpacusMethod(DPMethod):
    _probed: weakref.WeakKeyDictionary[nn.Module, set[str]]

    def __init__(self) -> None:
        # Models a structural probe already passed on (the probe is a forward/backward of one sample).
        self._probed = weakref.WeakKeyDictionary()

    # -- to implement -------------------------------------------------------------------------------------------
    def _noise_free_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------
    def _unsupported(self, workload, model: nn.Module, exc: BaseException, mode: TrainingMode) -> MethodUnsupported:
        return MethodUnsupported(self.name, error_text(exc), diagnose(self.name, workload, model, exc, mode))

    def _wrap_for_step(
        self, workload, model: nn.Module, wrap: Callable[[], nn.Module], mode: TrainingMode = DEFAULT_MODE
    ) -> nn.Module:
        """``wrap()``; on the library's failure, a clean model and :class:`MethodUnsupported`."""
        try:
            return wrap()
        except Exception as exc:
            _release(None, model)
            if is_out_of_memory(exc):
                raise
            raise self._unsupported(workload, model, exc, mode) from exc

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        if mode.loss_scaling:
            raise MethodUnsupported(self.name, LOSS_SCALING_REASON, _loss_scaling_diagnosis(self.name))
        key = (getattr(workload, "name", ""), mode)
        if key in self._probed.get(model, set()):
            return
        probe = workload.make_batch(_PROBE_BATCH, device=model_device(model))
        self.clipped_grad_sum(workload, model, probe, 1.0, mode)  # raises MethodUnsupported with the real error
        self._probed.setdefault(model, set()).add(key)

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        if mode.loss_scaling:
            raise MethodUnsupported(self.name, LOSS_SCALING_REASON, _loss_scaling_diagnosis(self.name))
        with preserved_grads(model):
            try:
                return self._noise_free_sum(workload, model, batch, max_grad_norm, mode)
            except MethodUnsupported:
                raise
            except Exception as exc:  # the library's own failure on this model, unless memory ran out
                if is_out_of_memory(exc):
                    raise
                raise self._unsupported(workload, model, exc, mode) from exc


def _summed_grads(model: nn.Module) -> dict[str, Tensor]:
    """``p.summed_grad`` (Opacus' Σ_i clipped g_i) of every trainable parameter, detached copies."""
    return {name: p.summed_grad.detach().clone() for name, p in trainable_parameters(model).items()}


# ---------------------------------------------------------------------------------------------------------------
# hooks / functorch / ew: per-sample gradients instantiated in p.grad_sample, clipped by DPOptimizer


class _GradSampleMethod(_OpacusMethod):
    def wrap(self, model: nn.Module):
        raise NotImplementedError

    def _noise_free_sum(self, workload, model, batch, max_grad_norm, mode):
        wrapper = None
        try:
            wrapper = self.wrap(model)
            with mode.forward_context(model_device(model)):
                loss = per_sample_loss(workload, wrapper, batch).mean()
            loss.backward()
            params = list(trainable_parameters(model).values())
            optimizer = DPOptimizer(
                torch.optim.SGD(params, lr=0.0),
                noise_multiplier=0.0,
                max_grad_norm=max_grad_norm,
                expected_batch_size=batch.batch_size,
                loss_reduction="mean",
            )
            annotate_dp_buffer(*(p.grad_sample for p in params))
            optimizer.clip_and_accumulate()
            return _summed_grads(model)
        finally:
            _release(wrapper, model)

    def build(
        self, workload, model, optimizer, privacy: PrivacyParams, batch_size, noise_generator, mode=DEFAULT_MODE
    ) -> DPStep:
        wrapper = self._wrap_for_step(workload, model, lambda: self.wrap(model), mode)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
        return OpacusGradSampleStep(workload, model, wrapper, dp_optimizer, privacy, mode)


class _OpacusStep(DPStep):
    """What the Opacus steps share: the noise phase and giving the model back unwrapped."""

    wrapper: nn.Module

    def noise(self, opt) -> None:
        """The noise phase: N(0, σ²C²) on the clipped sums, then the 1/B scaling (the end of Opacus' pre_step;
        the distributed steps add their reduction here)."""
        opt.add_noise()
        opt.scale_grad()

    def close(self) -> None:
        _release(self.wrapper, self.model)


class OpacusGradSampleStep(_OpacusStep):
    def __init__(self, workload, model, wrapper, dp_optimizer: DPOptimizer, privacy, mode=DEFAULT_MODE):
        super().__init__(model, dp_optimizer, privacy)
        self.workload, self.wrapper, self.dp_optimizer, self.mode = workload, wrapper, dp_optimizer, mode
        self.device = model_device(model)

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        opt = self.dp_optimizer
        mark("forward")
        opt.zero_grad(set_to_none=True)  # p.grad, p.grad_sample and p.summed_grad of the previous step
        with self.mode.forward_context(self.device):
            loss = per_sample_loss(self.workload, self.wrapper, batch).mean()
        mark("backward")
        loss.backward()
        annotate_dp_buffer(*(p.grad_sample for p in opt.params))
        # DPOptimizer.step() = pre_step (clip_and_accumulate, add_noise, scale_grad) + the wrapped step.
        mark("clip")
        opt.clip_and_accumulate()
        mark("noise")
        self.noise(opt)
        mark("optimizer")
        opt.original_optimizer.step()
        mark("end")
        return loss.detach()


@register_method
class OpacusHooks(_GradSampleMethod):
    """Opacus GradSampleModule, per-layer grad samplers (p.grad_sample), DPOptimizer."""

    name = "opacus-hooks"

    def wrap(self, model):
        return _GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=False)


@register_method
class OpacusFunctorch(_GradSampleMethod):
    """Opacus GradSampleModule(force_functorch=True): every layer's per-sample grads by vmap(grad)."""

    name = "opacus-functorch"

    def wrap(self, model):
        return _GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=True)


@register_method
class OpacusEW(_GradSampleMethod):
    """Opacus GradSampleModuleExpandedWeights (torch ExpandedWeights), DPOptimizer."""

    name = "opacus-ew"

    def wrap(self, model):
        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")


# ---------------------------------------------------------------------------------------------------------------
# ghost: per-sample norms only, then a second backward on Σ_i c_i·loss_i


@register_method
class OpacusGhost(_OpacusMethod):
    """Opacus fast gradient / ghost clipping: norms from the first backward, clipped sum from a second."""

    name = "opacus-ghost"

    @staticmethod
    def wrap(model: nn.Module, max_grad_norm: float):
        return _GhostClippingModule(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )

    @staticmethod
    def _optimizer(optimizer, noise_multiplier, max_grad_norm, batch_size, generator):
        return DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=generator,
        )

    def _noise_free_sum(self, workload, model, batch, max_grad_norm, mode):
        wrapper = None
        try:
            wrapper = self.wrap(model, max_grad_norm)
            params = list(trainable_parameters(model).values())
            optimizer = self._optimizer(torch.optim.SGD(params, lr=0.0), 0.0, max_grad_norm, batch.batch_size, None)
            criterion = DPLossFastGradientClipping(wrapper, optimizer, _PerSampleCriterion(workload), "mean")
            with mode.forward_context(model_device(model)):
                loss = criterion(wrapper(*batch.inputs), batch.target)
            loss.backward()  # Opacus' own packaged double backward: p.grad = Σ_i c_i g_i.
            annotate_dp_buffer(wrapper.per_sample_gradient_norms)
            optimizer.accumulate()  # p.summed_grad = p.grad
            return _summed_grads(model)
        finally:
            _release(wrapper, model)

    def build(
        self, workload, model, optimizer, privacy: PrivacyParams, batch_size, noise_generator, mode=DEFAULT_MODE
    ) -> DPStep:
        wrapper = self._wrap_for_step(workload, model, lambda: self.wrap(model, privacy.max_grad_norm), mode)
        dp_optimizer = self._optimizer(
            optimizer, privacy.noise_multiplier, privacy.max_grad_norm, batch_size, noise_generator
        )
        criterion = DPLossFastGradientClipping(wrapper, dp_optimizer, _PerSampleCriterion(workload), "mean")
        return OpacusGhostStep(workload, model, wrapper, dp_optimizer, criterion, privacy, mode)


class OpacusGhostStep(_OpacusStep):
    def __init__(self, workload, model, wrapper, dp_optimizer, criterion, privacy, mode=DEFAULT_MODE):
        super().__init__(model, dp_optimizer, privacy)
        self.workload, self.wrapper, self.dp_optimizer, self.criterion = workload, wrapper, dp_optimizer, criterion
        self.mode, self.device = mode, model_device(model)

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        opt, wrapper = self.dp_optimizer, self.wrapper
        mark("forward")
        opt.zero_grad(set_to_none=True)
        with self.mode.forward_context(self.device):
            losses = self.criterion(wrapper(*batch.inputs), batch.target).loss_per_sample  # (B,)
        # DPTensorFastGradientClipping.backward(), split at the phase boundary: the first backward (hooks on)
        # yields per-sample norms; the second (hooks off) backpropagates Σ_i c_i·loss_i into p.grad.
        mark("backward")
        losses.mean().backward(retain_graph=True)
        mark("clip")
        opt.zero_grad()
        coeff = wrapper.get_clipping_coef()  # (B,)
        annotate_dp_buffer(wrapper.per_sample_gradient_norms, coeff)
        wrapper.disable_hooks()
        try:
            (coeff.to(losses.device) * losses).sum().backward()
        finally:
            wrapper.enable_hooks()
        # DPOptimizerFastGradientClipping.step() = pre_step (accumulate, add_noise, scale_grad) + wrapped step.
        opt.accumulate()
        mark("noise")
        self.noise(opt)
        mark("optimizer")
        opt.original_optimizer.step()
        mark("end")
        return losses.detach().mean()
