"""Which scaled-dot-product-attention kernel a step runs: chosen (``--attention``) or observed, at the op level.

``F.scaled_dot_product_attention`` picks its kernel at dispatch time, and the kernels differ in what they keep
for backward: the *math* path saves the B×H×T×T attention weights, the fused kernels (flash, memory-efficient,
cuDNN) save the output plus an fp32 log-sum-exp of B×H×T. On the meta device torch always decomposes to math,
whatever ``torch.nn.attention.sdpa_kernel`` says, so a meta step would charge a GPU's step for T×T weights it
never holds. :class:`AttentionMode` is a ``TorchFunctionMode`` active around the step: it catches every
``scaled_dot_product_attention`` call of any model (bring-your-own ones included; nothing in the model is
edited) and either routes it to the chosen aten kernel — each has a registered autograd formula, so the
backward is the kernel's own — or, for ``auto`` on a real device, lets torch choose and records what it chose.
:func:`attention_in_forward` keeps the mode active while the model's forward runs.

Kernels per device (``KERNEL_OPS``): ``math`` is ``aten._scaled_dot_product_attention_math`` everywhere;
``flash`` is ``aten._scaled_dot_product_flash_attention`` on CUDA and meta, ``..._flash_attention_for_cpu`` on
CPU; ``efficient`` (``aten._scaled_dot_product_efficient_attention``) and ``cudnn``
(``aten._scaled_dot_product_cudnn_attention``) exist on CUDA and meta only — asking for them on CPU makes the
case ``unsupported`` (:class:`AttentionUnsupported`).

``auto`` on meta emulates torch 2.13's CUDA choice (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``,
priority flash → efficient → math, ``torch._C._get_sdp_priority_order()``) for a GPU of compute capability
``sm`` (default 8.0, Ampere or newer), by the rules that decide it for dense inputs:

* flash: fp16/bf16, sm ≥ 8.0, no ``attn_mask``, q/k/v head dims equal and ≤ 256, no causal mask on a
  non-square q/k, no dropout-free restriction;
* efficient: fp32/fp16/bf16, q/k head dims equal, head dims divisible by the GEMM alignment (sm ≥ 8.0: 4 for
  fp32, 8 for half; sm 7.x: 1 for fp32, 8 for half), q and k with the same number of heads;
* else math.

So fp32 models get ``efficient`` and half-precision ones ``flash`` on Ampere/Hopper. Two choices torch can
make that ``auto`` does not emulate: on sm 9.x/10.x with cuDNN newer than 9.15 torch puts cuDNN attention
first (``check_prefer_cudnn_attention``); its saved state (output + fp32 stats of B×H×T) is the size of
flash's, and ``--attention cudnn`` routes to it exactly. Nested (jagged) inputs are not emulated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bench.config.options import ATTENTION_CHOICES
from models.checkpointing import also_in_recompute

__all__ = [
    "ATTENTION_CHOICES",
    "AttentionMode",
    "AttentionUnsupported",
    "attention_in_forward",
    "cuda_auto_kernel",
]

_aten = torch.ops.aten
# The fused op each kernel name stands for, per device type (math has none: it is a decomposition).
KERNEL_OPS: dict[str, dict[str, object]] = {
    "cuda": {
        "flash": _aten._scaled_dot_product_flash_attention.default,
        "efficient": _aten._scaled_dot_product_efficient_attention.default,
        "cudnn": _aten._scaled_dot_product_cudnn_attention.default,
    },
    "cpu": {"flash": _aten._scaled_dot_product_flash_attention_for_cpu.default},
}
KERNEL_OPS["meta"] = KERNEL_OPS["cuda"]  # meta predicts a CUDA GPU
# Any fused op seen while torch chooses for itself names the kernel; none seen means math.
_OBSERVED = {op: name for ops in KERNEL_OPS.values() for name, op in ops.items()}


class AttentionUnsupported(RuntimeError):
    """The chosen attention kernel cannot run this call on this device (one line: what and why)."""


@dataclass(frozen=True)
class SdpaCall:
    """The arguments of one ``scaled_dot_product_attention`` call, by name."""

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False

    @classmethod
    def bind(cls, args: tuple, kwargs: dict) -> SdpaCall:
        return cls(*args, **kwargs)

    @property
    def needs_grad(self) -> bool:
        """What torch's ``should_compute_logsumexp`` asks: will a backward need the kernel's saved stats?"""
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.query, self.key, self.value))

    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.query.shape[-1])


def _gemm_alignment(dtype: torch.dtype, sm: tuple[int, int]) -> int:
    """sdp_utils.cpp ``minimum_gemm_alignment``: head dims must be a multiple of this for efficient attention."""
    half = dtype in (torch.float16, torch.bfloat16)
    alignment = 4 if sm[0] >= 8 else 1
    tensor_cores = sm[0] >= 8 or (sm[0] >= 7 and half)
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    return alignment


def cuda_auto_kernel(call: SdpaCall, sm: tuple[int, int] = (8, 0)) -> str:
    """The kernel torch 2.13 picks on a CUDA GPU of compute capability ``sm`` for ``call`` (module docstring)."""
    q, k, v = call.query, call.key, call.value
    dtype = q.dtype
    half = dtype in (torch.float16, torch.bfloat16)
    same_heads = q.shape[-3] == k.shape[-3] == v.shape[-3] if q.dim() >= 3 else True
    square = q.shape[-2] == k.shape[-2]
    dims_equal = q.shape[-1] == k.shape[-1] == v.shape[-1]
    if (
        half
        and sm >= (8, 0)
        and call.attn_mask is None
        and dims_equal
        and q.shape[-1] <= 256
        and (square or not call.is_causal)
        and (same_heads or call.enable_gqa)
    ):
        return "flash"
    alignment = _gemm_alignment(dtype, sm)
    if (
        dtype in (torch.float32, torch.float16, torch.bfloat16)
        and q.shape[-1] == k.shape[-1]
        and q.shape[-1] % alignment == 0
        and v.shape[-1] % alignment == 0
        and same_heads
    ):
        return "efficient"
    return "math"


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as the additive float bias the fused kernels take (True = keep), as torch converts it."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")).expand(mask.shape)


def _pad_head_dim(t: Tensor, multiple: int) -> Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def run_kernel(kernel: str, device_type: str, call: SdpaCall) -> Tensor:
    """Call ``kernel``'s aten op for ``call`` on ``device_type``; its output (B, H, T, Dv)."""
    q, k, v = call.query, call.key, call.value
    if kernel == "math":
        return _aten._scaled_dot_product_attention_math(
            q,
            k,
            v,
            call.attn_mask,
            call.dropout_p,
            call.is_causal,
            None,
            scale=call.scale,
            enable_gqa=call.enable_gqa,
        )[0]
    op = KERNEL_OPS.get(device_type, {}).get(kernel)
    if op is None:
        valid = ", ".join(["auto", "math", *KERNEL_OPS.get(device_type, {})])
        raise AttentionUnsupported(
            f"--attention {kernel}: torch has no {kernel} attention kernel on {device_type}; valid there: {valid}"
        )
    if call.enable_gqa and q.shape[-3] != k.shape[-3]:
        raise AttentionUnsupported(f"--attention {kernel}: grouped-query attention (enable_gqa) is routed to math only")
    if kernel == "flash" and call.attn_mask is not None:
        raise AttentionUnsupported("--attention flash: flash attention takes no attn_mask (this model passes one)")
    scale = call.softmax_scale()
    if kernel == "flash" and device_type == "cpu":
        return op(q, k, v, call.dropout_p, call.is_causal, attn_mask=call.attn_mask, scale=scale)[0]
    if kernel == "flash":  # CUDA pads head dims to a multiple of 8 and slices the output back
        head_dim = v.shape[-1]
        out = op(
            _pad_head_dim(q, 8),
            _pad_head_dim(k, 8),
            _pad_head_dim(v, 8),
            call.dropout_p,
            call.is_causal,
            False,
            scale=scale,
        )[0]
        return out[..., :head_dim] if out.shape[-1] != head_dim else out
    mask = _additive_mask(call.attn_mask, q.dtype)
    if kernel == "efficient":
        return op(q, k, v, mask, call.needs_grad, call.dropout_p, call.is_causal, scale=scale)[0]
    return op(q, k, v, mask, call.needs_grad, call.dropout_p, call.is_causal, False, scale=scale)[0]  # cudnn


