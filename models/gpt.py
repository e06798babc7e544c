"""A GPT-2-style decoder (the architecture of Radford et al. 2019, in the compact nanoGPT layout).

Pre-LayerNorm blocks (affine LayerNorm with bias), causal multi-head attention through
``F.scaled_dot_product_attention``, a 4× GELU MLP, learned token (wte) and position (wpe) embeddings, and a
language-model head that by default shares its weight with wte (``tie_weights``). No dropout: a training step
is a deterministic function of (weights, batch). Every trainable parameter lives in a standard leaf module
(Embedding, Linear, LayerNorm), which is what per-sample-gradient libraries support.

Batch: ``seq_len + 1`` random tokens per sample; the model reads the first ``seq_len`` and is scored on the
last ``seq_len`` (next-token prediction), so ``tokens_per_sample == seq_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .workload import Batch

__all__ = ["GPT", "GPT_PRESETS", "Block", "GPTConfig", "gpt_config", "make_token_batch", "next_token_ce_per_sample"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the position table covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    # Share the token embedding with the LM head (GPT-2's choice). Untied adds a separate V×D lm_head weight.
    tie_weights: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}"),
            (
                min(self.block_size, self.n_layer, self.n_head, self.n_embd) >= 1,
                "block_size, n_layer, n_head and n_embd must be >= 1",
            ),
            (self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {message}")

    @property
    def approx_parameters(self) -> int:
        """The parameter count of the weight matrices and tables (biases and norms left out), with no model
        built: a lower bound within 0.3 % of the built model's count for the GPT-2 presets (tested). The catalog's size
        limit reads it."""
        tables = self.vocab_size * (1 if self.tie_weights else 2) + self.block_size  # wte (+ lm_head), wpe
        return self.n_layer * 12 * self.n_embd**2 + tables * self.n_embd


# preset name -> (n_layer, n_head, n_embd)
GPT_PRESETS: dict[str, tuple[int, int, int]] = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def gpt_config(preset: str, **overrides) -> GPTConfig:
    n_layer, n_head, n_embd = GPT_PRESETS[preset]
    return replace(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd), **overrides)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.c_proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """``forward(idx (B, T) int64) -> logits (B, T, vocab_size)``, T <= block_size."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one parameter, counted once by model.parameters()

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02) weights, zero biases; residual output projections scaled by 1/sqrt(2·n_layer)
        # so the residual stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        if self.config.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        positions = torch.arange(T, device=idx.device)
        # wpe sees (1, T) — broadcast over the batch — so its per-sample gradient is well defined in every
        # DP library only if it is looked up per sample: expand to (B, T) indices, made contiguous because
        # Opacus' ghost Embedding norm sampler calls .view(-1, 1) on them (fails on an expanded tensor).
        x = self.wte(idx) + self.wpe(positions.expand(B, T).contiguous())  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def make_token_batch(batch_size: int, generator: torch.Generator, *, vocab_size: int, seq_len: int) -> Batch:
    """Uniform random tokens (B, seq_len + 1): inputs = first seq_len, target = last seq_len (shifted by one)."""
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)  # (B, T+1)
    return Batch(inputs=(tokens[:, :-1].contiguous(),), target=tokens[:, 1:].contiguous())


def next_token_ce_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    """Next-token cross-entropy averaged over the T positions of each sample: (B, T, V), (B, T) -> (B,)."""
    B, T, V = logits.shape
    per_token = F.cross_entropy(logits.reshape(B * T, V), target.reshape(B * T), reduction="none")  # (B·T,)
    return per_token.view(B, T).mean(dim=1)
