"""The DP-method registry and the two entry points every method offers.

Each method family lives in its own file and registers :class:`DPMethod` subclasses with
:func:`register_method`. A method offers

* ``build(StepInputs) -> DPStep``: the *fused* step the bench measures — forward → per-sample gradients or
  norms → flat clipping → Gaussian noise (σ·C, once per logical batch) → optimizer update, in one call. By
  default the method's ``step_class`` built from the inputs; a method whose step needs more (an engine, a
  wrapped model) overrides ``build``;
* ``build_parallel(StepInputs, DataParallel) -> DPStep``: the same step on one of several data-parallel ranks
  (bench/dp/parallel.py); by default refused;
* ``clipped_grad_sum(...)``: the noise-free Σ_i min(1, C/‖g_i‖)·g_i computed by the method's own machinery,
  used by the equivalence tests.

Each takes a :class:`~bench.dp.modes.TrainingMode` (precision, activation checkpointing); the model must have
been prepared for it (:func:`bench.dp.modes.prepare_model`). A method that cannot train in a mode raises
:class:`MethodUnsupported` from ``check`` or while running, with the library's real error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from bench.messages import did_you_mean
from bench.trackers.channel import PhaseMarker, no_mark
from models.workload import Workload

from ._common import (
    all_reduce_sum,
    check_max_grad_norm,
    model_device,
    noise_and_average,
    noise_free_sums,
    trainable_parameters,
)
from .errors import DPConfigError, MethodUnsupported
from .modes import DEFAULT_MODE, TrainingMode, check_prepared
from .privacy import PrivacyParams

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "ClippedSumMethod",
    "ClippedSumStep",
    "DPMethod",
    "DPStep",
    "DataParallel",
    "StepInputs",
    "available_methods",
    "base_optimizer",
    "build_step",
    "clipped_grad_sum",
    "get_method",
    "make_optimizer",
    "register_method",
]

# The learning rate of every step the bench builds, one process or many ranks: memory and time do not depend on
# it, so no option sets it.
DEFAULT_LR = 1e-4

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
}


def make_optimizer(name: str, params, lr: float = DEFAULT_LR) -> torch.optim.Optimizer:
    """AdamW (DiT's and GPT-2's training optimizer, the default), Adam or SGD over ``params``."""
    if name not in OPTIMIZERS:
        raise DPConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr)


def base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that updates the parameters under any DP wrappers around it (Opacus' optimizers keep the one
    they wrap as ``original_optimizer``); a wrapper that leads back to one already seen ends the walk."""
    seen: set[int] = set()
    while hasattr(optimizer, "original_optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.original_optimizer
    return optimizer


@dataclass(frozen=True)
class StepInputs:
    """What every fused step is built from. ``model`` is prepared for ``mode`` and ``optimizer`` is over its
    trainable parameters; ``batch_size`` is the logical batch the noise is scaled by (on ranks, the global one)."""

    workload: Workload
    model: nn.Module
    optimizer: torch.optim.Optimizer
    privacy: PrivacyParams
    batch_size: int
    noise_generator: torch.Generator | None = None
    mode: TrainingMode = DEFAULT_MODE


@dataclass(frozen=True)
class DataParallel:
    """How one rank's step is spread over the ranks: ``strategy`` ("ddp" or "fsdp"), the samples this rank holds
    (``local_batch``, the global batch over the world size), FSDP's device mesh, DDP's device ids on CUDA."""

    strategy: str
    local_batch: int
    mesh: object = None
    device_ids: list[int] | None = None


class DPStep:
    """A fused DP training step. Call it with a :class:`models.Batch`; it returns the (detached) mean loss.

    ``mark`` is called with each phase name of :data:`PHASES` as the phase begins and with ``"end"`` at the
    end. The default does nothing (timed rounds); the memory sampler passes a recorder. ``close()`` removes
    whatever the method attached to the model (hooks, wrappers). ``optimizer`` is the one the step calls (for
    Opacus, its DP optimizer around the one of the inputs)."""

    def __init__(self, inputs: StepInputs):
        self.workload, self.model, self.optimizer = inputs.workload, inputs.model, inputs.optimizer
        self.privacy, self.mode = inputs.privacy, inputs.mode
        self.device = model_device(inputs.model)

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ClippedSumStep(DPStep):
    """A fused step for methods that produce Σ_i min(1, C/‖g_i‖)·g_i themselves (bk, torch-func, microbatch):
    they implement :meth:`clipped_sum` (marking forward/backward/clip); noise, loss scaling and the update are
    shared."""

    # Set by data-parallel ranks (ClippedSumMethod.build_parallel): sums the clipped sums over the ranks, in place,
    # before the noise, so the noise is added once to the global sum (``batch_size`` is then the global batch).
    reduce_clipped_sums: Callable[[list[Tensor]], None] | None = None

    def __init__(self, inputs: StepInputs):
        super().__init__(inputs)
        self.batch_size, self.noise_generator = inputs.batch_size, inputs.noise_generator
        self.params = trainable_parameters(inputs.model)
        self.scaler = inputs.mode.new_scaler(self.device)  # amp-fp16: dynamic loss scaling, torch's GradScaler

    def clipped_sum(self, batch, mark: PhaseMarker, loss_scale: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """(the clipped per-sample gradient sums of :attr:`params`, in its order; the detached mean loss). With
        ``loss_scale`` (a 0-d tensor) the backward runs on the loss times the scale and the sums come out
        multiplied by it, like the gradients of any GradScaler'd backward, while the clip factors are those of the
        unscaled gradients."""
        raise NotImplementedError

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        # No gradient may survive from a previous step: it would sit in memory through the whole pass.
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        loss_scale = None if scaler is None else scaler.scale(torch.ones((), device=self.device))  # no host sync
        sums, loss = self.clipped_sum(batch, mark, loss_scale)
        if self.reduce_clipped_sums is not None:
            self.reduce_clipped_sums(sums)
        mark("noise")
        for p, g in zip(self.params.values(), sums):
            p.grad = g
        del sums
        if scaler is not None:
            # p.grad /= scale, and an inf/nan anywhere (an overflowed backward) makes step() skip the update;
            # the noise is added to the unscaled sums, after the check.
            scaler.unscale_(self.optimizer)
        privacy = self.privacy
        noise_and_average(
            self.params.values(), privacy.noise_multiplier, privacy.max_grad_norm, self.batch_size, self.noise_generator
        )
        mark("optimizer")
        if scaler is None:
            self.optimizer.step()
        else:
            scaler.step(self.optimizer)
            scaler.update()
        mark("end")
        return loss


class DPMethod:
    """One DP-SGD implementation. Subclasses set ``name`` (the registry key) and ``step_class`` (the fused step
    :meth:`build` makes) and implement :meth:`clipped_grad_sum`."""

    name: str = ""
    step_class: type[DPStep]
    # A method of an optional extra (the JAX ones): registered and named by ``--methods``, but left out of the
    # default method list (every preset's, every test's enumeration) unless asked for.
    opt_in: bool = False
    # jax-privacy's microbatch size (its spec's ``microbatch=K``, recorded); None: the whole batch at once, or a
    # method without one
    microbatch_size: int | None = None

    def with_options(self, options: str) -> DPMethod:
        """This method configured by the text after its name's colon (``jax-privacy:microbatch=4``); DPConfigError
        for a method that takes none, or a bad option."""
        raise DPConfigError(f"DP method {self.name!r} takes no options, got {options!r}")

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        """Raise :class:`MethodUnsupported` (with the library's real error) if the model cannot be run in
        ``mode``."""

    def build(self, inputs: StepInputs) -> DPStep:
        """The fused step of this method (``check`` has passed on the model)."""
        return self.step_class(inputs)

    def refusal(self, strategy: str) -> MethodUnsupported | None:
        """dpmem's own refusal of running under ``strategy``, known without running anything; None if it may try."""
        return None

    def build_parallel(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        """This rank's fused step under ``ranks.strategy``; for FSDP ``inputs.model`` is already sharded."""
        raise MethodUnsupported(
            self.name, f"dpmem has no data-parallel version of {self.name!r}", "run it with world size 1"
        )

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        raise NotImplementedError


class ClippedSumMethod(DPMethod):
    """A method whose step is a :class:`ClippedSumStep`: under DDP each rank's clipped sums are all-reduced
    (summed) before the noise; FSDP is refused, the sums being whole parameters formed outside autograd."""

    step_class: type[ClippedSumStep]

    def refusal(self, strategy: str) -> MethodUnsupported | None:
        if strategy != "fsdp":
            return None
        return MethodUnsupported(
            self.name,
            f"{self.name} under FSDP is not implemented by dpmem",
            "it forms each parameter's whole clipped sum outside autograd, which FSDP's reduce-scatter never "
            "sees; run it with --parallel ddp",
        )

    def build_parallel(self, inputs: StepInputs, ranks: DataParallel) -> DPStep:
        step = self.build(inputs)
        step.reduce_clipped_sums = all_reduce_sum
        return step

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        pass_at = partial(self.noise_free_pass, workload, model, batch, max_grad_norm, mode)
        return noise_free_sums(mode, model_device(model), pass_at)

    def noise_free_pass(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode, loss_scale: Tensor | None
    ) -> dict[str, Tensor]:
        """Σ_i min(1, C/‖g_i‖)·g_i by trainable parameter name, from a backward on the loss times ``loss_scale``
        (None: unscaled), by the method's own machinery."""
        raise NotImplementedError


_METHODS: dict[str, DPMethod] = {}


def register_method(cls: type[DPMethod]) -> type[DPMethod]:
    """Class decorator: instantiate and register a method under ``cls.name``."""
    if not cls.name or cls.name in _METHODS:
        raise DPConfigError(f"method name {cls.name!r} is empty or registered twice")
    _METHODS[cls.name] = cls()
    return cls


def available_methods(*, include_opt_in: bool = False) -> list[str]:
    """Registered method names, baseline first; the opt-in ones (an optional extra's) only if asked for."""
    return [name for name, method in _METHODS.items() if include_opt_in or not method.opt_in]


def get_method(name: str) -> DPMethod:
    """The method of a spec: a registered name, options after a colon where the method takes some
    (``jax-privacy:microbatch=4``, :meth:`DPMethod.with_options`); DPConfigError for an unknown name or option."""
    registered, colon, options = name.partition(":")
    if registered not in _METHODS:
        hint = did_you_mean(registered, list(_METHODS), cutoff=0.4)
        raise DPConfigError(f"unknown DP method {registered!r}{hint}; valid: {', '.join(_METHODS)}")
    method = _METHODS[registered]
    return method.with_options(options) if colon else method


def clipped_grad_sum(
    method: str, workload, model: nn.Module, batch, max_grad_norm: float, *, mode: TrainingMode = DEFAULT_MODE
) -> dict[str, Tensor]:
    """Noise-free Σ_i min(1, C/‖g_i‖)·g_i by ``method``'s own machinery, keyed by trainable parameter name, in
    ``mode`` (``model`` prepared for it). Under amp-fp16 the one backward runs with a fresh GradScaler's initial
    scale and the sums are divided back by it.

    Leaves the model's weights (and, once it returns, its hooks) as they were."""
    impl = get_method(method)
    max_grad_norm = check_max_grad_norm(max_grad_norm)
    check_prepared(model, mode)
    impl.check(workload, model, mode)
    return impl.clipped_grad_sum(workload, model, batch, max_grad_norm, mode)


def build_step(
    method: str,
    workload,
    model: nn.Module,
    *,
    privacy: PrivacyParams,
    batch_size: int,
    optimizer: str = "adamw",
    lr: float = DEFAULT_LR,
    noise_generator: torch.Generator | None = None,
    mode: TrainingMode = DEFAULT_MODE,
) -> DPStep:
    """The fused DP step of ``method`` for ``model`` in ``mode`` (its optimizer is built here, over trainable
    parameters; ``model`` prepared for ``mode`` by :func:`bench.dp.modes.prepare_model`)."""
    impl = get_method(method)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DPConfigError(f"batch size must be an integer >= 1, got {batch_size!r}")
    check_prepared(model, mode)
    impl.check(workload, model, mode)
    opt = make_optimizer(optimizer, trainable_parameters(model).values(), lr)
    return impl.build(StepInputs(workload, model, opt, privacy, batch_size, noise_generator, mode))