class _KernelObserver(TorchDispatchMode):
    """Notes which fused attention op (if any) torch's own dispatch runs."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _OBSERVED.get(func)
        if name is not None:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


class AttentionMode(TorchFunctionMode):
    """Route (or, for ``auto`` off meta, observe) every ``scaled_dot_product_attention`` call while active.

    ``choice``: one of :data:`ATTENTION_CHOICES`; ``device_type``: where the step runs ("meta" predicts a CUDA
    GPU of compute capability ``sm``); ``observe``: for ``auto`` on CPU/CUDA, find out which kernel torch ran
    (costs a dispatch mode per call: use it in an untimed step). ``kernels`` collects the kernels that ran."""

    def __init__(self, choice: str, device_type: str, *, observe: bool = True, sm: tuple[int, int] = (8, 0)):
        if choice not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention choice {choice!r}; valid: {', '.join(ATTENTION_CHOICES)}")
        super().__init__()
        self.choice, self.device_type, self.observe, self.sm = choice, device_type, observe, sm
        self.kernels: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if self.choice == "auto" and self.device_type != "meta":
            if not self.observe:
                return func(*args, **kwargs)
            with _KernelObserver() as observer:
                out = func(*args, **kwargs)
            self.kernels |= observer.seen or {"math"}
            return out
        call = SdpaCall.bind(args, kwargs)
        kernel = cuda_auto_kernel(call, self.sm) if self.choice == "auto" else self.choice
        self.kernels.add(kernel)
        return run_kernel(kernel, self.device_type, call)


@contextmanager
def attention_in_forward(
    model: nn.Module, choice: str, device_type: str, *, observe: bool = True, sm: tuple[int, int] = (8, 0)
) -> Iterator[AttentionMode | None]:
    """:class:`AttentionMode` active while ``model``'s forward runs, for the duration of the block.

    A torch-function mode sees every torch call (tensor attribute reads included), and a DP step makes most of
    its calls outside the forward (Opacus' optimizer alone makes ~200 000 for a DiT-XL/2), so the mode is
    entered by a forward pre-hook on the top-level module and left by a forward hook that runs even when the
    forward raises; both are removed when the block ends. Attention is called inside the forward (also when a
    method calls the model through ``torch.func.functional_call`` or a wrapper), and the kernels' backward
    formulas need no mode — but a checkpointed block recomputes its forward inside the backward, so the mode is
    entered around that recompute too (models.checkpointing.also_in_recompute). Nothing is installed where there
    is nothing to do (``auto`` on a real device without observation: torch's own choice, no per-op Python cost in
    timed rounds)."""
    if choice == "auto" and device_type != "meta" and not observe:
        yield None
        return
    mode = AttentionMode(choice, device_type, observe=observe, sm=sm)
    depth = 0

    def enter(module, args):
        nonlocal depth
        if depth == 0:
            mode.__enter__()
        depth += 1

    def leave(module, args, output):
        nonlocal depth
        depth -= 1
        if depth == 0:
            mode.__exit__(None, None, None)

    @contextmanager
    def in_recompute() -> Iterator[None]:  # a checkpointed block's recompute, inside the backward
        enter(None, None)
        try:
            yield
        finally:
            leave(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        with also_in_recompute(in_recompute):
            yield mode
    finally:
        for handle in handles:
            handle.remove()
