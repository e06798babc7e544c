"""The plain DiT proxy (dit-*-plain): no timestep, labels or adaLN; same patchify, position embedding and widths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import get_workload
from models.dit import PlainDiT, sincos_pos_embed_2d


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def test_xl2_plain_parameter_count_from_layer_shapes():
    D, p, c_in, c_out, depth, tokens = 1152, 2, 4, 8, 28, (32 // 2) ** 2
    linear = lambda d_in, d_out: d_in * d_out + d_out  # weight + bias
    layer_norm = 2 * D  # affine: weight + bias
    patchify = D * c_in * p * p + D  # Conv2d(c_in, D, kernel p, stride p)
    pos_embed = tokens * D  # fixed sin-cos table, frozen
    block = layer_norm + linear(D, 3 * D) + linear(D, D) + layer_norm + linear(D, 4 * D) + linear(4 * D, D)
    final = layer_norm + linear(D, p * p * c_out)
    model = get_workload("dit-xl-2-plain").build_model(device="meta")
    assert n_params(model) == patchify + pos_embed + depth * block + final
    assert n_params(model, trainable_only=True) == patchify + depth * block + final


def test_plain_is_the_conditional_dit_minus_its_conditioning():
    # Same patchify, position embedding, attention and MLP; the DiT's timestep MLP, label table and adaLN
    # Linears are gone, and the blocks' and final layer's LayerNorms gain an affine weight and bias.
    D, depth = 1152, 28
    cond = get_workload("dit-xl-2-cond").build_model(device="meta")
    plain = get_workload("dit-xl-2-plain").build_model(device="meta")
    conditioning = (256 * D + D) + (D * D + D) + 1001 * D + depth * (D * 6 * D + 6 * D) + (D * 2 * D + 2 * D)
    affine = (2 * depth + 1) * 2 * D
    assert n_params(cond) - n_params(plain) == conditioning - affine


def test_plain_workload_takes_only_the_noised_latents():
    plain, uncond = get_workload("dit-tiny-plain"), get_workload("dit-tiny-uncond")
    assert (plain.family, plain.input_names, plain.tokens_per_sample) == ("dit-plain", ("x_t",), 16)
    assert get_workload("dit-s-2-plain-512").tokens_per_sample == 1024
    batch = plain.make_batch(5, torch.Generator().manual_seed(4))
    (x_t,) = batch.inputs
    # the same draws as the unconditional DiT's batch: same x_t and ε, only t is not handed to the model
    same = uncond.make_batch(5, torch.Generator().manual_seed(4))
    assert torch.equal(x_t, same.inputs[0]) and torch.equal(batch.target, same.target)
    model = plain.build_model()
    out = model(x_t)
    assert out.shape == (5, 8, 8, 8)
    assert plain.loss_per_sample(out, batch.target).shape == (5,)
    with pytest.raises(TypeError):
        model(x_t, same.inputs[1])


def test_plain_has_no_conditioning_and_affine_pre_ln_blocks():
    model = get_workload("dit-tiny-plain").build_model()
    assert isinstance(model, PlainDiT)
    names = [n for n, _ in model.named_modules()]
    assert not [n for n in names if "adaLN" in n or "t_embedder" in n or "y_embedder" in n]
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.elementwise_affine for m in norms)  # 2 per block, 1 final
    assert {type(m) for m in model.modules() if not list(m.children())} == {
        nn.Conv2d,
        nn.Linear,
        nn.LayerNorm,
        nn.GELU,
    }
    table = sincos_pos_embed_2d(64, 4)[None]
    assert torch.equal(model.pos_embed, table) and not model.pos_embed.requires_grad


def test_paper_size_plain_starts_with_a_zero_final_linear_like_dit():
    workload = get_workload("dit-tiny-plain:zero_init=True")
    model = workload.build_model()
    assert not torch.any(model.final_layer.linear.weight != 0)
    assert get_workload("dit-xl-2-plain").info["zero_init"] is True
    assert get_workload("dit-tiny-plain").info["zero_init"] is False


def test_plain_takes_the_777_options():
    fixed = get_workload("dit-tiny-plain:learnable_pos_embed=True:pos_embed_in_submodule=True").build_model()
    assert [n for n, _ in fixed.named_parameters(recurse=False)] == []
    assert fixed.pos_embedder.weight.requires_grad
    learnable = get_workload("dit-tiny-plain:learnable_pos_embed=True").build_model()
    assert [n for n, p in learnable.named_parameters(recurse=False) if p.requires_grad] == ["pos_embed"]
