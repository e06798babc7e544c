"""How Book-Keeping represents one use of a parameter, and the algebra it needs on those representations.

Every layer BK supports writes the per-sample gradient of one *use* of a parameter (one module call) in one of
two forms, both batched over samples on dim 0:

* :class:`Factored` — g_i = Σ_t L[i, t] ⊗ R[i, t] (a rows × cols matrix, reshaped to the parameter's shape),
  where ``L`` is dense ``(B, T, rows)`` or an int64 index tensor ``(B, T)`` standing for one-hot rows (an
  Embedding lookup) and ``R`` is dense ``(B, T, cols)``. A Linear weight is L = output gradient, R = input.
* :class:`Instantiated` — g_i itself, ``(B, *param.shape)`` (biases, LayerNorm affine, or a Factored use the
  mixed rule chose to materialise).

Inner products of per-sample gradients never need g_i when both sides are factored:
⟨Σ_t L_t⊗R_t, Σ_s L'_s⊗R'_s⟩ = Σ_{t,s} ⟨L_t, L'_s⟩·⟨R_t, R'_s⟩ = ⟨L L'ᵀ, R R'ᵀ⟩ (two T × T' Gram matrices).
That one formula gives the ghost norm of a use (L' = L) and the cross term of two uses of a tied parameter
(an Embedding and a Linear head, or two Linears). Passing ``tile`` accumulates it block by block over
(tile × tile) pieces, so no B × T × T' tensor is ever built.

Dtypes (mixed precision): the two factors of a use can differ — under autocast a Linear keeps its fp32 input
while its output gradient is bf16 — so a product of the two is taken in their common (wider) dtype, widened to
the parameter's (``dtype``: an fp32 weight's per-sample gradient or clipped sum is formed in fp32, as autograd
accumulates p.grad; in fp16 a loss-scaled sum over tokens or samples overflows), and every
Gram, inner product and norm is accumulated in float32 from float32 copies of the operands, one tile at a time
(a 16-bit Gram would round each entry to 8 or 11 bits; an fp16 Gram of a loss-scaled G overflows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.trackers.channel import annotate_dp_buffer

__all__ = ["Factored", "Instantiated", "factored_inner", "instantiated_inner"]


def _common(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` in the dtype promoted from theirs and ``dtype`` (copies only where a dtype differs)."""
    common = torch.promote_types(a.dtype, b.dtype) if dtype is None else torch.promote_types(a.dtype, dtype)
    common = torch.promote_types(common, b.dtype)
    return a.to(common), b.to(common)


