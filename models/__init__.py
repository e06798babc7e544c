"""Workloads: a model factory, a batch factory and a per-sample loss, registered by name.

A :class:`Workload` is everything a DP method needs to run one training step:

* ``build_model()`` returns a fresh model, seeded, so two calls give identical weights;
* ``make_batch(batch_size, generator)`` draws *all* the randomness of a step (diffusion timesteps, noise,
  label drop, tokens), so a step is a deterministic function of (weights, batch);
* ``loss_per_sample(output, target)`` returns a loss of shape ``[B]`` (DP clipping is per sample).

Every input in ``Batch.inputs`` is batched on dim 0 and passed positionally: ``model(*batch.inputs)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Batch",
    "Workload",
    "WorkloadError",
    "get_workload",
    "list_workloads",
    "load_workload_module",
    "register_workload",
]


class WorkloadError(ValueError):
    """A bad workload name, size or bring-your-own module; the message is one line naming the problem."""


@dataclass(frozen=True)
class Batch:
    """One training batch: model inputs (each batched on dim 0, passed positionally) and the loss target."""

    inputs: tuple[Tensor, ...]
    target: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, tuple) or not self.inputs:
            raise WorkloadError("Batch.inputs must be a non-empty tuple of tensors")
        sizes = {int(t.shape[0]) for t in (*self.inputs, self.target)}
        if len(sizes) != 1:
            raise WorkloadError(f"Batch inputs and target disagree on the batch dimension: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:
        return int(self.target.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(tuple(t.to(device) for t in self.inputs), self.target.to(device))

    def select(self, index: slice | Tensor | int) -> Batch:
        """The sub-batch at ``index`` along dim 0 (an int keeps the batch dim: size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Batch(tuple(t[index] for t in self.inputs), self.target[index])


@dataclass(frozen=True)
class Workload:
    """A named training workload. Built-in ones come from :func:`get_workload`; users register their own.

    ``model_fn`` builds the model (called under ``torch.manual_seed(seed)``); ``batch_fn(batch_size, generator)``
    draws a batch; ``loss_fn(output, target)`` returns the per-sample loss ``[B]``.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    batch_fn: Callable[[int, torch.Generator], Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    family: str = "custom"
    tokens_per_sample: int | None = None
    input_names: tuple[str, ...] = ("x",)
    description: str = ""
    seed: int = 0
    # Free-form facts shown by `python -m models` and recorded with results (config name, image size, ...).
    info: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: torch.device | str | None = None) -> nn.Module:
        """A fresh model with deterministic weights (seeded by ``self.seed``); on ``device`` if given.

        ``device="meta"`` builds without allocating (parameter counts of paper-size models)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if device is not None and torch.device(device).type == "meta":
                with torch.device("meta"):
                    return self.model_fn()
            model = self.model_fn()
        return model.to(device) if device is not None else model

    def make_batch(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Batch:
        """Draw a batch of ``batch_size`` samples with ``generator`` (a fresh one seeded by ``self.seed`` if None)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise WorkloadError(f"batch size must be an integer >= 1, got {batch_size!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed)
        batch = self.batch_fn(batch_size, generator)
        if not isinstance(batch, Batch):
            raise WorkloadError(f"workload {self.name!r}: make_batch returned {type(batch).__name__}, not Batch")
        return batch.to(device) if device is not None else batch

    def loss_per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss, shape ``[B]``."""
        return self.loss_fn(output, target)


# name -> factory(**overrides) -> Workload. Built-ins register factories so overrides such as
# get_workload("gpt2", tie_weights=False) reach the model config.
WorkloadFactory = Callable[..., Workload]
_REGISTRY: dict[str, WorkloadFactory] = {}
_BUILTINS_LOADED = False
_MODULE_WORKLOADS: dict[str, list[str]] = {}  # bring-your-own module -> names it registered


def register_workload(workload: Workload | WorkloadFactory, name: str | None = None, *, replace: bool = False) -> str:
    """Register a workload (or a factory ``f(**overrides) -> Workload``) under its name; returns the name.

    A plain :class:`Workload` accepts overrides of its dataclass fields (e.g. ``seed``) in :func:`get_workload`.
    """
    if isinstance(workload, Workload):
        instance = workload
        key = name or instance.name

        def factory(**overrides: Any) -> Workload:
            bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(Workload)})
            if bad:
                raise WorkloadError(f"workload {key!r} takes no override(s) {bad}")
            return dataclasses.replace(instance, **overrides)

    elif callable(workload):
        if not name:
            raise WorkloadError("register_workload(factory) needs name=")
        key, factory = name, workload
    else:
        raise WorkloadError(f"register_workload expects a Workload or a factory, got {type(workload).__name__}")
    if not isinstance(key, str) or not key:
        raise WorkloadError("a workload needs a non-empty string name")
    if key in _REGISTRY and not replace:
        raise WorkloadError(f"workload {key!r} is already registered (pass replace=True to override)")
    _REGISTRY[key] = factory
    return key


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from . import catalog  # noqa: F401  (registers the DiT and GPT workloads)


def list_workloads() -> list[str]:
    """Every registered workload name, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_workload(name: str, **overrides: Any) -> Workload:
    """The workload registered as ``name``; ``overrides`` go to its factory (e.g. ``tie_weights=False``)."""
    _ensure_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `python -m models` to list them"
        raise WorkloadError(f"unknown workload {name!r}{hint}")
    workload = _REGISTRY[name](**overrides)
    if not isinstance(workload, Workload):
        raise WorkloadError(f"workload factory {name!r} returned {type(workload).__name__}, not Workload")
    return workload


def load_workload_module(module_name: str) -> list[str]:
    """Import a bring-your-own module that calls :func:`register_workload`; returns the names it added.

    Any failure (import error, nothing registered, a non-Workload registered) is a :class:`WorkloadError`
    whose one-line message names the module."""
    _ensure_builtins()
    cached = _MODULE_WORKLOADS.get(module_name)
    if cached and module_name in sys.modules and all(name in _REGISTRY for name in cached):
        return list(cached)  # a second load is a no-op: the import is cached, nothing new would register
    before = dict(_REGISTRY)
    try:
        importlib.import_module(module_name)
    except WorkloadError as exc:
        raise WorkloadError(f"workload module {module_name!r}: {exc}") from exc
    except Exception as exc:  # any import-time failure of user code
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise WorkloadError(
            f"workload module {module_name!r} failed to import: {type(exc).__name__}: {first_line}"
        ) from exc
    added = [k for k in _REGISTRY if k not in before or _REGISTRY[k] is not before[k]]
    if not added:
        raise WorkloadError(f"workload module {module_name!r} registered no workload (call models.register_workload)")
    for key in added:
        try:
            get_workload(key)
        except WorkloadError as exc:
            # A factory that needs arguments cannot be checked without them; a broken one is reported here.
            raise WorkloadError(f"workload module {module_name!r}: {exc}") from exc
    _MODULE_WORKLOADS[module_name] = added
    return added
