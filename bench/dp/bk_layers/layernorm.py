"""nn.LayerNorm with elementwise affine: weight g_i = Σ_t G_t ⊙ x̂_t, bias g_i = Σ_t G_t (instantiated, (B, *shape)).

x̂ is recomputed from the kept input with the module's eps and normalized_shape, in float32; the per-sample
gradients come out in the parameters' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.trackers.channel import annotate_dp_buffer

from .factors import Instantiated
from .registry import LayerRule, register_layer


@register_layer(nn.LayerNorm)
class LayerNormRule(LayerRule):
    params = ("weight", "bias")

    def contributions(self, module: nn.LayerNorm, inp: Tensor, grad_out: Tensor) -> dict:
        shape = tuple(module.normalized_shape)
        if inp.dim() <= len(shape):
            raise ValueError(f"Book-Keeping needs a batched LayerNorm input (B, ..., {shape}), got {tuple(inp.shape)}")
        B = inp.shape[0]
        G = grad_out.reshape(B, -1, *shape)  # (B, T, *shape)
        out: dict = {}
        if module.weight is not None and module.weight.requires_grad:
            x = inp.reshape(B, -1, *shape).float()
            dims = tuple(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
            x_hat = (x - mean) * torch.rsqrt(var + module.eps)  # (B, T, *shape)
            annotate_dp_buffer(x_hat)
            out["weight"] = Instantiated((G.float() * x_hat).sum(dim=1).to(module.weight.dtype))  # (B, *shape)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Instantiated(G.sum(dim=1, dtype=module.bias.dtype))  # (B, *shape)
        return out
