"""nn.Conv2d (groups = 1, zero padding) through unfold: the conv is a Linear on (B, L, C·kh·kw) patches.

DiT's patchify (kernel = stride = p) is the common case; stride, padding and dilation are honoured in general.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bench.trackers.channel import annotate_dp_buffer

from .factors import Factored, Instantiated
from .registry import register_layer


def _explicit_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The module's padding as two ints, or None if it has no symmetric integer equivalent."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return tuple(module.padding)


@register_layer(nn.Conv2d)
class Conv2dRule:
    params = ("weight", "bias")

    def check(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is implemented)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is implemented)"
        if _explicit_padding(module) is None:
            return "Conv2d with padding='same' and an even effective kernel (asymmetric padding)"
        return None

    def contributions(self, module: nn.Conv2d, inp: Tensor, grad_out: Tensor) -> dict:
        if inp.dim() != 4:
            raise ValueError(f"Book-Keeping needs a batched Conv2d input (B, C, H, W), got shape {tuple(inp.shape)}")
        out: dict = {}
        if module.weight.requires_grad:
            patches = F.unfold(
                inp,
                module.kernel_size,
                dilation=module.dilation,
                padding=_explicit_padding(module),
                stride=module.stride,
            )  # (B, C·kh·kw, L), channel-major like weight.view(out, -1)
            annotate_dp_buffer(patches)
            G = grad_out.flatten(2).transpose(1, 2)  # (B, L, out)
            out["weight"] = Factored(left=G, right=patches.transpose(1, 2), rows=module.out_channels)
        if module.bias is not None and module.bias.requires_grad:
            out["bias"] = Instantiated(grad_out.sum(dim=(2, 3), dtype=module.bias.dtype))  # (B, out)
        return out
