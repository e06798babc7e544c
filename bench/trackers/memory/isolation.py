"""Case boundaries on one device: what runs before a case allocates anything and after it released everything.

In-process isolation (docs/measurement.md, "Isolation"): garbage collection, the caching allocator emptied and
its statistics reset at both ends of a case, and at the start the NVML reading every later
``nvml_peak_minus_baseline_bytes`` is taken against (CUDA context, loaded kernels and library handles, other
processes).

Before the first case-start baseline on a CUDA device the process warms the device once
(:func:`warm_device`). With lazy module loading (``CUDA_MODULE_LOADING=LAZY``, torch's default) a kernel's
module is loaded on its first launch, and cuBLAS/cuDNN create their handles and workspaces on first use; without
the warm-up that memory would land inside the first case that needed it, so its NVML figure would depend on
which cases ran before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import allocator
from .nvml import read_used_bytes

__all__ = ["end_case", "start_case", "warm_device"]

# Devices warmed in this process (once each, before their first case-start baseline).
_WARMED: set[torch.device] = set()

# The dtypes of the bench's steps: fp32 (GPT, the optimizer) and bf16 (DiT parameters).
WARM_DTYPES = (torch.float32, torch.bfloat16)


def start_case(device: torch.device, notes: list[str]) -> int | None:
    """Reset the device's allocator state; on CUDA return NVML ``used`` now (None with a note if unreadable).

    The first call for a CUDA device warms it first and notes so (the first case's notes)."""
    allocator.reset_between_cases(device)
    if device.type != "cuda":
        return None
    if device not in _WARMED:
        _WARMED.add(device)  # once per process, whether or not it succeeds
        notes.append(_warm_once(device))
        allocator.reset_between_cases(device)  # the warm-up's tensors leave the allocator's cache
    used, nvml_notes = read_used_bytes(device.index)
    notes.extend(f"case-start baseline: {note}" for note in nvml_notes)
    return used


def end_case(device: torch.device) -> None:
    """Release what the case left in the allocator's cache; its tensors must be unreferenced already."""
    allocator.reset_between_cases(device)


def _warm_once(device: torch.device) -> str:
    """Warm ``device`` and return the note saying so, with what it added to NVML ``used`` where readable."""
    before, _ = read_used_bytes(device.index)
    failures = warm_device(device)
    after, _ = read_used_bytes(device.index)
    added = f"; NVML used +{(after - before) / 2**20:.1f} MiB" if before is not None and after is not None else ""
    note = (
        f"device warm-up: {device} ran matmul, conv2d, SDPA, layer_norm, embedding and AdamW foreach kernels "
        f"(forward and backward, {', '.join(str(d).replace('torch.', '') for d in WARM_DTYPES)}) once before "
        f"its first case-start baseline{added}"
    )
    return note + "".join(f"; {failure}" for failure in failures)


def warm_device(device: torch.device) -> list[str]:
    """Run each kind of kernel the bench's steps launch once on ``device``, forward and backward, in every
    dtype of :data:`WARM_DTYPES`, then an AdamW foreach step; returns one line per dtype that failed (e.g. bf16
    on a GPU without it). Small shapes: this loads modules and library handles, it measures nothing."""
    failures = []
    for dtype in WARM_DTYPES:
        try:
            _warm_dtype(device, dtype)
        except Exception as exc:  # a dtype the device lacks must not stop the bench
            failures.append(f"warm-up in {dtype} failed ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return failures


def _warm_dtype(device: torch.device, dtype: torch.dtype) -> None:
    factory = {"device": device, "dtype": dtype}
    layers = nn.ModuleDict(
        {
            "embed": nn.Embedding(32, 64, **factory),
            "norm": nn.LayerNorm(64, **factory),
            "linear": nn.Linear(64, 192, **factory),
            "conv": nn.Conv2d(4, 64, kernel_size=2, stride=2, **factory),
        }
    )
    tokens = torch.randint(0, 32, (2, 16), device=device)
    image = torch.randn(2, 4, 8, 8, **factory)
    x = layers["norm"](layers["embed"](tokens) + layers["conv"](image).flatten(2).transpose(1, 2))
    q, k, v = layers["linear"](x).view(2, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)  # (batch, heads, tokens, dim)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 64)
    logits = F.gelu(attn, approximate="tanh") @ layers["embed"].weight.t()
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()) + F.mse_loss(x.float(), attn.float())
    loss.backward()
    # Per-sample pieces of the DP methods: batched matmul (einsum), norms, clipping factors.
    grads = torch.einsum("bti,btj->bij", x.detach(), attn.detach())
    torch.linalg.vector_norm(grads.flatten(1), dim=1).clamp(max=1.0)
    # The bench's default AdamW: foreach kernels on CUDA (torch's default there), as a case's optimizer runs.
    optimizer = torch.optim.AdamW(layers.parameters(), lr=1e-4, weight_decay=0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
