"""PyTorch weights into a flax port and flax gradients back under the PyTorch names.

Naming rule (the ports in this package keep it): a flax path ``blocks_0/attn/qkv/kernel`` is the PyTorch
parameter ``blocks.0.attn.qkv.weight`` — a list index ``name_i`` of the list attributes in :data:`_LIST_NAMES`
becomes ``name.i`` and the leaf is renamed (kernel, embedding, scale -> weight). Layouts: a Dense kernel is
the transposed Linear weight (in, out) = (out, in)ᵀ; a Conv kernel (kh, kw, in, out) is the Conv2d weight
(out, in, kh, kw) permuted; embeddings, LayerNorm scales, biases and the position table are as they are.

The ``params`` collection is what trains (PyTorch's ``requires_grad=True`` parameters); the ``frozen`` one holds
PyTorch's frozen parameters (DiT's fixed position table). Both must match the PyTorch model one to one: a
missing, extra or mis-shaped weight is a one-line :class:`WeightImportError` naming the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

__all__ = ["TRAINED", "WeightImportError", "export_to_torch", "import_from_torch", "torch_layout", "torch_name"]

TRAINED, FROZEN = "params", "frozen"
_LIST_NAMES = re.compile(r"^(blocks|h|mlp|adaLN_modulation)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


class WeightImportError(ValueError):
    """The PyTorch weights do not fit the flax port; one line naming the parameter."""


@dataclass(frozen=True)
class _Leaf:
    collection: str
    path: tuple[str, ...]
    shape: tuple[int, ...]


def torch_name(path: tuple[str, ...]) -> str:
    """The PyTorch parameter name of a flax leaf path (see the module docstring)."""
    parts = [_LIST_NAMES.sub(r"\1.\2", part) for part in path[:-1]]
    return ".".join([*parts, _LEAF_NAMES.get(path[-1], path[-1])])


def torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """A flax leaf's value in its PyTorch parameter's layout."""
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    if path[-1] == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    return value


def _flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    if path[-1] == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    return value


def _leaves(template: Mapping) -> dict[str, _Leaf]:
    leaves = {}
    for collection, tree in template.items():
        for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
            leaves[torch_name(path)] = _Leaf(collection, path, tuple(leaf.shape))
    return leaves


def import_from_torch(template: Mapping, model: torch.nn.Module) -> dict:
    """The port's variables ({collection: tree} of fp32 arrays) filled from ``model``'s parameters.

    ``template`` is the port's ``jax.eval_shape`` of ``init`` (shapes only). A trainable PyTorch parameter must
    land in ``params`` and a frozen one in ``frozen``."""
    leaves = _leaves(template)
    named = dict(model.named_parameters())
    extra = sorted(set(named) - set(leaves))
    if extra:
        raise WeightImportError(f"PyTorch parameter {extra[0]!r} has no counterpart in the JAX port")
    missing = sorted(set(leaves) - set(named))
    if missing:
        raise WeightImportError(f"JAX port parameter {missing[0]!r} is missing from the PyTorch model")
    flat: dict[str, dict] = {collection: {} for collection in template}
    for name, leaf in leaves.items():
        p = named[name]
        wanted = FROZEN if not p.requires_grad else TRAINED
        if leaf.collection != wanted:
            state = "trainable" if p.requires_grad else "frozen"
            raise WeightImportError(
                f"PyTorch parameter {name!r} is {state} but the JAX port has it in {leaf.collection!r}"
            )
        value = _flax_layout(leaf.path, p.detach().to("cpu", torch.float32).numpy())
        if tuple(value.shape) != leaf.shape:
            raise WeightImportError(
                f"PyTorch parameter {name!r} has shape {tuple(p.shape)}, the JAX port expects {leaf.shape} "
                "in its layout"
            )
        flat[leaf.collection][leaf.path] = jnp.asarray(value)
    return {collection: traverse_util.unflatten_dict(tree) for collection, tree in flat.items()}


def export_to_torch(tree: Mapping) -> dict[str, torch.Tensor]:
    """A ``params``-shaped tree (gradients, clipped sums) as fp32 torch tensors under the PyTorch names."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
        value = torch_layout(path, np.asarray(jax.device_get(leaf), dtype=np.float32))
        out[torch_name(path)] = torch.from_numpy(np.array(value, dtype=np.float32, order="C"))
    return out
