"""Opacus 1.6's four per-sample-gradient modes, driven without a data loader or PrivacyEngine.

* ``opacus-hooks``: ``GradSampleModule`` with per-layer grad samplers (forward hooks keep activations, backward
  hooks build ``p.grad_sample`` of shape (B, *p.shape));
* ``opacus-functorch``: the same module with ``force_functorch=True`` (every layer's per-sample gradient by
  ``vmap(grad)`` of that layer alone);
* ``opacus-ew``: ``GradSampleModuleExpandedWeights`` (torch's ExpandedWeights);
* ``opacus-ghost``: ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping``: per-sample *norms* by ghost clipping, then a second backward on Σ_i c_i·loss_i.

Every DP optimizer is built directly, by :func:`opacus_optimizer` (noise_multiplier, max_grad_norm,
expected_batch_size=B, loss_reduction="mean", ``generator`` = the step's noise generator); on data-parallel ranks
(``build_parallel``; bench/dp/parallel.py) the method's distributed optimizer around DPDDP, or ghost_fsdp's. The
fused step calls its pieces one by one (clip_and_accumulate, add_noise, scale_grad, the wrapped optimizer's step)
— exactly what ``DPOptimizer.step()`` does — so that each phase can be marked. Any exception the library raises
while wrapping the model (``build``) or running and clipping it (``check``, ``clipped_grad_sum``) becomes
:class:`MethodUnsupported` with the library's own text and a one-line diagnosis (bench/dp/diagnose.py) — except
running out of memory, which is re-raised unchanged; the fused step itself lets errors through unchanged.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from opacus.grad_sample import (
    GradSampleModule,
    GradSampleModuleExpandedWeights,
    GradSampleModuleFastGradientClipping,
)
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    FSDPOptimizerFastGradientClipping,
)
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn

from bench.trackers.channel import PhaseMarker, annotate_dp_buffer, no_mark
from models.checkpointing import checkpoint_pass

from ._common import model_device, per_sample_loss, preserved_grads, trainable_parameters
from .base import DataParallel, DPMethod, DPStep, StepInputs, register_method
from .diagnose import diagnose
from .errors import MethodUnsupported, error_text, is_out_of_memory
from .modes import DEFAULT_MODE, TrainingMode

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


def _ghost_criterion(wrapper: nn.Module, dp_optimizer, workload) -> DPLossFastGradientClipping:
    return DPLossFastGradientClipping(wrapper, dp_optimizer, _PerSampleCriterion(workload), "mean")


def opacus_optimizer(
    optimizer_class: type[DPOptimizer],
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> DPOptimizer:
    """One of Opacus' DP optimizers (``optimizer_class``) around ``optimizer``: every one dpmem builds averages
    the per-sample losses (``loss_reduction="mean"``) and leaves ``secure_mode`` off, Opacus' default."""
    return optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def _summed_grads(model: nn.Module) -> dict[str, Tensor]:
    """``p.summed_grad`` (Opacus' Σ_i clipped g_i) of every trainable parameter, detached copies."""
    return {name: p.summed_grad.detach().clone() for name, p in trainable_parameters(model).items()}


# ---------------------------------------------------------------------------------------------------------------
# the fused steps: DPOptimizer.step() called in its pieces, so that each phase can be marked


class _OpacusStep(DPStep):
    """What the Opacus steps share: the wrapped model, the noise phase and giving the model back unwrapped.
    ``inputs.optimizer`` is Opacus' DP optimizer (around the one the bench built)."""

    def __init__(self, inputs: StepInputs, wrapper: nn.Module):
        super().__init__(inputs)
        self.wrapper = wrapper

    def noise(self, opt) -> None:
        """The noise phase: N(0, σ²C²) on the clipped sums, then the 1/B scaling (the end of Opacus' pre_step;
        the distributed steps add their reduction here)."""
        opt.add_noise()
        opt.scale_grad()

    def close(self) -> None:
        _release(self.wrapper, self.model)


class OpacusGradSampleStep(_OpacusStep):
    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        opt = self.optimizer
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


class OpacusGhostStep(_OpacusStep):
    def __init__(self, inputs: StepInputs, wrapper: nn.Module):
        super().__init__(inputs, wrapper)
        self.criterion = _ghost_criterion(wrapper, self.optimizer, self.workload)

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        opt, wrapper = self.optimizer, self.wrapper
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


class _AllReducedAfterNoise:
    """Under DPDDP: the noise on rank 0 only, the 1/B scaling by the local batch, then the all-reduce (sum /
    world) of Opacus' distributed optimizers — all inside the noise phase."""

    def noise(self, opt) -> None:
        super().noise(opt)
        opt.reduce_gradients()


class DistributedOpacusStep(_AllReducedAfterNoise, OpacusGradSampleStep):
    """``DistributedDPOptimizer.step()`` in phases: the local per-sample gradients clipped, then the noise phase."""


class DistributedGhostStep(_AllReducedAfterNoise, OpacusGhostStep):
    """Ghost clipping under DPDDP: the two backward passes on the local samples, then the noise phase."""


