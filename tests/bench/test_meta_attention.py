"""Attention routing at the op level (bench/case/attention.py) and the meta op cache (bench/case/meta_device.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa

from bench.case.attention import AttentionMode, AttentionUnsupported, SdpaCall, attention_in_forward, cuda_auto_kernel
from bench.case.meta_device import MetaOpCache, _op_kind
from tests.memory.tracking import tracked


def _qkv(device: str, dtype=torch.float32, shape=(2, 3, 10, 8), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3)]
    return [t.to(device).requires_grad_() for t in tensors]


def _attend(choice: str, device: str, **kwargs):
    q, k, v = _qkv(device)
    with AttentionMode(choice, device) as mode:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        out.square().sum().backward()
    return out, [t.grad for t in (q, k, v)], mode.kernels


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.2}, {"is_causal": True, "scale": 0.7}])
def test_cpu_flash_route_matches_the_math_route_with_gradients(kwargs):
    out_math, grads_math, kernels_math = _attend("math", "cpu", **kwargs)
    out_flash, grads_flash, kernels_flash = _attend("flash", "cpu", **kwargs)
    assert kernels_math == {"math"} and kernels_flash == {"flash"}
    torch.testing.assert_close(out_flash, out_math, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_flash, grads_math):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the flag and the scale reach the kernel: without them the result differs
    if kwargs:
        plain, _, _ = _attend("math", "cpu")
        assert not torch.allclose(plain, out_math)


def test_cpu_auto_is_observed_not_routed():
    out, _, kernels = _attend("auto", "cpu", is_causal=True)
    q, k, v = _qkv("cpu")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert kernels == {"flash"}  # torch's CPU choice for dense fp32 inputs


@pytest.mark.parametrize("choice", ["efficient", "cudnn"])
def test_a_kernel_the_cpu_does_not_have_is_unsupported(choice):
    with pytest.raises(AttentionUnsupported, match=f"no {choice} attention kernel on cpu; valid there: auto, math"):
        _attend(choice, "cpu")


def test_flash_with_a_mask_is_unsupported():
    q, k, v = _qkv("meta", torch.bfloat16)
    with AttentionMode("flash", "meta"), pytest.raises(AttentionUnsupported, match="attn_mask"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(10, 10, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("choice", ["math", "efficient", "flash", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_routes_give_the_right_shapes(choice, dtype):
    q, k, v = _qkv("meta", dtype, shape=(2, 3, 10, 72))
    with AttentionMode(choice, "meta") as mode:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
    assert out.shape == (2, 3, 10, 72) and out.dtype == dtype and mode.kernels == {choice}
    assert all(t.grad.shape == t.shape for t in (q, k, v))


def _attention_step_bytes(choice: str, batch: int = 2, heads: int = 4, tokens: int = 256, dim: int = 64) -> int:
    q, k, v = (torch.empty(batch, heads, tokens, dim, device="meta", requires_grad=True) for _ in range(3))

    def run(mark):
        with AttentionMode(choice, "meta"):
            out = F.scaled_dot_product_attention(q, k, v)
        mark("backward")
        out.sum().backward()

    return tracked(run, device="meta").peak_tensor_bytes


def test_meta_math_saves_the_attention_weights_and_the_fused_kernels_do_not():
    b, h, t = 2, 4, 256
    math_bytes = _attention_step_bytes("math")
    # math keeps B·H·T·T fp32 weights for backward; the fused kernels keep B·H·T fp32 statistics
    for fused in ("efficient", "flash", "cudnn"):
        assert math_bytes - _attention_step_bytes(fused) >= b * h * t * t * 4, fused


@pytest.mark.parametrize(
    "dtype, sm, head_dim, mask, expected",
    [
        (torch.float32, (8, 0), 64, False, "efficient"),
        (torch.bfloat16, (8, 0), 64, False, "flash"),
        (torch.float16, (9, 0), 72, False, "flash"),
        (torch.bfloat16, (7, 0), 64, False, "efficient"),  # no flash before Ampere
        (torch.bfloat16, (8, 0), 64, True, "efficient"),  # flash takes no mask
        (torch.bfloat16, (8, 0), 512, False, "efficient"),  # flash: head dims <= 256
        (torch.float32, (8, 0), 6, False, "math"),  # 6 is not a multiple of 4
        (torch.float32, (7, 0), 6, False, "efficient"),  # Volta fp32: alignment 1
        (torch.float64, (8, 0), 64, False, "math"),
    ],
)
def test_cuda_auto_choice_follows_torchs_rules(dtype, sm, head_dim, mask, expected):
    q = torch.empty(2, 4, 16, head_dim, dtype=dtype, device="meta")
    attn_mask = torch.ones(16, 16, dtype=torch.bool, device="meta") if mask else None
    assert cuda_auto_kernel(SdpaCall(q, q, q, attn_mask=attn_mask), sm) == expected


class _ImportsSdpa(nn.Module):
    """Attention through a name imported from torch.nn.functional: routing must not depend on how it is named."""

    def forward(self, x):
        return imported_sdpa(x, x, x, is_causal=True)


def test_routing_catches_an_imported_name_and_only_inside_the_forward():
    model = _ImportsSdpa()
    x = torch.empty(2, 2, 8, 16, device="meta")
    with attention_in_forward(model, "efficient", "meta") as mode:
        model(x)
        assert mode.kernels == {"efficient"}
        F.scaled_dot_product_attention(x, x, x)  # outside the forward: not routed, not recorded
        assert mode.kernels == {"efficient"}
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_routing_leaves_the_mode_when_the_forward_raises():
    class Broken(nn.Module):
        def forward(self, x):
            F.scaled_dot_product_attention(x, x, x)
            raise RuntimeError("broken model")

    model, x = Broken(), torch.empty(1, 1, 4, 8, device="meta")
    with attention_in_forward(model, "math", "meta") as mode, pytest.raises(RuntimeError, match="broken"):
        model(x)
    F.scaled_dot_product_attention(x, x, x)
    assert mode.kernels == {"math"}  # the call after the failed forward went past the mode


def test_real_device_auto_without_observation_installs_nothing():
    model = _ImportsSdpa()
    with attention_in_forward(model, "auto", "cpu", observe=False) as mode:
        assert mode is None and not model._forward_pre_hooks


# ---- the meta op-layout cache ---------------------------------------------------------------------------------


def test_op_kinds_from_schemas():
    aten = torch.ops.aten
    assert _op_kind(aten.mm.default) == "functional"
    assert _op_kind(aten.add_.Tensor) == "inplace"
    assert _op_kind(aten._foreach_addcmul_.Scalar) == "inplace"
    for op in (aten.view.default, aten.t_.default, aten.resize_.default, aten.add.out, aten.set_.source_Storage):
        assert _op_kind(op) is None, op


def test_cache_hits_give_fresh_tensors_of_the_same_layout():
    x = torch.empty(4, 8, device="meta").t()  # non-contiguous input
    with MetaOpCache() as cache:
        first = torch.ops.aten.mul.Tensor(x, x)
        hits = cache.hits
        second = torch.ops.aten.mul.Tensor(x, x)
    assert cache.hits == hits + 1
    assert (second.shape, second.stride(), second.dtype) == (first.shape, first.stride(), first.dtype)
    assert second.untyped_storage().nbytes() == first.untyped_storage().nbytes()
    assert second.untyped_storage()._cdata != first.untyped_storage()._cdata


def test_an_op_that_returns_a_view_despite_its_schema_is_never_cached():
    x = torch.empty(4, 8, device="meta")
    with MetaOpCache():
        for _ in range(2):
            y = torch.ops.aten._unsafe_view(x, [32])
            assert y.untyped_storage()._cdata == x.untyped_storage()._cdata  # still the input's storage


def test_a_repeated_inplace_op_returns_its_argument():
    x, y = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    with MetaOpCache() as cache:
        x.add_(y)
        hits = cache.hits
        assert x.add_(y) is x and cache.hits == hits + 1


def test_tracked_bytes_are_the_same_with_and_without_the_cache():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 32))] * 3)
    model = model.to("meta")

    def step(mark):
        mark("forward")
        loss = model(torch.empty(8, 32, device="meta")).square().sum()
        mark("backward")
        loss.backward()

    plain = tracked(step, device="meta", model=model)
    with MetaOpCache() as cache:
        for p in model.parameters():
            p.grad = None
        cached = tracked(step, device="meta", model=model)
    assert cache.hits > 0
    assert (cached.peak_tensor_bytes, cached.breakdown) == (plain.peak_tensor_bytes, plain.breakdown)


@pytest.mark.parametrize("device, choice, kernel", [("cpu", "math", "math"), ("meta", "auto", "efficient")])
def test_checkpointed_blocks_recompute_under_the_routed_kernel(device, choice, kernel):
    """A block's recompute (inside the backward) must take the forward's kernel, or it saves other tensors and
    torch's checkpoint refuses it ("A different number of tensors was saved")."""
    from bench.case.runner import run_case
    from bench.case.spec import CaseSpec
    from bench.config.settings import BenchConfig
    from bench.dp import resolve_privacy

    config = BenchConfig.from_fields(
        preset="t", rounds=1, privacy=resolve_privacy(1.0, noise_multiplier=1.0), attention=choice
    )
    record = run_case(CaseSpec("dit-tiny-cond", "bk", 4, device, checkpointing="blocks"), config, None)
    assert record.status == "ok", record.reason
    assert record.attention_kernels == [kernel]  # fp32 on meta: what a CUDA GPU picks
