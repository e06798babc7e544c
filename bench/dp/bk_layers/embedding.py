"""nn.Embedding on (B, ...) indices: weight g_i = Σ_t onehot(x_t) ⊗ G_t, a factored use with index left factor.

Its ghost norm is Σ_{t,s} 1[x_t = x_s]·⟨G_t, G_s⟩ and its clipped sum one index_add. Positions holding
``padding_idx`` get no gradient (as in PyTorch).
"""

from __future__ import annotations

from torch import Tensor, nn

from .factors import Factored
from .registry import register_layer


@register_layer(nn.Embedding)
class EmbeddingRule:
    params = ("weight",)

    def check(self, module: nn.Embedding) -> str | None:
        if module.max_norm is not None:
            return "Embedding with max_norm (it renormalises the table in place during forward)"
        if module.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq (a sample's gradient would depend on the whole batch)"
        return None

    def contributions(self, module: nn.Embedding, inp: Tensor, grad_out: Tensor) -> dict:
        if inp.dim() < 1 or inp.numel() == 0:
            raise ValueError(f"Book-Keeping needs batched Embedding indices (B, ...), got shape {tuple(inp.shape)}")
        if not module.weight.requires_grad:
            return {}
        B = inp.shape[0]
        index = inp.reshape(B, -1).long()  # (B, T); gather/scatter need int64 (Embedding also takes int32)
        G = grad_out.reshape(B, -1, module.embedding_dim)  # (B, T, D)
        if module.padding_idx is not None:
            G = G * (index != module.padding_idx).unsqueeze(-1).to(G.dtype)
        return {"weight": Factored(left=index, right=G, rows=module.num_embeddings)}