class FSDPGhostStep(OpacusGhostStep):
    """``ghost_fsdp``: FSDP reduce-scattered the sharded gradients in the backward; every rank adds σ·C/world
    noise to its own shard."""

    def noise(self, opt) -> None:
        # A plain (replicated) noise tensor added to sharded gradients needs DTensor's implicit replication, as
        # FSDPOptimizerFastGradientClipping.pre_step does.
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            opt.add_noise()
        opt.scale_grad()


# ---------------------------------------------------------------------------------------------------------------
# the methods


_MAX_PROBED = 1024


def _structure(model: nn.Module) -> int:
    """A hash of what Opacus' refusals depend on: every module's name and class, every parameter's name, shape,
    dtype and ``requires_grad``, and which parameters are one tensor (tied weights) — never a value. Two copies of
    one model hash equal; a model changed in any of these ways probes again."""
    modules = tuple(
        (name, type(module).__module__, type(module).__qualname__) for name, module in model.named_modules()
    )
    parameters = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad, first) for first, (name, p) in _first_names(model)
    )
    return hash((modules, parameters))


def _first_names(model: nn.Module):
    """(the first name of the tensor, (name, parameter)) for every parameter name, tied ones included."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        yield first.setdefault(id(p), name), (name, p)


class _OpacusMethod(DPMethod):
    """An Opacus mode: its wrapper (``wrap``), its DP optimizer on one process and on DPDDP ranks, and the steps
    that drive them."""

    optimizer_class: type[DPOptimizer]
    distributed_optimizer_class: type[DPOptimizer]
    step_class: type[_OpacusStep]
    distributed_step_class: type[_OpacusStep]
    _probed: set[tuple]

    def __init__(self) -> None:
        # Model structures a probe already passed on (the probe is a forward/backward of one sample; on meta at
        # paper size it cost ~2 s, and every case gets a fresh copy of the same model).
        self._probed = set()

    # -- to implement -------------------------------------------------------------------------------------------
    def _opacus_module(self, model: nn.Module, max_grad_norm: float) -> nn.Module:
        """Opacus' module around ``model`` (ghost clipping clips inside it, at ``max_grad_norm``)."""
        raise NotImplementedError

    def _noise_free_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _fsdp_step(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------
    def _unsupported(self, workload, model: nn.Module, exc: BaseException, mode: TrainingMode) -> MethodUnsupported:
        return MethodUnsupported(self.name, error_text(exc), diagnose(self.name, workload, model, exc, mode))

    @contextmanager
    def _wrapped(self, model: nn.Module, max_grad_norm: float) -> Iterator[nn.Module]:
        """Opacus' module around ``model`` for one probe or noise-free pass; the model given back clean on exit."""
        wrapper = None
        try:
            wrapper = self._opacus_module(model, max_grad_norm)
            yield wrapper
        finally:
            _release(wrapper, model)

    def _noise_free_optimizer(self, model: nn.Module, max_grad_norm: float, batch_size: int) -> DPOptimizer:
        """This method's DP optimizer over the trainable parameters, clipping only: no noise, no update (lr 0)."""
        sgd = torch.optim.SGD(list(trainable_parameters(model).values()), lr=0.0)
        return opacus_optimizer(
            self.optimizer_class, sgd, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=batch_size
        )

    def _step(
        self,
        inputs: StepInputs,
        wrap: Callable[[], nn.Module],
        optimizer_class: type[DPOptimizer],
        step_class: type[_OpacusStep],
        expected_batch_size: int,
    ) -> DPStep:
        """``step_class`` over ``wrap()`` and ``optimizer_class`` around the inputs' optimizer. On the library's
        failure to wrap: a clean model and :class:`MethodUnsupported` (running out of memory re-raised)."""
        try:
            wrapper = wrap()
        except Exception as exc:
            _release(None, inputs.model)
            if is_out_of_memory(exc):
                raise
            raise self._unsupported(inputs.workload, inputs.model, exc, inputs.mode) from exc
        dp_optimizer = opacus_optimizer(
            optimizer_class,
            inputs.optimizer,
            noise_multiplier=inputs.privacy.noise_multiplier,
            max_grad_norm=inputs.privacy.max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=inputs.noise_generator,
        )
        return step_class(replace(inputs, optimizer=dp_optimizer), wrapper)

    def build(self, inputs: StepInputs) -> DPStep:
        def wrap() -> nn.Module:
            return self._opacus_module(inputs.model, inputs.privacy.max_grad_norm)

        return self._step(inputs, wrap, self.optimizer_class, self.step_class, inputs.batch_size)

    def build_parallel(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        """Under DDP: Opacus' DPDDP wrapper and distributed optimizer, ``expected_batch_size`` the per-rank batch
        (Opacus' own rule: make_private divides the batch by the world size)."""
        if ranks.strategy == "fsdp":
            return self._fsdp_step(inputs, ranks)
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        def wrap() -> nn.Module:
            return self._opacus_module(DPDDP(inputs.model), inputs.privacy.max_grad_norm)

        optimizer_class, step_class = self.distributed_optimizer_class, self.distributed_step_class
        return self._step(inputs, wrap, optimizer_class, step_class, ranks.local_batch)

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        if mode.loss_scaling:
            raise MethodUnsupported(self.name, LOSS_SCALING_REASON, _loss_scaling_diagnosis(self.name))
        key = (getattr(workload, "name", ""), mode, model_device(model).type, _structure(model))
        if key in self._probed:
            return
        probe = workload.make_batch(_PROBE_BATCH, device=model_device(model))
        self.clipped_grad_sum(workload, model, probe, 1.0, mode)  # raises MethodUnsupported with the real error
        if len(self._probed) >= _MAX_PROBED:
            self._probed.clear()
        self._probed.add(key)

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


# hooks / functorch / ew: per-sample gradients instantiated in p.grad_sample, clipped by DPOptimizer


class _GradSampleMethod(_OpacusMethod):
    optimizer_class = DPOptimizer
    distributed_optimizer_class = DistributedDPOptimizer
    step_class = OpacusGradSampleStep
    distributed_step_class = DistributedOpacusStep

    def wrap(self, model: nn.Module) -> nn.Module:
        """The mode's GradSampleModule around ``model``."""
        raise NotImplementedError

    def _opacus_module(self, model, max_grad_norm):
        return self.wrap(model)  # clipping is the DP optimizer's

    def _noise_free_sum(self, workload, model, batch, max_grad_norm, mode):
        with self._wrapped(model, max_grad_norm) as wrapper:
            with mode.forward_context(model_device(model)):
                loss = per_sample_loss(workload, wrapper, batch).mean()
            loss.backward()
            optimizer = self._noise_free_optimizer(model, max_grad_norm, batch.batch_size)
            annotate_dp_buffer(*(p.grad_sample for p in optimizer.params))
            optimizer.clip_and_accumulate()
            return _summed_grads(model)

    def _fsdp_step(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        """Opacus 1.6 offers FSDP2 only in ghost_fsdp mode; its other modes wrap an FSDP model without complaint
        and fail in the backward. One probe step on one local sample gets that real error (every rank fails
        alike, after the same collectives), raised as :class:`MethodUnsupported`."""
        sharded, max_grad_norm = inputs.model, inputs.privacy.max_grad_norm
        probe = inputs.workload.make_batch(1, device=next(sharded.parameters()).device)
        try:
            with self._wrapped(sharded, max_grad_norm) as wrapper:
                dp_optimizer = opacus_optimizer(
                    self.distributed_optimizer_class,
                    inputs.optimizer,
                    noise_multiplier=0.0,
                    max_grad_norm=max_grad_norm,
                    expected_batch_size=ranks.local_batch,
                )
                OpacusGradSampleStep(replace(inputs, optimizer=dp_optimizer), wrapper)(probe)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            raise MethodUnsupported(
                self.name,
                error_text(exc),
                "Opacus 1.6 runs FSDP2 only in ghost_fsdp mode (opacus-ghost); its per-sample-gradient modes keep "
                "state on parameters that FSDP swaps between sharded and unsharded",
            ) from None
        raise MethodUnsupported(
            self.name,
            "Opacus ran one probe step under FSDP without error, but dpmem has not verified its clipped gradient there",
            "only ghost_fsdp (opacus-ghost) is checked under FSDP",
        )


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


# ghost: per-sample norms only, then a second backward on Σ_i c_i·loss_i


@register_method
class OpacusGhost(_OpacusMethod):
    """Opacus fast gradient / ghost clipping: norms from the first backward, clipped sum from a second."""

    name = "opacus-ghost"
    optimizer_class = DPOptimizerFastGradientClipping
    distributed_optimizer_class = DistributedDPOptimizerFastGradientClipping
    step_class = OpacusGhostStep
    distributed_step_class = DistributedGhostStep

    def _opacus_module(self, model, max_grad_norm):
        return _GhostClippingModule(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )

    def _noise_free_sum(self, workload, model, batch, max_grad_norm, mode):
        with self._wrapped(model, max_grad_norm) as wrapper:
            optimizer = self._noise_free_optimizer(model, max_grad_norm, batch.batch_size)
            criterion = _ghost_criterion(wrapper, optimizer, workload)
            with mode.forward_context(model_device(model)):
                loss = criterion(wrapper(*batch.inputs), batch.target)
            loss.backward()  # Opacus' own packaged double backward: p.grad = Σ_i c_i g_i.
            annotate_dp_buffer(wrapper.per_sample_gradient_norms)
            optimizer.accumulate()  # p.summed_grad = p.grad
            return _summed_grads(model)

    def _fsdp_step(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        """Opacus' ghost_fsdp: its FSDP ghost-clipping module (every rank clips its local samples) and optimizer."""
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
            GradSampleModuleFastGradientClippingFSDP,
        )

        def wrap() -> nn.Module:
            return GradSampleModuleFastGradientClippingFSDP(
                inputs.model, batch_first=True, loss_reduction="mean", max_grad_norm=inputs.privacy.max_grad_norm
            )

        return self._step(inputs, wrap, FSDPOptimizerFastGradientClipping, FSDPGhostStep, ranks.local_batch)
