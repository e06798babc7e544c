"""Training modes: the precision and the activation checkpointing a step trains with.

A :class:`TrainingMode` is two names:

* ``precision`` (:data:`PRECISIONS`): ``fp32``; ``amp-bf16`` — fp32 weights, gradients and optimizer state, the
  forward (loss included) under ``torch.autocast`` in bf16, the common choice; ``amp-fp16`` — the same in fp16
  with a ``torch.amp.GradScaler`` (dynamic loss scaling: fp16 gradients underflow without it); ``bf16`` —
  weights, gradients and optimizer state in bf16 (``model.to(torch.bfloat16)``), no autocast;
* ``checkpointing`` (:data:`CHECKPOINTINGS`): ``none`` or ``blocks`` — every transformer block of the workload
  (``Workload.checkpoint_module_types``) runs through non-reentrant activation checkpointing
  (models/checkpointing.py);
* ``trainable`` (bench/dp/trainable.py): ``full``, ``bitfit``, ``attention`` or ``lora:r=R[:alpha=A]`` — which
  parameters train (DP fine-tuning); the rest are frozen (``requires_grad=False``).

Two steps, kept apart so that every device gets the same treatment:

1. :func:`prepare_model` (the case runner calls it once the model is built, on whatever device — meta
   included): freezes all but the trainable parameters (injecting LoRA adapters first), casts the weights for
   ``bf16`` and wraps the blocks for ``blocks``, in that order. It reads no tensor value.
   A mode the device or the workload cannot run is :class:`ModeUnsupported` (a result, not an error).
2. The DP methods run the forward under :meth:`TrainingMode.forward_context` and, for ``amp-fp16``, scale the
   loss by the step's GradScaler and take every per-sample norm of the *unscaled* gradients (the scale must
   never enter a clipping norm). :func:`check_prepared` makes sure a model handed to a method was prepared for
   the mode it is run with.

Devices: CPU runs every mode — torch 2.13's CPU autocast runs fp16 too, and its fp16 backward underflows like a
GPU's, so the GradScaler does there what it does on a GPU (CPU fp16 kernels are slow: timings say nothing about
a GPU). CUDA needs bf16 support for the bf16 modes. Meta runs every mode: ``bf16`` and ``blocks`` are dtypes and
recompute, and ``amp-*`` runs torch's own ``torch.autocast(device_type="meta")`` inside the meta case's
:func:`bench.dp.autocast_emulation.meta_autocast` session, which casts meta tensors above autograd by CUDA's op
lists, weight cache included (docs/meta-and-planner.md, "amp on meta"); ``amp-fp16``'s GradScaler there is
:class:`bench.dp.autocast_emulation.MetaGradScaler` (torch's, stepping without reading found-inf). Outside
such a session an amp forward on meta is a :class:`DPConfigError` naming it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from bench.results.record import CHECKPOINTINGS, PRECISIONS  # every record's mode is one of them
from models.checkpointing import CheckpointedBlocks, checkpoint_modules, checkpointed_modules

from .autocast_emulation import MetaGradScaler, meta_autocast_active
from .errors import DPConfigError, ModeUnsupported
from .trainable import Trainable, apply_trainable, parse_trainable, prepared_trainable

__all__ = [
    "CHECKPOINTINGS",
    "DEFAULT_MODE",
    "EQUIVALENCE_TOLERANCE",
    "PRECISIONS",
    "TrainingMode",
    "check_prepared",
    "prepare_model",
]


_AUTOCAST_DTYPES = {"amp-bf16": torch.bfloat16, "amp-fp16": torch.float16}
_PARAM_DTYPES = {"bf16": torch.bfloat16}
# How far a method's noise-free clipped sum in a precision may be from the fp32 per-sample loop's (relative error
# in global norm), and why: fp32 (checkpointed or not) runs the same fp32 kernels — 1e-5 leaves two orders of
# magnitude over the summation-order differences measured (≤ 3e-7); fp16 and bf16 round every autocast matmul's
# inputs and outputs (pure bf16 also the weights and gradients) — about 8 unit roundoffs, u = 2^-12 for fp16 and
# 2^-9 for bf16 (measured on the tiny workloads: 3.5e-4 … 7e-4 and 3e-3 … 7.6e-3). A layer counted twice or
# missed, or a loss scale in the clipping norm, is off by O(1). tests/dp/test_modes.py and `python -m bench.dp
# --modes` judge by it.
EQUIVALENCE_TOLERANCE = {"fp32": 1e-5, "amp-fp16": 2e-3, "amp-bf16": 1.6e-2, "bf16": 1.6e-2}

# The part a non-default value adds to a case id (fp32 and none add nothing: today's ids stay as they are).
_CHECKPOINTING_ID_PARTS = {"blocks": "ckpt"}


@dataclass(frozen=True)
class TrainingMode:
    """How a step trains: ``precision`` in :data:`PRECISIONS`, ``checkpointing`` in :data:`CHECKPOINTINGS`,
    ``trainable`` a :func:`~bench.dp.trainable.parse_trainable` word (kept in its canonical spelling)."""

    precision: str = "fp32"
    checkpointing: str = "none"
    trainable: str = "full"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DPConfigError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.checkpointing not in CHECKPOINTINGS:
            raise DPConfigError(f"unknown checkpointing {self.checkpointing!r}; valid: {', '.join(CHECKPOINTINGS)}")
        # "lora:r=8:alpha=8" and "lora:r=8" are one mode: equal, and one case id
        object.__setattr__(self, "trainable", parse_trainable(self.trainable).text)

    @property
    def fine_tuning(self) -> Trainable:
        """The parsed ``trainable``."""
        return parse_trainable(self.trainable)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the forward is autocast to, or None (no autocast)."""
        return _AUTOCAST_DTYPES.get(self.precision)

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the weights (and so of gradients and optimizer state)."""
        return _PARAM_DTYPES.get(self.precision, torch.float32)

    @property
    def loss_scaling(self) -> bool:
        """True when the step scales its loss with a GradScaler (amp-fp16)."""
        return self.precision == "amp-fp16"

    @property
    def label(self) -> str:
        """``fp32``, ``amp-bf16+blocks``, ...: the mode in one word (tables, messages)."""
        label = self.precision + ("" if self.checkpointing == "none" else f"+{self.checkpointing}")
        return label + ("" if self.trainable == "full" else f"+{self.trainable}")

    @property
    def id_parts(self) -> tuple[str, ...]:
        """What the mode adds to a case id: nothing for fp32 without checkpointing, full training, e.g.
        ("amp-bf16", "ckpt", "lora-r8")."""
        parts = () if self.precision == "fp32" else (self.precision,)
        parts += (_CHECKPOINTING_ID_PARTS[self.checkpointing],) if self.checkpointing != "none" else ()
        trainable = self.fine_tuning.id_part
        return parts + ((trainable,) if trainable else ())

    def forward_context(self, device: torch.device) -> AbstractContextManager:
        """The context the forward and the loss run in: ``torch.autocast`` for amp-*, else nothing."""
        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        if device.type == "meta" and not meta_autocast_active():
            raise DPConfigError(
                f"{self.precision} on meta autocasts inside bench.dp.autocast_emulation.meta_autocast() (a meta "
                "case enters it); enter it around the step"
            )
        return torch.autocast(device_type=device.type, dtype=dtype)

    def new_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A fresh GradScaler (torch's defaults: initial scale 2^16, growth ×2 every 2000 steps) for amp-fp16;
        on meta :class:`MetaGradScaler`, which steps without reading found-inf."""
        if not self.loss_scaling:
            return None
        return MetaGradScaler("meta") if device.type == "meta" else torch.amp.GradScaler(device.type)

    def initial_loss_scale(self, device: torch.device) -> torch.Tensor | None:
        """The loss scale a fresh GradScaler starts with, as a 0-d tensor (None without loss scaling): what the
        noise-free ``clipped_grad_sum`` runs its one backward with."""
        scaler = self.new_scaler(device)
        return None if scaler is None else scaler.scale(torch.ones((), device=device))


