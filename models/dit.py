"""Diffusion Transformer (DiT, Peebles & Xie 2023), written from the paper's description.

A DiT denoises a VAE latent ``x`` (B, 4, H, W) at diffusion step ``t``: the latent is cut into p×p patches
(a Conv2d with kernel = stride = p), each patch becomes a token, a fixed 2-D sin-cos position embedding is
added, and a stack of adaLN-Zero transformer blocks is conditioned on c = embed(t) [+ embed(y)]. The final
layer maps every token back to a p×p×out_channels patch; with ``learn_sigma`` the output has 8 channels
(4 for the predicted noise, 4 for the variance interpolation).

Three variants:

* :class:`DiT` — class-conditional, ``forward(x, t, y)``; the label table has ``num_classes + 1`` rows, the
  last one being the classifier-free-guidance *null class* (index ``num_classes``). Label dropout is *not*
  done here: the batch factory (models/diffusion.py) draws it, so a step is a pure function of its batch.
* :class:`UnconditionalDiT` — ``forward(x, t)``, no label table at all.
* :class:`PlainDiT` — ``forward(x)``: no timestep, no labels, no adaLN. The same patchify, position embedding
  and widths, with standard pre-LN transformer blocks (affine LayerNorm) and a LayerNorm + Linear head. It is
  the proxy the project's seed note proposed ("a simplified unconditional DiT with no timestep or adaLN
  conditioning"): a vision transformer of DiT's shape that any DP library can take, to compare against.

All three share :class:`PatchTransformer` (patchify, position embedding, unpatchify). Each casts its float
inputs to its weight dtype where they enter (the latents at patchify, the timestep features at the timestep
MLP): the batch factory draws fp32 tensors for every precision, so ``model.to(torch.bfloat16)`` just works.

DP-library shaping (each point was measured with Opacus 1.6):

* every *trainable* parameter lives in a standard leaf module (Linear, Conv2d, Embedding) — Opacus replays a
  composite module that owns a parameter directly with only its first input (Opacus issue #777).
  ``learnable_pos_embed=True`` breaks this rule on purpose: the position embedding becomes a trainable
  parameter owned by the top-level DiT, which reproduces that failure; adding ``pos_embed_in_submodule=True``
  applies the fix (the table moves into an ``nn.Embedding`` looked up by position) and every method works;
* the label embedder looks up ``y.unsqueeze(1)`` (B, 1): Opacus' ExpandedWeights ("ew") mode rejects an
  Embedding fed a 1-D tensor;
* the patchify Conv2d's output gets a gradient hook that makes its gradient contiguous: torch's
  ExpandedWeights conv rule ``.view()``s it and fails on the strided gradient the token transpose produces
  (one transient copy of a (B, D, H/p, W/p) tensor per step, in every method alike);
* no dropout anywhere; attention is ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIT_SIZES",
    "IMAGE_TO_LATENT",
    "PATCH_SIZES",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "PatchTransformer",
    "PlainBlock",
    "PlainDiT",
    "UnconditionalDiT",
    "build_dit",
    "dit_config",
    "sincos_pos_embed_2d",
    "timestep_frequencies",
]

# Width of the sinusoidal timestep features fed to the timestep MLP (the paper's value).
TIMESTEP_FREQ_DIM = 256


@dataclass(frozen=True)
class DiTConfig:
    """One DiT architecture. ``input_size`` is the latent's side (32 for 256 px images, 64 for 512 px)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    # Probability that make_batch replaces a label by the null class; > 0 adds the null row to the label table.
    class_dropout_prob: float = 0.1
    class_conditional: bool = True
    # The plain proxy (PlainDiT): no timestep or label input and no adaLN; needs class_conditional=False.
    plain: bool = False
    learn_sigma: bool = True
    # adaLN-Zero: block adaLN outputs, final adaLN and final linear start at zero (the paper's init; a plain DiT
    # has only the final linear). At zero, the blocks' attention/MLP and everything upstream of the final linear
    # get exactly zero gradient on the first step, so tiny test workloads turn this off to make per-parameter
    # gradient checks meaningful.
    zero_init: bool = True
    # Make the position embedding a trainable parameter owned by the top-level module (reproduces Opacus #777).
    learnable_pos_embed: bool = False
    # With learnable_pos_embed: keep the trainable table in an nn.Embedding(T, D) submodule looked up by token
    # position instead — the fix for #777 (a layer every DP library has a per-sample rule for).
    pos_embed_in_submodule: bool = False

    def __post_init__(self) -> None:
        checks = [
            (
                min(self.input_size, self.patch_size, self.in_channels, self.hidden_size) >= 1,
                "input_size, patch_size, in_channels and hidden_size must be >= 1",
            ),
            (
                self.input_size % self.patch_size == 0,
                f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}",
            ),
            (self.depth >= 1 and self.num_heads >= 1, "depth and num_heads must be >= 1"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (
                self.hidden_size % self.num_heads == 0,
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}",
            ),
            (self.hidden_size % 4 == 0, f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos)"),
            (
                0.0 <= self.class_dropout_prob < 1.0,
                f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}",
            ),
            (not self.class_conditional or self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (not (self.plain and self.class_conditional), "a plain DiT takes no labels: needs class_conditional=False"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DiTConfig: {message}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def approx_parameters(self) -> int:
        """The parameter count of the weight matrices and tables (biases and norms left out), with no model
        built: a lower bound within 0.3 % of the built model's count for the paper's configs (tested).
        The catalog's size limit reads it."""
        D, inner = self.hidden_size, int(self.hidden_size * self.mlp_ratio)
        adaln = 0 if self.plain else 6 * D * D  # per block; the final layer's is a third of it
        blocks = self.depth * (4 * D * D + 2 * D * inner + adaln)
        timestep = 0 if self.plain else (TIMESTEP_FREQ_DIM + D) * D
        labels = (self.num_classes + 1) * D if self.class_conditional else 0
        patches = self.patch_size**2 * (self.in_channels + self.out_channels) * D  # patchify and the final Linear
        return blocks + adaln // 3 + timestep + labels + patches + self.num_tokens * D

    @property
    def null_class(self) -> int | None:
        """Index of the classifier-free-guidance null class, or None when the table has no null row."""
        return self.num_classes if self.class_conditional and self.class_dropout_prob > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# Fixed embeddings


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): [sin(pos·ω_k), cos(pos·ω_k)], ω_k = 10000^(-k/(dim/2)), k < dim/2."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """(grid², dim) fixed position embedding; token i = row·grid + col gets [sincos(row), sincos(col)]."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # (grid²,) row index of each token (row-major order)
    cols = coords.repeat(grid_size)  # (grid²,) column index
    return torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1).float()


