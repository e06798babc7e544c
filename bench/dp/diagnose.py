"""One-line diagnoses of why a DP method failed on a model, from the model's structure and the library's error.

The rules encode what was measured with Opacus 1.6 (see the README's compatibility matrix):

* **Opacus issue #777** (hooks, functorch, ghost): Opacus computes per-sample gradients layer by layer. A module
  that *directly* owns a trainable ``nn.Parameter`` and has no registered grad sampler is replayed as a whole
  through functorch with only its first forward input — for a top-level DiT that owns a learnable position
  embedding this is ``DiT.forward(x)``, hence ``TypeError: missing ... 't' and 'y'``. Multi-input forwards are
  not the problem; a parameter in the wrong place is.
* **ghost + a parameter used twice**: Opacus' ghost norm is computed per layer call, so a parameter used by two
  calls needs cross terms it does not compute; Opacus refuses with "Parameter tying is not supported" whether
  the parameter is tied between two layers (GPT-2's wte/lm_head) or one layer is *called twice* per forward
  (diffusers' DiT runs block 0's timestep/label embedder again for the final layer). The diagnosis counts the
  calls of every layer in one probe forward to tell the two apart.
* **ew (ExpandedWeights)**: only the weights of linear/conv/embedding/norm calls can be expanded, and an
  embedding input needs a batch dimension *and* a second dimension.
* **training modes** (bench/dp/modes.py): under autocast a layer's output gradient is 16-bit while its input
  can be fp32, and a library that multiplies the two without casting fails with a dtype mismatch (ew: its
  per-sample rules run in the backward, outside autocast) — the diagnosis names the two dtypes and the rule's
  file; activation checkpointing works through saved-tensor hooks, which torch.func's transforms refuse, and
  ExpandedWeights fails torch's recompute check (``CheckpointError``).
"""

from __future__ import annotations

import re
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

from .errors import is_out_of_memory

FIX_777 = (
    "move the parameter into a submodule with a grad sampler, e.g. an nn.Embedding/nn.Linear, "
    "or wrap it in a module with a registered grad sampler"
)

# Modules whose weights torch's ExpandedWeights can expand (torch/nn/utils/_expanded_weights/).
_EW_SUPPORTED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def _module_label(model: nn.Module, path: str) -> str:
    return f"'{path}'" if path else f"top-level {type(model).__name__}"