DEFAULT_MODE = TrainingMode()


def _device_problem(mode: TrainingMode, device: torch.device) -> str | None:
    bf16 = torch.bfloat16 in (mode.autocast_dtype, mode.param_dtype)
    if device.type == "cuda" and bf16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{mode.precision} on {device}: this GPU has no native bf16 support"
    return None


def prepare_model(
    model: nn.Module, workload, mode: TrainingMode, device: torch.device | str
) -> CheckpointedBlocks | None:
    """Prepare ``model`` (just built by ``workload``, on ``device``) in place for ``mode``: all but the trainable
    parameters frozen (LoRA adapters injected), weights to the mode's dtype, the workload's blocks checkpointed.
    Returns the checkpointing handle (``remove()`` unwraps), or None.

    Reads no tensor value, so it works on meta. :class:`ModeUnsupported` when the device cannot run the mode
    or the workload names no module to checkpoint (or none of its type is in the model), or no parameter to
    fine-tune (bench/dp/trainable.py)."""
    device = torch.device(device)
    problem = _device_problem(mode, device)
    if problem:
        raise ModeUnsupported(problem)
    # First: the adapters peft injects must be cast and checkpointed with the rest, and the block types found.
    apply_trainable(model, workload, mode.fine_tuning)
    if mode.param_dtype != torch.float32:
        model.to(mode.param_dtype)
    if mode.checkpointing == "none":
        return None
    name = getattr(workload, "name", "the workload")
    types = tuple(getattr(workload, "checkpoint_module_types", ()))
    if not types:
        raise ModeUnsupported(
            f"checkpointing blocks: workload {name!r} names no module types to checkpoint",
            "set Workload.checkpoint_module_types to its block class(es) (docs/workloads.md, 'Bring your own model')",
        )
    handle = checkpoint_modules(model, types)
    if not handle.modules:
        kinds = ", ".join(t.__name__ for t in types)
        raise ModeUnsupported(
            f"checkpointing blocks: workload {name!r}: its model has no module of type {kinds}",
            "Workload.checkpoint_module_types must name classes the model is built from",
        )
    return handle


