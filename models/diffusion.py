"""DDPM noise schedule, the DiT batch factory and the epsilon-prediction loss.

All the randomness of a diffusion training step is drawn in :func:`make_dit_batch` from the caller's
``torch.Generator`` — clean latents, timesteps, noise and the label-drop mask — so the model itself is a
deterministic function of its batch (DP methods can then be compared bit for bit).

Loss: the paper's reference implementation trains a learn_sigma DiT with epsilon-MSE *plus* a variational
lower-bound term on the 4 sigma channels. We use the pure epsilon-MSE over the first 4 output channels only
(the usual choice of benchmarks); the sigma channels then get no gradient, which changes no tensor shape and
no memory figure of the step.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .workload import Batch

__all__ = ["NUM_TIMESTEPS", "alphas_cumprod", "epsilon_mse_per_sample", "linear_beta_schedule", "make_dit_batch"]

NUM_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def linear_beta_schedule(num_timesteps: int = NUM_TIMESTEPS) -> Tensor:
    """DDPM's linear β schedule, 1e-4 -> 0.02, float64 (num_timesteps,)."""
    return torch.linspace(BETA_START, BETA_END, num_timesteps, dtype=torch.float64, device="cpu")


@lru_cache(maxsize=4)
def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s), float64 (num_timesteps,)."""
    return torch.cumprod(1.0 - linear_beta_schedule(num_timesteps), dim=0)


def make_dit_batch(
    batch_size: int,
    generator: torch.Generator,
    *,
    in_channels: int,
    input_size: int,
    num_classes: int | None,
    class_dropout_prob: float = 0.1,
    num_timesteps: int = NUM_TIMESTEPS,
    timestep_input: bool = True,
) -> Batch:
    """One DiT training batch drawn entirely from ``generator`` (on CPU).

    Draw order (fixed, so a seed names a batch): x0, t, ε, then — when conditional — y and the drop mask.
    x0 are synthetic standard-normal latents (no dataset: the step's cost does not depend on the data).
    Conditional (``num_classes`` given): ``Batch(inputs=(x_t, t, y), target=ε)`` where a label is replaced by
    the null class ``num_classes`` with probability ``class_dropout_prob``. Unconditional (``num_classes``
    None): ``Batch(inputs=(x_t, t), target=ε)``. Plain (``timestep_input=False``, no classes): t is still drawn
    and noises x_t — the same batch as the unconditional one for a seed — but the model is not given it:
    ``Batch(inputs=(x_t,), target=ε)``.
    """
    if not timestep_input and num_classes is not None:
        raise ValueError("make_dit_batch: a batch without the timestep input has no labels either (num_classes=None)")
    B, C, S = batch_size, in_channels, input_size
    x0 = torch.randn(B, C, S, S, generator=generator)  # (B, C, H, W)
    t = torch.randint(0, num_timesteps, (B,), generator=generator)  # (B,) int64
    noise = torch.randn(B, C, S, S, generator=generator)  # (B, C, H, W)
    abar = alphas_cumprod(num_timesteps)[t]  # (B,) float64
    x_t = (abar.sqrt()[:, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None] * noise).float()
    if num_classes is None:
        return Batch(inputs=(x_t, t) if timestep_input else (x_t,), target=noise)
    y = torch.randint(0, num_classes, (B,), generator=generator)  # (B,) int64
    if class_dropout_prob > 0:
        drop = torch.rand(B, generator=generator) < class_dropout_prob  # (B,) bool
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    return Batch(inputs=(x_t, t, y), target=noise)


def epsilon_mse_per_sample(output: Tensor, target: Tensor) -> Tensor:
    """Per-sample ε-prediction MSE: output (B, C_out, H, W), target ε (B, C, H, W) -> (B,).

    Only the first C = target channels of the output (the ε prediction) enter the loss; with learn_sigma the
    remaining channels (the variance interpolation) are trained by the reference with a VLB term we omit."""
    eps_pred = output[:, : target.shape[1]]
    return (eps_pred - target).pow(2).flatten(1).mean(dim=1)
