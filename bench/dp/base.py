"""The DP-method registry and the two entry points every method offers.

Each method family lives in its own file and registers :class:`DPMethod` subclasses with
:func:`register_method`. A method offers

* ``build(...) -> DPStep``: the *fused* step the bench measures — forward → per-sample gradients or norms →
  flat clipping → Gaussian noise (σ·C, once per logical batch) → optimizer update, in one call;
* ``clipped_grad_sum(...)``: the noise-free Σ_i min(1, C/‖g_i‖)·g_i computed by the method's own machinery,
  used by the equivalence tests.

Both take a :class:`~bench.dp.modes.TrainingMode` (precision, activation checkpointing); the model must have
been prepared for it (:func:`bench.dp.modes.prepare_model`). A method that cannot train in a mode raises
:class:`MethodUnsupported` from ``check`` or while running, with the library's real error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bench.messages import did_you_mean
from bench.trackers.channel import PhaseMarker, no_mark

from ._common import check_max_grad_norm, model_device, noise_and_average, trainable_parameters
from .errors import DPConfigError
from .modes import DEFAULT_MODE, TrainingMode, check_prepared
from .privacy import PrivacyParams

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "ClippedSumStep",
    "DPMethod",
    "DPStep",
    "available_methods",
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


class DPStep:
    """A fused DP training step. Call it with a :class:`models.Batch`; it returns the (detached) mean loss.

    ``mark`` is called with each phase name of :data:`PHASES` as the phase begins and with ``"end"`` at the
    end. The default does nothing (timed rounds); the memory sampler passes a recorder. ``close()`` removes
    whatever the method attached to the model (hooks, wrappers)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, privacy: PrivacyParams):
        self.model = model
        self.optimizer = optimizer
        self.privacy = privacy

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ClippedSumStep(DPStep):
    """A fused step for methods that produce Σ_i min(1, C/‖g_i‖)·g_i themselves (bk, torch-func, microbatch):
    they implement :meth:`clipped_sum` (marking forward/backward/clip); noise, loss scaling and the update are
    shared."""

    # Set by data-parallel ranks (bench/dp/parallel.py): sums the clipped sums over the ranks, in place, before
    # the noise, so the noise is added once to the global sum (``batch_size`` is then the global batch).
    reduce_clipped_sums: Callable[[list[Tensor]], None] | None = None

    def __init__(
        self, workload, model, optimizer, privacy, batch_size: int, noise_generator, mode: TrainingMode = DEFAULT_MODE
    ):
        super().__init__(model, optimizer, privacy)
        self.workload, self.batch_size, self.noise_generator, self.mode = workload, batch_size, noise_generator, mode
        self.device = model_device(model)
        self.scaler = mode.new_scaler(self.device)  # amp-fp16: dynamic loss scaling, torch's GradScaler

    def clipped_sum(
        self, batch, mark: PhaseMarker, loss_scale: Tensor | None
    ) -> tuple[list[nn.Parameter], list[Tensor], Tensor]:
        """(parameters, their clipped per-sample gradient sums, detached mean loss). With ``loss_scale`` (a 0-d
        tensor) the backward runs on the loss times the scale and the sums come out multiplied by it, like the
        gradients of any GradScaler'd backward, while the clip factors are those of the unscaled gradients."""
        raise NotImplementedError

    def __call__(self, batch, mark: PhaseMarker = no_mark) -> Tensor:
        # No gradient may survive from a previous step: it would sit in memory through the whole pass.
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        loss_scale = None if scaler is None else scaler.scale(torch.ones((), device=self.device))  # no host sync
        params, sums, loss = self.clipped_sum(batch, mark, loss_scale)
        if self.reduce_clipped_sums is not None:
            self.reduce_clipped_sums(sums)
        mark("noise")
        for p, g in zip(params, sums):
            p.grad = g
        del sums
        if scaler is not None:
            # p.grad /= scale, and an inf/nan anywhere (an overflowed backward) makes step() skip the update;
            # the noise is added to the unscaled sums, after the check.
            scaler.unscale_(self.optimizer)
        noise_and_average(
            params, self.privacy.noise_multiplier, self.privacy.max_grad_norm, self.batch_size, self.noise_generator
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
    """One DP-SGD implementation. Subclasses set ``name`` (the registry key) and implement the entry points."""

    name: str = ""

    def check(self, workload, model: nn.Module, mode: TrainingMode = DEFAULT_MODE) -> None:
        """Raise :class:`MethodUnsupported` (with the library's real error) if the model cannot be run in
        ``mode``."""

    def build(
        self,
        workload,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        privacy: PrivacyParams,
        batch_size: int,
        noise_generator: torch.Generator | None,
        mode: TrainingMode = DEFAULT_MODE,
    ) -> DPStep:
        raise NotImplementedError

    def clipped_grad_sum(
        self, workload, model: nn.Module, batch, max_grad_norm: float, mode: TrainingMode = DEFAULT_MODE
    ) -> dict[str, Tensor]:
        raise NotImplementedError


_METHODS: dict[str, DPMethod] = {}


def register_method(cls: type[DPMethod]) -> type[DPMethod]:
    """Class decorator: instantiate and register a method under ``cls.name``."""
    if not cls.name or cls.name in _METHODS:
        raise DPConfigError(f"method name {cls.name!r} is empty or registered twice")
    _METHODS[cls.name] = cls()
    return cls


def available_methods() -> list[str]:
    """Registered method names, baseline first."""
    return list(_METHODS)


def get_method(name: str) -> DPMethod:
    if name not in _METHODS:
        hint = did_you_mean(name, list(_METHODS), cutoff=0.4)
        raise DPConfigError(f"unknown DP method {name!r}{hint}; valid: {', '.join(_METHODS)}")
    return _METHODS[name]


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
    return impl.build(workload, model, opt, privacy, batch_size, noise_generator, mode)