def check_prepared(model: nn.Module, mode: TrainingMode) -> None:
    """DPConfigError (one line, naming the fix) unless ``model`` was prepared for ``mode``: a step run in one
    mode on a model prepared for another would measure something else than it says."""
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
    # A 16-bit precision needs every trainable weight in its dtype; the others any weights but 16-bit ones (a
    # float64 model is the user's choice, a bf16 one was prepared for another mode).
    wrong = dtypes - {mode.param_dtype} if mode.param_dtype.itemsize == 2 else {d for d in dtypes if d.itemsize == 2}
    if wrong:
        found = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise DPConfigError(
            f"precision {mode.precision} trains {str(mode.param_dtype).replace('torch.', '')} weights but the "
            f"model's are {found}; prepare it with bench.dp.prepare_model(model, workload, mode, device)"
        )
    if prepared_trainable(model) != mode.trainable:
        raise DPConfigError(
            f"trainable {mode.trainable!r} but the model was prepared for {prepared_trainable(model)!r}; prepare "
            "it with bench.dp.prepare_model(model, workload, mode, device)"
        )
    checkpointed = bool(checkpointed_modules(model))
    if checkpointed != (mode.checkpointing != "none"):
        state = "is checkpointed" if checkpointed else "is not checkpointed"
        raise DPConfigError(
            f"checkpointing {mode.checkpointing!r} but the model {state}; prepare it with "
            "bench.dp.prepare_model(model, workload, mode, device)"
        )
