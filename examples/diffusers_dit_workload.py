"""Bring your own model: Hugging Face diffusers' ``DiTTransformer2DModel`` as a dpmem workload.

Load it with ``pytest bench/ --workload-module examples.diffusers_dit_workload`` or
``models.load_workload_module("examples.diffusers_dit_workload")``; it registers

* ``diffusers-dit-tiny`` — 2 blocks of width 32 on a 4×8×8 latent (a CPU step takes milliseconds);
* ``diffusers-dit-xl-2`` — the DiT-XL/2 shape at 256 px (28 blocks, 16 heads × 72, latent 4×32×32).

A workload is three functions: build the model, draw a batch, score it per sample. Here the batch factory
and the loss are dpmem's own DiT ones (models.diffusion), so only the model is new. Two things make a
third-party model fit:

1. ``model(*batch.inputs)`` must return a tensor: diffusers returns an output object, so a thin wrapper
   returns ``.sample``;
2. all randomness of a step must come from the batch: diffusers' label embedders drop labels to the null
   class *inside* the model in training mode (global RNG); the wrapper switches that off because
   ``make_batch`` already draws the label drop (null class = ``num_classes``, the table's extra row).

Model construction happens inside ``build_model`` only, so registering costs nothing and
``python -m models --workload-module examples.diffusers_dit_workload`` counts parameters on the meta device.
Note that diffusers' DiT gives every block its own timestep and label embedder, so DiT-XL/2 has
749,826,464 parameters there against 675,129,632 in the paper's layout (measured with diffusers 0.31).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from diffusers import DiTTransformer2DModel  # not a dpmem dependency: install it to use this recipe
from torch import Tensor, nn

import models
from models.diffusion import epsilon_mse_per_sample, make_dit_batch


class DiffusersDiT(nn.Module):
    """``forward(x_t, t, y) -> ε/σ prediction (B, out_channels, H, W)`` around a diffusers DiT."""

    def __init__(self, **config: Any):
        super().__init__()
        self.transformer = DiTTransformer2DModel(**config)
        # Label dropout is drawn by make_batch; turn off the model's own (random) label dropout. Its label
        # tables keep their null row (index num_classes), which the batch's dropped labels use.
        for module in self.transformer.modules():
            if hasattr(module, "embedding_table") and hasattr(module, "dropout_prob"):
                module.dropout_prob = 0.0

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.transformer(hidden_states=x_t, timestep=t, class_labels=y).sample


def diffusers_dit_workload(name: str, *, class_dropout_prob: float = 0.1, **config: Any) -> models.Workload:
    """A Workload for a diffusers DiT built from ``config`` (DiTTransformer2DModel's keyword arguments)."""
    in_channels, size = config.get("in_channels", 4), config["sample_size"]
    num_classes = config["num_embeds_ada_norm"]
    patch = config["patch_size"]
    return models.Workload(
        name=name,
        model_fn=partial(DiffusersDiT, **config),
        batch_fn=partial(
            make_dit_batch,
            in_channels=in_channels,
            input_size=size,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
        ),
        loss_fn=epsilon_mse_per_sample,
        family="dit",
        tokens_per_sample=(size // patch) ** 2,
        input_names=("x_t", "t", "y"),
        info={"config": "diffusers DiT", "source": "diffusers.DiTTransformer2DModel", **config},
    )


TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
XL_2 = dict(
    TINY, num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, num_embeds_ada_norm=1000
)

# replace=True: importing the module again (a second load) re-registers instead of failing.
models.register_workload(diffusers_dit_workload("diffusers-dit-tiny", **TINY), replace=True)
models.register_workload(diffusers_dit_workload("diffusers-dit-xl-2", **XL_2), replace=True)
