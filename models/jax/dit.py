"""The DiT variants of models/dit.py in flax (linen), from the same :class:`~models.dit.DiTConfig`.

Same algebra as the PyTorch modules, layer for layer: patchify (a p×p stride-p convolution), the 2-D sin-cos
position table, adaLN-Zero blocks (or plain pre-LN blocks), the final layer and unpatchify. Module names follow
the PyTorch attribute names, a list index written ``name_i`` (``blocks_0``, ``adaLN_modulation_1``), so
models/jax/convert.py maps a weight to its PyTorch name by rule. The frozen position table (a ``requires_grad=False``
parameter in PyTorch) sits in the ``frozen`` collection: it is counted but never differentiated.

Inputs are PyTorch's layout: latents (B, C, H, W), timesteps (B,) and labels (B,) integers; the output is
(B, C_out, H, W). The latents are transposed to NHWC for flax's convolution and back at unpatchify.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from models.dit import TIMESTEP_FREQ_DIM, DiTConfig, sincos_pos_embed_2d

__all__ = ["FlaxDiT", "epsilon_mse_per_sample", "timestep_frequencies"]

_LN_EPS = 1e-6


def timestep_frequencies(t: jnp.ndarray, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> jnp.ndarray:
    """(B,) -> (B, dim): [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(-k/(dim/2)), in fp32 (as models/dit.py)."""
    half = dim // 2
    omega = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, causal: bool = False) -> jnp.ndarray:
    """softmax(q·kᵀ/√d_h [+ causal mask])·v over (B, H, T, Dh) tensors (what SDPA computes)."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", nn.softmax(scores, axis=-1), v)


class Attention(nn.Module):
    hidden_size: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        B, T, D = x.shape
        qkv = nn.Dense(3 * D, name="qkv")(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each (B, H, T, Dh)
        out = attention(q, k, v)
        return nn.Dense(D, name="proj")(jnp.transpose(out, (0, 2, 1, 3)).reshape(B, T, D))


class Mlp(nn.Module):
    hidden_size: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x):
        inner = int(self.hidden_size * self.mlp_ratio)
        h = nn.gelu(nn.Dense(inner, name="fc1")(x), approximate=True)
        return nn.Dense(self.hidden_size, name="fc2")(h)


def _layer_norm(affine: bool, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_LN_EPS, use_scale=affine, use_bias=affine, name=name)


class DiTBlock(nn.Module):
    hidden_size: int
    num_heads: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x, c):
        D = self.hidden_size
        mod = nn.Dense(6 * D, name="adaLN_modulation_1")(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=1)
        attn = Attention(D, self.num_heads, name="attn")
        x = x + gate_a[:, None, :] * attn(modulate(_layer_norm(False, "norm1")(x), shift_a, scale_a))
        mlp = Mlp(D, self.mlp_ratio, name="mlp")
        return x + gate_m[:, None, :] * mlp(modulate(_layer_norm(False, "norm2")(x), shift_m, scale_m))


class PlainBlock(nn.Module):
    hidden_size: int
    num_heads: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.hidden_size, self.num_heads, name="attn")(_layer_norm(True, "norm1")(x))
        return x + Mlp(self.hidden_size, self.mlp_ratio, name="mlp")(_layer_norm(True, "norm2")(x))


class TimestepEmbedder(nn.Module):
    hidden_size: int

    @nn.compact
    def __call__(self, t):
        h = nn.silu(nn.Dense(self.hidden_size, name="mlp_0")(timestep_frequencies(t)))
        return nn.Dense(self.hidden_size, name="mlp_2")(h)


class LabelEmbedder(nn.Module):
    num_rows: int
    hidden_size: int

    @nn.compact
    def __call__(self, y):
        return nn.Embed(self.num_rows, self.hidden_size, name="embedding_table")(y)


class FinalLayer(nn.Module):
    config: DiTConfig

    @nn.compact
    def __call__(self, x, c):
        cfg = self.config
        out = cfg.patch_size**2 * cfg.out_channels
        if cfg.plain:
            return nn.Dense(out, name="linear")(_layer_norm(True, "norm_final")(x))
        shift, scale = jnp.split(nn.Dense(2 * cfg.hidden_size, name="adaLN_modulation_1")(nn.silu(c)), 2, axis=1)
        return nn.Dense(out, name="linear")(modulate(_layer_norm(False, "norm_final")(x), shift, scale))


class FlaxDiT(nn.Module):
    """Every DiT variant of ``config``: ``(x (B,C,H,W), t (B,), y (B,))``, ``(x, t)`` or ``(x,)`` by variant."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, *conditioning):
        cfg = self.config
        D, p, g = cfg.hidden_size, cfg.patch_size, cfg.grid_size
        B = x.shape[0]
        patches = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", name="x_embedder")(jnp.transpose(x, (0, 2, 3, 1)))
        h = patches.reshape(B, g * g, D) + self._position_embedding(B)  # row-major tokens, as torch's flatten(2)
        if cfg.plain:
            for i in range(cfg.depth):
                h = PlainBlock(D, cfg.num_heads, cfg.mlp_ratio, name=f"blocks_{i}")(h)
            return self._unpatchify(FinalLayer(cfg, name="final_layer")(h, None))
        t = conditioning[0]
        c = TimestepEmbedder(D, name="t_embedder")(t)
        if cfg.class_conditional:
            rows = cfg.num_classes + (1 if cfg.null_class is not None else 0)
            c = c + LabelEmbedder(rows, D, name="y_embedder")(conditioning[1])
        for i in range(cfg.depth):
            h = DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, name=f"blocks_{i}")(h, c)
        return self._unpatchify(FinalLayer(cfg, name="final_layer")(h, c))

    def _position_embedding(self, batch_size: int) -> jnp.ndarray:
        cfg = self.config

        def table(*_) -> jnp.ndarray:
            return jnp.asarray(np.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)))[None]  # (1, T, D)

        if cfg.learnable_pos_embed and cfg.pos_embed_in_submodule:
            embed = nn.Embed(cfg.num_tokens, cfg.hidden_size, name="pos_embedder")
            return embed(jnp.arange(cfg.num_tokens))[None]
        if cfg.learnable_pos_embed:
            return self.param("pos_embed", table)
        return self.variable("frozen", "pos_embed", table).value

    def _unpatchify(self, tokens: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        B, g, p, C = tokens.shape[0], cfg.grid_size, cfg.patch_size, cfg.out_channels
        x = tokens.reshape(B, g, g, p, p, C)
        return jnp.transpose(x, (0, 5, 1, 3, 2, 4)).reshape(B, C, g * p, g * p)


def epsilon_mse_per_sample(output: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """models/diffusion.py's loss: mean squared error of the first C output channels against ε, per sample."""
    eps_pred = output[:, : target.shape[1]]
    return jnp.mean(jnp.square(eps_pred - target).reshape(output.shape[0], -1), axis=1)
