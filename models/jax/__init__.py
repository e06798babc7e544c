"""JAX (flax) ports of the built-in workloads: the same DiT and GPT-2, weights imported from the PyTorch model.

:func:`port_for` gives a workload's :class:`JaxPort` — the flax module built from the workload's own config,
its per-sample loss (the same definition as the PyTorch workload's) and the shapes of its variables — or raises
:class:`NoJaxPort` for a workload with none (a bring-your-own PyTorch model). Importing this package needs jax,
flax and optax (``pip install 'dpmem[jax]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from torch import nn as torch_nn

from models.diffusion import epsilon_mse_per_sample as torch_epsilon_mse
from models.dit import DiT, PlainDiT, UnconditionalDiT
from models.gpt import GPT
from models.gpt import next_token_ce_per_sample as torch_next_token_ce
from models.workload import WorkloadError

from .convert import FROZEN, TRAINED, WeightImportError, export_to_torch, import_from_torch
from .dit import FlaxDiT, epsilon_mse_per_sample
from .gpt import FlaxGPT, next_token_ce_per_sample

__all__ = ["FROZEN", "TRAINED", "JaxPort", "NoJaxPort", "WeightImportError", "export_to_torch", "port_for"]


class NoJaxPort(WorkloadError):
    """The workload has no JAX port (only the built-in DiT and GPT-2 have one)."""


@dataclass(frozen=True)
class JaxPort:
    """A workload in flax: ``module.apply(variables, *inputs)`` is the forward, ``loss_per_sample(output,
    target)`` the per-sample loss ``[B]``; ``example_inputs`` are (B=1) stand-ins ``init`` traces with."""

    module: nn.Module
    loss_per_sample: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    example_inputs: tuple[jax.ShapeDtypeStruct, ...]

    def shapes(self) -> dict:
        """{collection: tree of ShapeDtypeStruct}: ``init`` traced by ``jax.eval_shape``, nothing allocated."""
        return dict(jax.eval_shape(lambda *inputs: self.module.init(jax.random.key(0), *inputs), *self.example_inputs))

    def parameter_counts(self) -> tuple[int, int]:
        """(total, trainable), counted as :func:`models.parameter_counts` counts the PyTorch model."""
        shapes = self.shapes()
        counts = {c: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(t)) for c, t in shapes.items()}
        return sum(counts.values()), counts.get(TRAINED, 0)

    def import_weights(self, model: torch_nn.Module) -> dict:
        """The variables filled from ``model``'s parameters (:func:`models.jax.convert.import_from_torch`)."""
        return import_from_torch(self.shapes(), model)


def port_for(workload, model: torch_nn.Module) -> JaxPort:
    """The JAX port of ``workload`` (whose PyTorch ``model`` carries the config), or :class:`NoJaxPort`."""
    config = getattr(model, "config", None)
    if isinstance(model, (DiT, UnconditionalDiT, PlainDiT)) and workload.loss_fn is torch_epsilon_mse:
        S, C = config.input_size, config.in_channels
        inputs = [jax.ShapeDtypeStruct((1, C, S, S), jnp.float32)]
        if not config.plain:
            inputs.append(jax.ShapeDtypeStruct((1,), jnp.int32))
        if config.class_conditional:
            inputs.append(jax.ShapeDtypeStruct((1,), jnp.int32))
        return JaxPort(FlaxDiT(config), epsilon_mse_per_sample, tuple(inputs))
    if isinstance(model, GPT) and workload.loss_fn is torch_next_token_ce:
        example = (jax.ShapeDtypeStruct((1, workload.tokens_per_sample), jnp.int32),)
        return JaxPort(FlaxGPT(config), next_token_ce_per_sample, example)
    raise NoJaxPort(
        f"workload {workload.name!r} has no JAX port: only the built-in DiT and GPT-2 workloads are ported to flax "
        f"(its model is {type(model).__name__}, its loss {getattr(workload.loss_fn, '__name__', workload.loss_fn)})"
    )
