"""What a workload is: :class:`Workload` (model, batch and per-sample loss factories), the :class:`Batch` it
draws, :class:`WorkloadError`, and the checks of a spec's overrides against a config's field types.

The registry (``models``) and the built-in workloads (``models.catalog``) both build on this module, so neither
imports the other's module to get the types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MAX_SEED", "Batch", "Workload", "WorkloadError", "check_overrides", "override_types"]


# The largest seed torch.manual_seed and torch.Generator.manual_seed take (unsigned 64-bit).
MAX_SEED = 2**64 - 1


class WorkloadError(ValueError):
    """A bad workload name, spec, override, size or bring-your-own module; one line naming the problem."""


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

    # From get_workload: the canonical spec, e.g. "gpt2-large:seq_len=128" (the plain name without overrides).
    name: str
    model_fn: Callable[[], nn.Module]
    batch_fn: Callable[[int, torch.Generator], Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    # "dit", "dit-plain", "gpt" for the built-ins; results record it (the GPT-vs-DiT proxy figure selects by it).
    family: str = "custom"
    tokens_per_sample: int | None = None
    input_names: tuple[str, ...] = ("x",)  # the positional inputs' names, shown by `python -m models`
    seed: int = 0
    # Free-form facts (config name, image size, ...): `python -m models` shows info["config"]; nothing in
    # bench/ or reports/ reads them, and they are not recorded with results.
    info: dict[str, Any] = field(default_factory=dict)
    # From get_workload: the overrides in the spec, in the order given (empty for a plain name).
    overrides: dict[str, Any] = field(default_factory=dict)
    # The module types activation checkpointing wraps (`--checkpointing blocks`, models/checkpointing.py): the
    # transformer block class(es). Empty: the workload names none, and a checkpointed case is unsupported.
    checkpoint_module_types: tuple[type[nn.Module], ...] = ()
    # The attention projections, as fnmatch patterns over ``named_modules()`` names (e.g. "blocks.*.attn.qkv"):
    # what `--trainable attention` trains and `--trainable lora` puts adapters on (bench/dp/trainable.py).
    # Empty: the workload names none, and such a case is unsupported.
    attention_module_names: tuple[str, ...] = ()

    @property
    def base_name(self) -> str:
        """The registered name: ``name`` without its overrides (registered names hold no ':')."""
        return self.name.partition(":")[0]

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


# ---------------------------------------------------------------------------------------------------------------
# Override checking against a dataclass's field types

_SCALARS = (bool, int, float, str, type(None))


def override_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The fields of dataclass ``cls`` a spec can set -> the types each accepts: those annotated with scalars
    (bool, int, float, str, None, or a union of them). Callables, tuples and dicts are left out."""
    hints = typing.get_type_hints(cls)
    accepted = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if all(m in _SCALARS for m in members):
            accepted[f.name] = members
    return accepted


def _type_names(accepted: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in accepted)


def _accepts(accepted: tuple[type, ...], value: Any) -> bool:
    # bool is an int subclass but never a valid int (seq_len=True); an int is a valid float (mlp_ratio=4).
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int) and float in accepted:
        return True
    return isinstance(value, tuple(t for t in accepted if t is not bool))


def check_overrides(name: str, overrides: Mapping[str, Any], accepted: Mapping[str, tuple[type, ...]]) -> None:
    """A one-line WorkloadError for an override key not in ``accepted`` (naming the valid keys) or a value of
    the wrong type (naming the type it needs); ``accepted`` maps key -> types, e.g. from :func:`override_types`."""
    unknown = [key for key in overrides if key not in accepted]
    if unknown:
        raise WorkloadError(
            f"workload {name!r} takes no override {', '.join(map(repr, unknown))}; valid keys: {', '.join(accepted)}"
        )
    for key, value in overrides.items():
        if not _accepts(accepted[key], value):
            raise WorkloadError(
                f"workload {name!r}: override {key} must be {_type_names(accepted[key])}, got {value!r}"
            )
