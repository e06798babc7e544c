"""nn.Linear on (B, d) or (B, ..., d) input: weight g_i = Σ_t G_t ⊗ A_t (factored), bias g_i = Σ_t G_t."""

from __future__ import annotations

from torch import Tensor, nn

from .factors import Factored, Instantiated
from .registry import LayerRule, register_layer


@register_layer(nn.Linear)
class LinearRule(LayerRule):
    params = ("weight", "bias")

    def contributions(self, module: nn.Linear, inp: Tensor, grad_out: Tensor) -> dict:
        if inp.dim() < 2:
            raise ValueError(f"Book-Keeping needs a batched Linear input (B, ..., d), got shape {tuple(inp.shape)}")
        B = inp.shape[0]
        A = inp.reshape(B, -1, module.in_features)  # (B, T, d); T = 1 for a 2-D input
        G = grad_out.reshape(B, -1, module.out_features)  # (B, T, p)
        out: dict = {}
        if module.weight.requires_grad:
            out["weight"] = Factored(left=G, right=A, rows=module.out_features)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Instantiated(G.sum(dim=1, dtype=module.bias.dtype))  # (B, p), summed in the bias's dtype
        return out