def params_without_grad_sampler(model: nn.Module) -> list[tuple[str, str]]:
    """(module path, parameter name) of trainable parameters owned directly by a module with no Opacus grad
    sampler — the modules Opacus replays whole through functorch with only their first input (#777)."""
    from opacus.grad_sample import GradSampleModule

    samplers = GradSampleModule.GRAD_SAMPLERS
    return [
        (path, pname)
        for path, module in model.named_modules()
        if type(module) not in samplers
        for pname, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of ``module.param`` names that are one shared trainable tensor (e.g. GPT-2's wte / lm_head)."""
    owners: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if p.requires_grad:
                owners[id(p)].append(f"{path}.{pname}" if path else pname)
    return [sorted(set(names)) for names in owners.values() if len(set(names)) > 1]


def repeated_layer_calls(workload, model: nn.Module) -> list[tuple[str, str, int]]:
    """(module path, type name, calls) of every layer with a ghost-norm sampler and a trainable parameter of its
    own that one forward calls more than once (a probe forward of one sample, no gradients, global RNG kept)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    samplers = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    calls: Counter[str] = Counter()
    handles = [
        module.register_forward_pre_hook(lambda _module, _args, path=path: calls.update([path]))
        for path, module in model.named_modules()
        if type(module) in samplers and any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(*workload.make_batch(1, device=device).inputs)
    finally:
        for handle in handles:
            handle.remove()
    kinds = {path: type(module).__name__ for path, module in model.named_modules()}
    return [(path, kinds[path], n) for path, n in calls.items() if n > 1]


def _parameter_used_twice(workload, model: nn.Module) -> str:
    """Why Opacus' ghost clipping saw one parameter in two layer calls: a layer called twice, or a tie."""
    name = getattr(workload, "name", "the workload")
    try:
        repeated = repeated_layer_calls(workload, model)
    except Exception as exc:  # the probe is only for the wording; running out of memory is never hidden
        if is_out_of_memory(exc):
            raise
        repeated = []
    if repeated:
        path, kind, n = repeated[0]
        more = f" (and {len(repeated) - 1} more layer(s))" if len(repeated) > 1 else ""
        return (
            f"{name} calls layer '{path}' ({kind}) {n} times per forward{more}: Opacus' ghost clipping computes one "
            f"gradient norm per layer call and cannot add the cross terms of a layer used twice (its message says "
            f"'tying'); call each layer once per forward, or use opacus-hooks / Book-Keeping"
        )
    groups = tied_parameters(model)
    tied = " = ".join(groups[0]) if groups else "a shared parameter"
    return (
        f"{name} ties {tied}: Opacus' ghost clipping computes one gradient norm per layer and cannot add "
        f"the cross term of a parameter used by two layers; untie it (e.g. tie_weights=False) or use "
        f"opacus-hooks / Book-Keeping"
    )


def _params_outside_ew_layers(model: nn.Module) -> list[str]:
    return [
        f"{path}.{pname}" if path else pname
        for path, module in model.named_modules()
        if not isinstance(module, _EW_SUPPORTED)
        for pname, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


_DTYPE_MISMATCH = re.compile(
    r"(?:same dtype, but got:?|expected scalar type|expected both inputs to have same dtype, but found)\s*"
    r"(?:c10::)?(\w+)(?: != | but found | and )(?:c10::)?(\w+)",
    re.IGNORECASE,
)


_DTYPE_NAMES = {"bfloat16": "bf16", "half": "fp16", "float": "fp32", "float16": "fp16", "float32": "fp32"}


def _library_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame of ``exc`` inside torch or opacus, as ``package/…/file.py``."""
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    for filename in reversed(frames):
        parts = Path(filename).parts
        for package in ("opacus", "torch"):
            if package in parts:
                return "/".join(parts[len(parts) - 1 - parts[::-1].index(package) :])
    return None


def _mode_diagnosis(method: str, mode, exc: BaseException) -> str | None:
    """Why ``method`` failed in a training mode, for the failures the modes cause; None for anything else."""
    message = str(exc)
    precision = getattr(mode, "precision", "fp32")
    mismatch = _DTYPE_MISMATCH.search(message)
    if mismatch and precision != "fp32":
        a, b = (_DTYPE_NAMES.get(t.lower(), t) for t in mismatch.groups())
        where = _library_frame(exc)
        return (
            f"under {precision} a {a} and a {b} tensor meet in one product"
            + (f" in {where}" if where else "")
            + f": {method} multiplies a layer's output gradient (autocast's dtype) with its kept input (fp32) "
            "without casting — it has no autocast support; use opacus-hooks/functorch/ghost or bk"
        )
    if "saved tensor hooks" in message:
        return (
            "activation checkpointing (non-reentrant) runs through saved-tensor hooks, which torch.func's grad "
            "transform does not support: torch-func cannot train a checkpointed model; use bk or microbatch"
        )
    if type(exc).__name__ == "CheckpointError":
        return (
            f"{method}'s autograd functions save more tensors when torch's checkpoint recomputes a block in the "
            "backward than in its forward, which the checkpoint refuses: it cannot train a checkpointed model; "
            "use opacus-hooks/functorch/ghost or bk"
        )
    return None


def diagnose(method: str, workload, model: nn.Module, exc: BaseException, mode=None) -> str:
    """One line saying why ``method`` failed on ``model`` with ``exc`` (in training ``mode``, if given) and how to
    fix it."""
    message = str(exc)
    name = getattr(workload, "name", "the workload")
    for_mode = _mode_diagnosis(method, mode, exc)
    if for_mode is not None:
        return for_mode
    if method.startswith("opacus") and method != "opacus-ew":
        if "Parameter tying is not supported" in message:
            return _parameter_used_twice(workload, model)
        if "view size is not compatible" in message:
            return (
                "Opacus' ghost nn.Embedding norm sampler calls input_ids.view(-1, 1), which fails on a non-contiguous "
                "(e.g. expanded) index tensor; pass contiguous indices (.contiguous())"
            )
        offenders = params_without_grad_sampler(model)
        if offenders:
            path, pname = offenders[0]
            more = f" (and {len(offenders) - 1} more)" if len(offenders) > 1 else ""
            return (
                f"Opacus issue #777: {_module_label(model, path)} directly owns trainable parameter '{pname}'{more} "
                f"and has no grad sampler, so Opacus replays it through functorch with only its first input; "
                f"fix: {FIX_777}"
            )
        if "buffers" in message:
            return "a trainable layer holds buffers (e.g. BatchNorm), which Opacus rejects; use GroupNorm/LayerNorm"
    if method == "opacus-ew":
        if "1D tensor" in message or "batch size" in message:
            return (
                "ExpandedWeights needs every nn.Embedding input to have a batch dim and a second dim; "
                "look up a (B, 1) index tensor (y.unsqueeze(1)) instead of (B,)"
            )
        if "cannot handle function" in message or "Expanded Weights" in message:
            outside = _params_outside_ew_layers(model)
            where = f" (here: {', '.join(outside[:3])})" if outside else ""
            return (
                f"ExpandedWeights expands only the weights of linear/conv/embedding/norm calls; a trainable parameter "
                f"used in any other op{where} is unsupported; {FIX_777}"
            )
    if method == "torch-func":
        return "torch.func.vmap cannot batch an operation in this forward (data-dependent control flow, .item(), ...)"
    return f"{method} raised this while running {name}'s forward/backward; see the library's error"
