"""The flax ports (models/jax) are the PyTorch workloads: same parameter counts at every size, the same outputs
and per-sample losses from imported weights on every tiny workload, and a one-line error for a weight that does
not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("jax", reason="the JAX ports need the extra: pip install 'dpmem[jax]'")

import jax.numpy as jnp

import models
from models.catalog import TINY_WORKLOADS
from models.jax import NoJaxPort, WeightImportError, port_for

BATCH = 4
# fp32 forward of a 2-block model in two frameworks: kernels sum in different orders
FORWARD_TOL = 1e-5
POS_VARIANTS = {"learnable_pos_embed": True}, {"learnable_pos_embed": True, "pos_embed_in_submodule": True}


@pytest.mark.parametrize("name", models.list_workloads())
def test_every_size_has_the_pytorch_parameter_counts(name):
    workload = models.get_workload(name)
    model = workload.build_model("meta")
    assert port_for(workload, model).parameter_counts() == models.parameter_counts(model)


def _outputs(workload):
    model = workload.build_model()
    batch = workload.make_batch(BATCH, generator=torch.Generator().manual_seed(1))
    port = port_for(workload, model)
    variables = port.import_weights(model)
    out = port.module.apply(variables, *(jnp.asarray(x.numpy()) for x in batch.inputs))
    losses = port.loss_per_sample(out, jnp.asarray(batch.target.numpy()))
    with torch.no_grad():
        ref = model(*batch.inputs)
        ref_losses = workload.loss_per_sample(ref, batch.target)
    return np.asarray(out), ref.numpy(), np.asarray(losses), ref_losses.numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


@pytest.mark.parametrize("name", TINY_WORKLOADS)
def test_forward_and_per_sample_losses_equal_torch(name):
    out, ref, losses, ref_losses = _outputs(models.get_workload(name))
    assert out.shape == ref.shape and losses.shape == (BATCH,)
    assert _rel(out, ref) <= FORWARD_TOL
    assert _rel(losses, ref_losses) <= FORWARD_TOL


@pytest.mark.parametrize("overrides", POS_VARIANTS)
def test_the_learnable_position_tables_import(overrides):
    workload = models.get_workload("dit-tiny-cond", **overrides)
    model = workload.build_model()
    total, trainable = port_for(workload, model).parameter_counts()
    assert (total, trainable) == models.parameter_counts(model) and total == trainable
    out, ref, losses, ref_losses = _outputs(workload)
    assert _rel(out, ref) <= FORWARD_TOL and _rel(losses, ref_losses) <= FORWARD_TOL


def test_a_mismatched_weight_is_a_one_line_error_naming_it():
    workload = models.get_workload("gpt-tiny")
    model = workload.build_model()
    port = port_for(workload, model)
    other = models.get_workload("gpt-tiny", n_embd=32).build_model()
    with pytest.raises(
        WeightImportError, match=r"'h\.0\.attn\.c_attn\.bias' has shape \(96,\), the JAX port expects \(192,\)"
    ) as info:
        port.import_weights(other)
    assert "\n" not in str(info.value)
    untied = models.get_workload("gpt-tiny-untied").build_model()
    with pytest.raises(WeightImportError, match=r"PyTorch parameter 'lm_head\.weight' has no counterpart"):
        port.import_weights(untied)
    with pytest.raises(WeightImportError, match=r"JAX port parameter 'lm_head\.weight' is missing"):
        port_for(models.get_workload("gpt-tiny-untied"), untied).import_weights(model)


def test_a_frozen_table_must_stay_frozen():
    workload = models.get_workload("dit-tiny-cond")
    model = workload.build_model()
    model.pos_embed.requires_grad_(True)
    with pytest.raises(WeightImportError, match=r"'pos_embed' is trainable but the JAX port has it in 'frozen'"):
        port_for(workload, model).import_weights(model)


def test_a_bring_your_own_model_has_no_port():
    workload = models.Workload("byo", lambda: torch.nn.Linear(3, 1), lambda b, g: None, lambda o, t: o)
    with pytest.raises(NoJaxPort, match=r"'byo' has no JAX port.*its model is Linear"):
        port_for(workload, workload.build_model())
