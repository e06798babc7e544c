"""The GPT-2 of models/gpt.py in flax (linen), from the same :class:`~models.gpt.GPTConfig`.

Pre-LN blocks, causal attention, exact-erf GELU MLP, learned wte/wpe, and the LM head either tied to wte
(``wte.attend``) or a separate bias-free Dense. Module names are the PyTorch ones (``h_0`` for ``h.0``), so
models/jax/convert.py maps each weight by rule. Input (B, T) integer tokens, output (B, T, V) logits.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import linen as nn

from models.gpt import GPTConfig

from .dit import attention

__all__ = ["FlaxGPT", "next_token_ce_per_sample"]

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which models/gpt.py keeps


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        B, T, C = x.shape
        qkv = nn.Dense(3 * C, use_bias=cfg.bias, name="c_attn")(x).reshape(B, T, 3, cfg.n_head, C // cfg.n_head)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each (B, H, T, Dh)
        out = jnp.transpose(attention(q, k, v, causal=True), (0, 2, 1, 3)).reshape(B, T, C)
        return nn.Dense(C, use_bias=cfg.bias, name="c_proj")(out)


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.gelu(nn.Dense(4 * cfg.n_embd, use_bias=cfg.bias, name="c_fc")(x), approximate=False)
        return nn.Dense(cfg.n_embd, use_bias=cfg.bias, name="c_proj")(h)


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = x + CausalSelfAttention(cfg, name="attn")(nn.LayerNorm(epsilon=_LN_EPS, use_bias=cfg.bias, name="ln_1")(x))
        return x + MLP(cfg, name="mlp")(nn.LayerNorm(epsilon=_LN_EPS, use_bias=cfg.bias, name="ln_2")(x))


class FlaxGPT(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, idx):
        cfg = self.config
        T = idx.shape[1]
        if cfg.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte")
        x = wte(idx) + nn.Embed(cfg.block_size, cfg.n_embd, name="wpe")(jnp.arange(T))[None]
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=_LN_EPS, use_bias=cfg.bias, name="ln_f")(x)
        if cfg.tie_weights:
            return wte.attend(x)
        return nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")(x)


def next_token_ce_per_sample(logits: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """models/gpt.py's loss: next-token cross-entropy averaged over the T positions of each sample."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, target), axis=1)