def timestep_frequencies(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps (int or float) -> (B, dim) features [cos(t·ω_k), sin(t·ω_k)], ω_k = max_period^(-k/(dim/2)).

    Computed in fp32 whatever the model's dtype: t reaches 999, and angles that large lose their phase in bf16
    (8 mantissa bits). The timestep MLP casts the result to its own weight dtype."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * omega[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (B, T, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ---------------------------------------------------------------------------------------------------------------
# Modules


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): sinusoidal features, then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        # fp32 features, cast where they meet the weights (bf16 after model.to(torch.bfloat16)).
        return self.mlp(timestep_frequencies(t).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """y (B,) class indices -> (B, D). Row ``num_classes`` (when present) is the null class."""

    def __init__(self, num_rows: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        # Look up a (B, 1) index tensor: Opacus' ExpandedWeights mode needs a batch dim *and* a sequence dim.
        return self.embedding_table(y.unsqueeze(1)).squeeze(1)  # (B, D)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear D -> 3D (with bias), SDPA, proj D -> D."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Mlp(nn.Module):
    """D -> ratio·D -> D with tanh-approximated GELU."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: c gives shift/scale/gate for the attention and the MLP branch."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x (B, T, D), c (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = x + gate_a[:, None, :] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None, :] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class PlainBlock(nn.Module):
    """Pre-LN transformer block with no conditioning: x + attn(LN(x)), then x + mlp(LN(x)); affine LayerNorms."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (B, T, D)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, adaLN shift/scale from c, then Linear D -> p·p·out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p·p·C_out)


class PlainFinalLayer(nn.Module):
    """Affine LayerNorm, then Linear D -> p·p·out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm_final(x))  # (B, T, p·p·C_out)


class PatchTransformer(nn.Module):
    """What every DiT variant shares: patchify + position embedding (:meth:`embed`), :meth:`unpatchify`, and
    the init of those and of every Linear. Subclasses add blocks and a final layer, then call ``_init_weights``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D, p = config.hidden_size, config.patch_size
        self.x_embedder = nn.Conv2d(config.in_channels, D, kernel_size=p, stride=p)
        # Stored as a Parameter (not a buffer) so parameter totals count it as the reference does; frozen
        # unless learnable_pos_embed, in which case this top-level module owns a trainable parameter directly.
        table = sincos_pos_embed_2d(D, config.grid_size)  # (T, D)
        if config.learnable_pos_embed and config.pos_embed_in_submodule:
            self.pos_embedder = nn.Embedding(config.num_tokens, D, _weight=table.clone())
            self.register_buffer("positions", torch.arange(config.num_tokens), persistent=False)  # (T,)
        else:
            self.pos_embed = nn.Parameter(table[None], requires_grad=config.learnable_pos_embed)  # (1, T, D)

    def _init_weights(self) -> None:
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        # Patchify is a linear map of the flattened patch: initialise it like one.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Latents (B, C_in, H, W) -> tokens (B, T, D): patchify, then add the position embedding.

        ``x`` is cast to the weights' dtype first: batches are drawn in fp32 whatever the model's precision,
        and this is where they enter (a no-op for an fp32 model)."""
        patches = self.x_embedder(x.to(self.x_embedder.weight.dtype))  # (B, D, g, g)
        if patches.requires_grad:
            # The token transpose below hands the Conv2d a non-contiguous output gradient, which torch's
            # ExpandedWeights conv rule (Opacus "ew" mode) cannot .view(); give it a contiguous one.
            patches.register_hook(torch.Tensor.contiguous)
        return patches.flatten(2).transpose(1, 2) + self._position_embedding(x.shape[0])  # (B, T, D)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, T, p·p·C) -> (B, C, H, W), token i = row·grid + col holding a (p, p, C) patch."""
        B, g, p, C = tokens.shape[0], self.config.grid_size, self.config.patch_size, self.config.out_channels
        x = tokens.reshape(B, g, g, p, p, C)  # (B, row, col, pr, pc, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)

    def _position_embedding(self, batch_size: int) -> Tensor:
        if not hasattr(self, "pos_embedder"):
            return self.pos_embed  # (1, T, D)
        # A (B, T) index tensor, contiguous: DP libraries need the batch dim on the embedding's input, and
        # Opacus' ghost norm .view()s it.
        return self.pos_embedder(self.positions.expand(batch_size, -1).contiguous())  # (B, T, D)


class _DiTBackbone(PatchTransformer):
    """The adaLN DiT without its label embedder: timestep embedder, adaLN-Zero blocks, adaLN final layer."""

    def __init__(self, config: DiTConfig):
        if config.plain:
            raise ValueError(f"{type(self).__name__} needs plain=False; use PlainDiT")
        super().__init__(config)
        D = config.hidden_size
        self.t_embedder = TimestepEmbedder(D)
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)

    def _init_weights(self) -> None:
        super()._init_weights()
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.config.zero_init:
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _denoise(self, x: Tensor, c: Tensor) -> Tensor:
        # x (B, C_in, H, W), c (B, D)
        h = self.embed(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)


class DiT(_DiTBackbone):
    """Class-conditional DiT: ``forward(x (B,4,H,W), t (B,) int, y (B,) int) -> (B, out_channels, H, W)``."""

    def __init__(self, config: DiTConfig):
        if not config.class_conditional:
            raise ValueError("DiT needs class_conditional=True; use UnconditionalDiT")
        super().__init__(config)
        num_rows = config.num_classes + (1 if config.null_class is not None else 0)
        self.y_embedder = LabelEmbedder(num_rows, config.hidden_size)
        self._init_weights()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self._denoise(x, self.t_embedder(t) + self.y_embedder(y))


class UnconditionalDiT(_DiTBackbone):
    """DiT with no label embedder: ``forward(x (B,4,H,W), t (B,) int) -> (B, out_channels, H, W)``."""

    def __init__(self, config: DiTConfig):
        if config.class_conditional:
            raise ValueError("UnconditionalDiT needs class_conditional=False; use DiT")
        super().__init__(config)
        self._init_weights()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self._denoise(x, self.t_embedder(t))


class PlainDiT(PatchTransformer):
    """The plain proxy: ``forward(x (B,4,H,W)) -> (B, out_channels, H, W)``; no timestep, labels or adaLN."""

    def __init__(self, config: DiTConfig):
        if not config.plain:
            raise ValueError("PlainDiT needs plain=True; use DiT or UnconditionalDiT")
        super().__init__(config)
        D = config.hidden_size
        self.blocks = nn.ModuleList(PlainBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = PlainFinalLayer(D, config.patch_size, config.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        super()._init_weights()
        if self.config.zero_init:
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, T, D)
        for block in self.blocks:
            h = block(h)
        return self.unpatchify(self.final_layer(h))  # (B, C_out, H, W)


def build_dit(config: DiTConfig) -> PatchTransformer:
    """The DiT variant ``config`` describes: plain, class-conditional or unconditional."""
    if config.plain:
        return PlainDiT(config)
    return DiT(config) if config.class_conditional else UnconditionalDiT(config)


# ---------------------------------------------------------------------------------------------------------------
# Paper configurations

# size letter -> (depth, hidden, heads), from the paper's Table 1.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
# image side in pixels -> latent side (the VAE downsamples by 8)
IMAGE_TO_LATENT = {256: 32, 512: 64}


def dit_config(size: str, patch: int, image_size: int = 256, **overrides) -> DiTConfig:
    """The paper's DiT-{size}/{patch} at ``image_size`` px, with optional field overrides."""
    depth, hidden, heads = DIT_SIZES[size]
    base = DiTConfig(
        input_size=IMAGE_TO_LATENT[image_size], patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads
    )
    return replace(base, **overrides)