def _fp32(t: Tensor) -> Tensor:
    """``t`` as a float32 copy if it is a 16-bit float (itself otherwise): Grams and norms accumulate in fp32."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


@dataclass
class Factored:
    """g_i = Σ_t L[i, t] ⊗ R[i, t].

    ``left`` is (B, T, rows) dense or (B, T) int64 row indices, ``right`` (B, T, cols)."""

    left: Tensor
    right: Tensor
    rows: int

    def __post_init__(self) -> None:
        if self.left.shape[:2] != self.right.shape[:2] or self.right.dim() != 3:
            raise ValueError(f"Factored: left {tuple(self.left.shape)} and right {tuple(self.right.shape)} disagree")

    @property
    def is_index(self) -> bool:
        return self.left.dim() == 2

    @property
    def batch_size(self) -> int:
        return self.right.shape[0]

    @property
    def tokens(self) -> int:
        return self.right.shape[1]

    @property
    def cols(self) -> int:
        return self.right.shape[2]

    def prefers_ghost(self) -> bool:
        """The mixed rule (Bu et al.): two T×T Grams are cheaper to hold than one rows×cols gradient per sample."""
        return 2 * self.tokens**2 < self.rows * self.cols

    def instantiate(self, dtype: torch.dtype | None = None) -> Tensor:
        """Per-sample gradients (B, rows, cols), in the factors' common dtype widened to ``dtype``."""
        B, T, cols = self.right.shape
        if self.is_index:
            right = self.right if dtype is None else self.right.to(torch.promote_types(self.right.dtype, dtype))
            out = right.new_zeros(B, self.rows, cols)
            out.scatter_add_(1, self.left.unsqueeze(-1).expand(B, T, cols), right)
        else:
            left, right = _common(self.left, self.right, dtype)
            out = torch.bmm(left.transpose(1, 2), right)  # (B, rows, cols)
        annotate_dp_buffer(out)
        return out

    def weighted_sum(self, weights: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Σ_i w_i g_i (rows, cols) by one matmul (or one index_add), in the factors' common dtype widened to
        ``dtype``: no per-sample gradient is built."""
        B, T, cols = self.right.shape
        if self.is_index:
            right = self.right if dtype is None else self.right.to(torch.promote_types(self.right.dtype, dtype))
            scaled = (right * weights.to(right.dtype)[:, None, None]).reshape(B * T, cols)
            return right.new_zeros(self.rows, cols).index_add_(0, self.left.reshape(B * T), scaled)
        left, right = _common(self.left, self.right, dtype)
        w = weights.to(right.dtype)
        # Scale whichever factor is narrower: that is the cheaper elementwise product.
        if self.rows <= cols:
            left = left * w[:, None, None]
        else:
            right = right * w[:, None, None]
        return left.reshape(B * T, self.rows).t() @ right.reshape(B * T, cols)


@dataclass
class Instantiated:
    """Per-sample gradients of one use, (B, *param.shape)."""

    per_sample: Tensor


def _batched_dot(x: Tensor, y: Tensor) -> Tensor:
    """Σ over all but dim 0 of x ⊙ y, in float32, (B,). (vecdot on flat views: einsum would copy both operands.)"""
    B = x.shape[0]
    return torch.linalg.vecdot(_fp32(x.reshape(B, -1)), _fp32(y.reshape(B, -1)))


def _left_gram(u: Factored, v: Factored, tu: slice, tv: slice, dtype: torch.dtype) -> Tensor:
    """⟨L_u[t], L_v[s]⟩ for t in tu, s in tv: (B, |tu|, |tv|); index factors stand for one-hot rows."""
    lu, lv = u.left[:, tu], v.left[:, tv]
    if u.is_index and v.is_index:  # token equality
        return (lu.unsqueeze(2) == lv.unsqueeze(1)).to(dtype)
    if u.is_index:  # ⟨onehot(x_t), L_v[s]⟩ = L_v[s, x_t] (a gather: exact in any dtype)
        return lv.gather(2, lu.unsqueeze(1).expand(-1, lv.shape[1], -1)).transpose(1, 2)
    if v.is_index:  # ⟨L_u[t], onehot(x_s)⟩ = L_u[t, x_s]
        return lu.gather(2, lv.unsqueeze(1).expand(-1, lu.shape[1], -1))
    return torch.bmm(_fp32(lu), _fp32(lv).transpose(1, 2))


def factored_inner(u: Factored, v: Factored, tile: int | None = None) -> Tensor:
    """⟨g_u,i, g_v,i⟩ for every sample, (B,) float32: ⟨L_u L_vᵀ, R_u R_vᵀ⟩, over (tile × tile) blocks if ``tile``."""
    if u.rows != v.rows or u.cols != v.cols:
        raise ValueError(f"uses of one parameter disagree on its shape: {u.rows}×{u.cols} vs {v.rows}×{v.cols}")
    Tu, Tv = u.tokens, v.tokens
    step_u, step_v = (Tu, Tv) if tile is None else (tile, tile)
    symmetric = u is v
    total = torch.zeros(u.batch_size, dtype=torch.float32, device=u.right.device)
    for a in range(0, Tu, step_u):
        tu = slice(a, min(a + step_u, Tu))
        for b in range(a if symmetric else 0, Tv, step_v):
            tv = slice(b, min(b + step_v, Tv))
            right_gram = torch.bmm(_fp32(u.right[:, tu]), _fp32(v.right[:, tv]).transpose(1, 2))  # (B, |tu|, |tv|)
            left_gram = _left_gram(u, v, tu, tv, right_gram.dtype)  # (B, |tu|, |tv|)
            annotate_dp_buffer(right_gram, left_gram)
            block = _batched_dot(left_gram, right_gram)
            # A Gram of a use with itself is symmetric: an off-diagonal block stands for its transpose too.
            total += 2 * block if symmetric and b != a else block
    return total


def instantiated_inner(per_sample: Tensor, u: Factored) -> Tensor:
    """⟨S_i, g_u,i⟩ for every sample, (B,) float32, with S (B, rows, cols) materialised and g_u factored."""
    B, T, cols = u.right.shape
    if u.is_index:  # Σ_t ⟨S[x_t, :], R_t⟩
        picked = per_sample.gather(1, u.left.unsqueeze(-1).expand(B, T, cols))  # (B, T, cols)
        return _batched_dot(picked, u.right)
    r_s = torch.bmm(_fp32(u.right), _fp32(per_sample).transpose(1, 2))  # (B, T, rows): Σ_c R_t[c]·S[r, c]
    return _batched_dot(r_s, u.left)
