"""Which parameters a step trains: the ``--trainable`` part of a training mode (DP fine-tuning).

A :class:`Trainable` is parsed from one word (:func:`parse_trainable`):

* ``full`` — every parameter (the default; the model is left as built);
* ``bitfit`` — the bias terms only (BiTFiT): every parameter whose own name is ``bias`` — Linear, Conv and
  affine LayerNorm biases (DiT's adaLN LayerNorms are non-affine: they have none);
* ``attention`` — the attention projections only: every parameter of the modules the workload names in
  ``Workload.attention_module_names`` (fnmatch patterns over module names; qkv and out for DiT and GPT);
* ``lora:r=R[:alpha=A]`` — LoRA adapters on those same modules, the base frozen, built as users build them:
  ``peft.inject_adapter_in_model(LoraConfig(r=R, lora_alpha=A, lora_dropout=0, target_modules=...), model)``.
  Each adapted Linear ``W`` becomes ``W x + (A/R)·B(A x)`` with ``lora_A`` (R × in) and ``lora_B`` (out × R) plain
  ``nn.Linear`` children, so every per-sample-gradient library sees Linears it knows. Dropout 0: the workload
  contract forbids randomness in the forward. Default alpha = R (scaling 1, the scaling of peft's own defaults,
  r=8 and lora_alpha=8): memory does not depend on it, and a scaling of 1 keeps the adapter's gradients at the
  size of an unscaled Linear's.

:func:`apply_trainable` freezes (``requires_grad=False``) everything else; it reads no tensor value, so it runs on
meta too (peft initialises ``lora_A`` with Kaiming-uniform and ``lora_B`` with zeros: on meta, no-ops). The
adapters' initial values come from a generator seeded by the workload's seed, so two builds of a case agree.

What a model cannot do is :class:`ModeUnsupported` (a result): no bias, no attention names, a pattern matching
no module, peft missing (``pip install 'dpmem[lora]'``) or refusing a module type.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import DPConfigError, ModeUnsupported

__all__ = ["TRAINABLE_KINDS", "Trainable", "apply_trainable", "parse_trainable", "prepared_trainable"]

TRAINABLE_KINDS = ("full", "bitfit", "attention", "lora")
TRAINABLE_USAGE = "full, bitfit, attention or lora:r=R[:alpha=A] (R an integer >= 1, A a number > 0)"
# The attribute prepare_model leaves on a model: which trainable mode it was prepared for (check_prepared reads it).
PREPARED_ATTR = "_dpmem_trainable"
_LORA = re.compile(r"lora:r=(?P<rank>\d+)(?::alpha=(?P<alpha>[0-9]*\.?[0-9]+(?:e[+-]?\d+)?))?")


@dataclass(frozen=True)
class Trainable:
    """A parsed ``--trainable`` value: ``kind`` in :data:`TRAINABLE_KINDS`; for lora its ``rank`` and ``alpha``."""

    kind: str = "full"
    rank: int | None = None
    alpha: float | None = None

    @property
    def text(self) -> str:
        """The canonical spelling (what records carry): ``lora:r=8`` when alpha = r, else ``lora:r=8:alpha=16``."""
        if self.kind != "lora":
            return self.kind
        return f"lora:r={self.rank}" + ("" if self.alpha == self.rank else f":alpha={self.alpha:g}")

    @property
    def id_part(self) -> str | None:
        """What the mode adds to a case id: None for full, ``bitfit``, ``attention``, ``lora-r8``, ``lora-r8-a16``."""
        if self.kind == "full":
            return None
        return self.text.replace(":r=", "-r").replace(":alpha=", "-a")


def parse_trainable(text: str) -> Trainable:
    """The :class:`Trainable` ``text`` names; a one-line DPConfigError naming the valid forms otherwise."""
    if not isinstance(text, str):
        raise DPConfigError(f"trainable must be a string ({TRAINABLE_USAGE}), got {text!r}")
    if text in ("full", "bitfit", "attention"):
        return Trainable(text)
    match = _LORA.fullmatch(text)
    if match is None:
        raise DPConfigError(f"unknown trainable {text!r}; valid: {TRAINABLE_USAGE}")
    rank = int(match["rank"])
    alpha = float(rank if match["alpha"] is None else match["alpha"])
    if rank < 1 or alpha <= 0:
        raise DPConfigError(f"trainable {text!r}: the rank must be >= 1 and alpha > 0 ({TRAINABLE_USAGE})")
    return Trainable("lora", rank, alpha)


def prepared_trainable(model: nn.Module) -> str:
    """The trainable mode ``model`` was prepared for (``full`` for a model prepare_model never froze)."""
    return getattr(model, PREPARED_ATTR, "full")


def _attention_modules(model: nn.Module, workload) -> list[str]:
    name = getattr(workload, "name", "the workload")
    patterns = tuple(getattr(workload, "attention_module_names", ()))
    if not patterns:
        raise ModeUnsupported(
            f"workload {name!r} names no attention modules",
            "set Workload.attention_module_names to fnmatch patterns of its attention projections' module names "
            "(docs/workloads.md, 'Bring your own model')",
        )
    names = [n for n, _ in model.named_modules() if n]
    matched: list[str] = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ModeUnsupported(
                f"workload {name!r}: attention pattern {pattern!r} matches no module of its model",
                "Workload.attention_module_names must match names from model.named_modules()",
            )
        matched += [n for n in hits if n not in matched]
    return matched


def _freeze_all_but(model: nn.Module, keep) -> None:
    for pname, p in model.named_parameters():
        p.requires_grad_(keep(pname))


def _inject_lora(model: nn.Module, targets: list[str], spec: Trainable, seed: int) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ModeUnsupported(
            f"--trainable {spec.text}: peft is not installed ({type(exc).__name__}: {exc})",
            "pip install 'dpmem[lora]'",
        ) from exc
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    # lora_A's Kaiming init draws from the global generator: seeded, so every build of a case gets the same values.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model)
        except (ValueError, TypeError) as exc:  # e.g. a target module type peft has no LoRA layer for
            raise ModeUnsupported(
                f"--trainable {spec.text}: peft refused the model ({type(exc).__name__}: {exc})",
                "Workload.attention_module_names must name Linear (or Conv/Embedding) modules",
            ) from exc
    # peft freezes the base itself (bias="none": only lora_* train); make it the stated rule, not an assumption.
    _freeze_all_but(model, lambda pname: ".lora_A." in pname or ".lora_B." in pname)


def apply_trainable(model: nn.Module, workload, spec: Trainable) -> None:
    """Freeze ``model`` (just built by ``workload``) in place to train only ``spec``'s parameters; for lora inject
    the adapters first. Reads no tensor value. :class:`ModeUnsupported` for what the model cannot do."""
    if spec.kind == "full" or prepared_trainable(model) == spec.text:  # the meta template comes prepared
        return
    if prepared_trainable(model) != "full":
        raise DPConfigError(f"the model was already prepared for --trainable {prepared_trainable(model)}")
    name = getattr(workload, "name", "the workload")
    if spec.kind == "bitfit":
        if not any(pname.rpartition(".")[2] == "bias" for pname, _ in model.named_parameters()):
            raise ModeUnsupported(f"bitfit: workload {name!r}: its model has no bias parameter", "train it full")
        _freeze_all_but(model, lambda pname: pname.rpartition(".")[2] == "bias")
    elif spec.kind == "attention":
        targets = _attention_modules(model, workload)
        owned = {f"{t}.{pname}" for t in targets for pname, _ in model.get_submodule(t).named_parameters()}
        if not owned:
            raise ModeUnsupported(
                f"attention: workload {name!r}: its attention modules {targets} hold no parameter",
                "Workload.attention_module_names must name the projections (Linear modules)",
            )
        _freeze_all_but(model, owned.__contains__)
    else:
        _inject_lora(model, _attention_modules(model, workload), spec, getattr(workload, "seed", 0))
    setattr(model, PREPARED_ATTR, spec.text)
