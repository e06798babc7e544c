"""The autocast op lists are torch's, each entry behaves as listed, and the emulation on meta does the same.

* The CPU and CUDA tables name exactly the ops this torch registers an ``AutocastCPU`` / ``AutocastCUDA`` kernel
  for (the dispatcher is the ground truth of *which* ops; the policy of each comes from autocast_mode.h/.cpp).
* CPU entries, called for real: under ``torch.autocast("cpu")`` the output dtype is what the policy says
  (lower-precision ops called with float32 inputs give the dtype the op gives on bf16 inputs; fp32 ops called
  with bf16 inputs the float32 one; promote ops called with one bf16 and float32 inputs the float32 one), and
  the emulation with the CPU lists on meta gives the same dtypes for the same call. Every entry with a Python
  entry point that takes plain tensors has a sample call below; the others (``mkldnn_rnn_layer``,
  ``_native_multi_head_attention``, the ``_convolution`` internals, named-overload variants) are checked by
  registration only.
* CUDA entries cannot be run here (the CPU build of torch has no CUDA kernels): they are checked to be
  registered ``AutocastCUDA`` kernels of this torch, and the emulation with the CUDA lists is checked on meta
  for the calls the workloads make (cross_entropy's decomposition, layer_norm, pow, the weight cache).
* Where a torch-function mode sees less than the dispatcher — composites whose parts autocast casts (math
  attention, CUDA's cross_entropy), ops functorch's front key decomposes above autocast (``linear``), the
  layer a cast is cached at under ``torch.func`` — the emulation on meta makes the very ops (name, order,
  dtypes, shapes) real CPU autocast makes, forward and backward, with and without ``grad``/``vmap``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.dp import autocast_emulation as ae
from bench.dp.autocast_emulation import CPU_POLICIES, CUDA_POLICIES, meta_autocast

BF16 = torch.bfloat16


def _registered(key: str) -> set[str]:
    return {
        name.removeprefix("aten::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    }


@pytest.mark.parametrize("policies, key", [(CPU_POLICIES, "AutocastCPU"), (CUDA_POLICIES, "AutocastCUDA")])
def test_the_tables_name_exactly_the_ops_torch_registers_for_autocast(policies, key):
    assert set(policies.entries()) == _registered(key)
    assert torch.__version__.startswith("2.13") and "torch 2.13" in policies.source


# name -> (the call, how many tensor inputs it takes, their shapes) — inputs are made by the test.
def _g(*shape, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.rand(*shape, generator=generator).to(dtype).to(device)


def _spd(n, dtype, device):
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(n))
    return (a @ a.T + n * torch.eye(n)).to(dtype).to(device)


SAMPLES = {
    # lower_precision_fp
    "conv1d": (lambda a, b: F.conv1d(a, b), [(1, 2, 5), (3, 2, 2)]),
    "conv2d": (lambda a, b: F.conv2d(a, b), [(1, 2, 5, 5), (3, 2, 2, 2)]),
    "conv3d": (lambda a, b: F.conv3d(a, b), [(1, 2, 4, 4, 4), (3, 2, 2, 2, 2)]),
    "conv1d.padding": (lambda a, b: F.conv1d(a, b, padding="same"), [(1, 2, 5), (3, 2, 3)]),
    "conv2d.padding": (lambda a, b: F.conv2d(a, b, padding="same"), [(1, 2, 5, 5), (3, 2, 3, 3)]),
    "conv3d.padding": (lambda a, b: F.conv3d(a, b, padding="same"), [(1, 2, 4, 4, 4), (3, 2, 3, 3, 3)]),
    "conv_transpose1d": (lambda a, b: F.conv_transpose1d(a, b), [(1, 2, 5), (2, 3, 2)]),
    "conv_transpose2d.input": (lambda a, b: F.conv_transpose2d(a, b), [(1, 2, 5, 5), (2, 3, 2, 2)]),
    "conv_transpose3d.input": (lambda a, b: F.conv_transpose3d(a, b), [(1, 2, 3, 3, 3), (2, 3, 2, 2, 2)]),
    "conv_tbc": (lambda a, b, c: torch.conv_tbc(a, b, c), [(5, 1, 2), (2, 2, 3), (3,)]),
    "bmm": (torch.bmm, [(2, 3, 4), (2, 4, 5)]),
    "mm": (torch.mm, [(3, 4), (4, 5)]),
    "matmul": (lambda a, b: a @ b, [(3, 4), (4, 5)]),
    "linalg_vecdot": (torch.linalg.vecdot, [(3, 4), (3, 4)]),
    "baddbmm": (torch.baddbmm, [(2, 3, 5), (2, 3, 4), (2, 4, 5)]),
    "addmm": (torch.addmm, [(3, 5), (3, 4), (4, 5)]),
    "_addmm_activation": (torch._addmm_activation, [(3, 5), (3, 4), (4, 5)]),
    "addbmm": (torch.addbmm, [(3, 5), (2, 3, 4), (2, 4, 5)]),
    "linear": (F.linear, [(3, 4), (5, 4), (5,)]),
    "prelu": (F.prelu, [(2, 3, 4), (3,)]),
    "scaled_dot_product_attention": (F.scaled_dot_product_attention, [(1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4)]),
    # fp32
    "avg_pool3d": (lambda a: F.avg_pool3d(a, 2), [(1, 1, 4, 4, 4)]),
    "max_pool3d": (lambda a: F.max_pool3d(a, 2), [(1, 1, 4, 4, 4)]),
    "adaptive_avg_pool3d": (lambda a: F.adaptive_avg_pool3d(a, 2), [(1, 1, 4, 4, 4)]),
    "adaptive_max_pool3d": (lambda a: F.adaptive_max_pool3d(a, 2), [(1, 1, 4, 4, 4)]),
    "binary_cross_entropy": (lambda a, b: F.binary_cross_entropy(a, b), [(3, 4), (3, 4)]),
    "binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits, [(3, 4), (3, 4)]),
    "mse_loss": (F.mse_loss, [(3, 4), (3, 4)]),
    "l1_loss": (F.l1_loss, [(3, 4), (3, 4)]),
    "smooth_l1_loss": (F.smooth_l1_loss, [(3, 4), (3, 4)]),
    "huber_loss": (F.huber_loss, [(3, 4), (3, 4)]),
    "kl_div": (lambda a, b: F.kl_div(a, b, reduction="batchmean"), [(3, 4), (3, 4)]),
    "soft_margin_loss": (F.soft_margin_loss, [(3, 4), (3, 4)]),
    "margin_ranking_loss": (F.margin_ranking_loss, [(4,), (4,), (4,)]),
    "hinge_embedding_loss": (F.hinge_embedding_loss, [(3, 4), (3, 4)]),
    "cosine_embedding_loss": (F.cosine_embedding_loss, [(3, 4), (3, 4), (3,)]),
    "triplet_margin_loss": (F.triplet_margin_loss, [(3, 4), (3, 4), (3, 4)]),
    "poisson_nll_loss": (F.poisson_nll_loss, [(3, 4), (3, 4)]),
    "cross_entropy_loss": (lambda a: F.cross_entropy(a, torch.tensor([0, 2, 1], device=a.device)), [(3, 4)]),
    "nll_loss": (lambda a: F.nll_loss(a, torch.tensor([0, 2, 1], device=a.device)), [(3, 4)]),
    "multi_margin_loss": (lambda a: F.multi_margin_loss(a, torch.tensor([0, 2, 1], device=a.device)), [(3, 4)]),
    "cdist": (torch.cdist, [(3, 4), (2, 4)]),
    "prod": (torch.prod, [(3, 4)]),
    "prod.dim_int": (lambda a: torch.prod(a, 1), [(3, 4)]),
    "trace": (torch.trace, [(3, 3)]),
    "polar": (torch.polar, [(3,), (3,)]),
    "view_as_complex": (torch.view_as_complex, [(3, 2)]),
    "fft_fft": (torch.fft.fft, [(8,)]),
    "fft_ifft": (torch.fft.ifft, [(8,)]),
    "fft_rfft": (torch.fft.rfft, [(8,)]),
    "fft_fft2": (torch.fft.fft2, [(4, 4)]),
    "fft_rfftn": (torch.fft.rfftn, [(4, 4)]),
    "fft_hfft": (torch.fft.hfft, [(8,)]),
    "fft_ihfft": (torch.fft.ihfft, [(8,)]),
    "reflection_pad1d": (lambda a: torch._C._nn.reflection_pad1d(a, (1, 1)), [(1, 2, 4)]),
    "reflection_pad2d": (lambda a: torch._C._nn.reflection_pad2d(a, (1, 1, 1, 1)), [(1, 2, 4, 4)]),
    "replication_pad1d": (lambda a: torch._C._nn.replication_pad1d(a, (1, 1)), [(1, 2, 4)]),
    "replication_pad2d": (lambda a: torch._C._nn.replication_pad2d(a, (1, 1, 1, 1)), [(1, 2, 4, 4)]),
    "replication_pad3d": (lambda a: torch._C._nn.replication_pad3d(a, (1,) * 6), [(1, 1, 3, 3, 3)]),
    "grid_sampler": (lambda a, b: F.grid_sample(a, b * 2 - 1, align_corners=False), [(1, 1, 4, 4), (1, 2, 2, 2)]),
    "inverse": ("spd", torch.inverse),
    "linalg_inv": ("spd", torch.linalg.inv),
    "linalg_cholesky": ("spd", torch.linalg.cholesky),
    "cholesky": ("spd", torch.cholesky),
    "linalg_eigvalsh": ("spd", torch.linalg.eigvalsh),
    "linalg_svdvals": ("spd", torch.linalg.svdvals),
    "pinverse": ("spd", torch.pinverse),
    "linalg_qr": ("spd", lambda a: torch.linalg.qr(a)),
    "linalg_svd": ("spd", lambda a: torch.linalg.svd(a)),
    "linalg_eigh": ("spd", lambda a: torch.linalg.eigh(a)),
    "linalg_solve": ("spd", lambda a: torch.linalg.solve(a, a)),
    "linalg_cond": ("spd", torch.linalg.cond),
    "fft_fftn": (torch.fft.fftn, [(4, 4)]),
    "fft_ifft2": (torch.fft.ifft2, [(4, 4)]),
    "fft_ifftn": (torch.fft.ifftn, [(4, 4)]),
    "fft_irfft": (torch.fft.irfft, [(8,)]),
    "fft_irfft2": (torch.fft.irfft2, [(4, 4)]),
    "fft_irfftn": (torch.fft.irfftn, [(4, 4)]),
    "fft_rfft2": (torch.fft.rfft2, [(4, 4)]),
    "stft": (lambda a: torch.stft(a, 4, return_complex=True), [(16,)]),
    "nll_loss2d": (lambda a: F.nll_loss(a, torch.zeros(1, 2, 2, dtype=torch.long, device=a.device)), [(1, 3, 2, 2)]),
    "multilabel_margin_loss": (
        lambda a: F.multilabel_margin_loss(a, torch.tensor([[1, -1, 0, 0]] * 3, device=a.device)),
        [(3, 4)],
    ),
    "qr": ("spd", torch.qr),
    "svd": ("spd", torch.svd),
    "linalg_eig": ("spd", lambda a: torch.linalg.eig(a)),
    "linalg_eigvals": ("spd", torch.linalg.eigvals),
    "linalg_inv_ex": ("spd", lambda a: torch.linalg.inv_ex(a)),
    "linalg_cholesky_ex": ("spd", lambda a: torch.linalg.cholesky_ex(a)),
    "linalg_lstsq": ("spd", lambda a: torch.linalg.lstsq(a, a)),
    "cholesky_solve": ("spd", lambda a: torch.cholesky_solve(a, a)),
    "cholesky_inverse": ("spd", torch.cholesky_inverse),
    "linalg_tensorinv": ("spd", lambda a: torch.linalg.tensorinv(a, ind=1)),
    "quantile": (lambda a: torch.quantile(a, 0.5), [(8,)]),
    "nanquantile": (lambda a: torch.nanquantile(a, 0.5), [(8,)]),
    # promote
    "cat": (lambda a, b: torch.cat([a, b]), [(2, 3), (2, 3)]),
    "stack": (lambda a, b: torch.stack([a, b]), [(2, 3), (2, 3)]),
    "index_copy": (lambda a, b: a.index_copy(0, torch.tensor([1, 0], device=a.device), b), [(3, 2), (2, 2)]),
}


def _inputs(sample, dtypes: list[torch.dtype], device: str) -> list[torch.Tensor]:
    if sample[0] == "spd":
        return [_spd(3, dtypes[0], device)]
    return [_g(*shape, dtype=dtype, device=device) for shape, dtype in zip(sample[1], dtypes)]


def _call(sample):
    return sample[1] if sample[0] == "spd" else sample[0]


def _float_dtypes(out) -> list[torch.dtype]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.dtype for o in outs if isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex())]


def _input_dtypes(policy: str, n: int) -> list[torch.dtype]:
    """lower: float32 inputs (autocast must lower them); fp32: bf16 inputs; promote: a bf16 and float32 ones."""
    if policy == "lower_precision_fp":
        return [torch.float32] * n
    if policy == "fp32":
        return [BF16] * n
    return [BF16] + [torch.float32] * (n - 1)


def _expected(call, policy: str, n: int, sample) -> list[torch.dtype]:
    """The dtypes the op gives, without autocast, on the inputs autocast hands it."""
    dtypes = {"lower_precision_fp": [BF16] * n, "fp32": [torch.float32] * n, "promote": [torch.float32] * n}[policy]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _float_dtypes(call(*_inputs(sample, dtypes, "cpu")))


@pytest.mark.parametrize("entry", sorted(SAMPLES))
def test_a_cpu_list_entry_casts_as_listed_and_the_emulation_on_meta_does_the_same(entry):
    policy = CPU_POLICIES.entries()[entry]
    sample = SAMPLES[entry]
    call = _call(sample)
    n = 1 if sample[0] == "spd" else len(sample[1])
    dtypes = _input_dtypes(policy, n)
    expected = _expected(call, policy, n, sample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=BF16):
            real = _float_dtypes(call(*_inputs(sample, dtypes, "cpu")))
        assert real == expected and real, (entry, policy, real, expected)
        if policy != "promote":  # the cast is what did it (cat & co. promote by themselves too)
            try:
                without = _float_dtypes(call(*_inputs(sample, dtypes, "cpu")))
            except (NotImplementedError, RuntimeError):  # e.g. no bf16 kernel: why the op is on the fp32 list
                without = None
            assert without != expected
        with meta_autocast(CPU_POLICIES), torch.autocast("meta", dtype=BF16):
            try:
                emulated = _float_dtypes(call(*_inputs(sample, dtypes, "meta")))
            except (NotImplementedError, RuntimeError) as exc:
                if "meta" not in str(exc).lower():
                    raise
                pytest.skip(f"{entry} has no meta kernel in this torch: {str(exc).splitlines()[0]}")
    assert emulated == expected, (entry, policy, emulated, expected)


def test_every_cpu_entry_with_a_python_entry_point_has_a_sample():
    without = set(CPU_POLICIES.entries()) - set(SAMPLES)
    # internals, RNN/MHA fast paths, named overloads and the rarer linalg/fft variants: registration-checked only
    assert len(SAMPLES) >= 95 and len(without) <= 32, sorted(without)


def test_the_emulation_with_the_cuda_lists_casts_the_workloads_ops():
    x = torch.randn(4, 6, device="meta", requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5, 6, device="meta"))
    target = torch.zeros(4, dtype=torch.long, device="meta")
    with meta_autocast(CUDA_POLICIES), torch.autocast("meta", dtype=BF16):
        assert torch.get_autocast_dtype("meta") == BF16 and torch.is_autocast_enabled("meta")
        h = F.linear(x, w)
        assert h.dtype == BF16
        assert F.layer_norm(h, (5,)).dtype == torch.float32  # fp32 on CUDA (not listed on CPU)
        assert h.pow(2).dtype == torch.float32 and torch.cat([h, h]).dtype == BF16  # cat is CPU's promote only
        assert h.sum().dtype == torch.float32 and h.softmax(-1).dtype == torch.float32  # fp32_set_opt_dtype
        assert F.cross_entropy(h, target, reduction="none").dtype == torch.float32
        with torch.autocast("meta", enabled=False):
            assert not torch.is_autocast_enabled("meta") and F.linear(x, w).dtype == torch.float32
        assert F.linear(x, w).dtype == BF16
    assert not torch.amp.is_autocast_available("meta")  # the session is over


def test_the_weight_cache_lives_for_the_outermost_region():
    w = torch.nn.Parameter(torch.randn(5, 6, device="meta"))
    x = torch.randn(4, 6, device="meta")
    with meta_autocast(CUDA_POLICIES):
        with torch.autocast("meta", dtype=BF16):
            casts = []
            mode = ae._ACTIVE[0].mode
            first = mode.caster(BF16)(w)
            casts.append(first)
            with torch.autocast("meta", dtype=BF16):  # nested: the same cache
                assert mode.caster(BF16)(w) is first
            assert mode.caster(BF16)(w) is first
            assert mode.caster(BF16)(x) is not mode.caster(BF16)(x)  # not a leaf requiring grad: no cache
            with torch.autocast("meta", dtype=BF16, cache_enabled=False):
                assert mode.caster(BF16)(w) is not first
        assert not ae._ACTIVE[0].cache  # cleared when the outermost region exited
        with torch.autocast("meta", dtype=BF16):
            assert ae._ACTIVE[0].mode.caster(BF16)(w) is not first


def test_cuda_bans_binary_cross_entropy_and_a_session_is_not_reentrant():
    p = torch.rand(3, device="meta")
    with meta_autocast(CUDA_POLICIES):
        with torch.autocast("meta", dtype=torch.float16), pytest.raises(RuntimeError, match="unsafe to autocast"):
            F.binary_cross_entropy(p, p)
        with pytest.raises(RuntimeError, match="already active"), meta_autocast():
            pass


def test_an_unsupported_dtype_disables_a_meta_region_as_torch_does_on_cpu():
    """Opacus' functorch sampler enters autocast with an embedding's int64 ids' dtype."""
    with (
        meta_autocast(CUDA_POLICIES),
        pytest.warns(UserWarning, match="Disabling autocast"),
        torch.amp.autocast(device_type="meta", dtype=torch.int64),
    ):
        assert not torch.is_autocast_enabled("meta")


def test_op_name_matches_python_calls_to_their_aten_op():
    assert ae.op_name(torch.Tensor.__matmul__) == ("matmul", None)
    assert ae.op_name(torch.Tensor.__rpow__) == ("pow", None)
    assert ae.op_name(torch.Tensor.__iadd__) is None
    assert ae.op_name(F.cross_entropy) == ("cross_entropy_loss", None)
    assert ae.op_name(torch.ops.aten.pow.Tensor_Scalar) == ("pow", "Tensor_Scalar")


def test_the_functorch_front_rules_are_the_listed_ops_functorch_decomposes_above_autocast():
    listed = {entry.split(".")[0] for policies in (CPU_POLICIES, CUDA_POLICIES) for entry in policies.entries()}
    assert set(ae.FUNCTORCH_FRONT) == _registered("FuncTorchDynamicLayerFrontMode") & listed


class _OpLog(TorchDispatchMode):
    """Every op below all layers: its name and the (dtype, shape) of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [
            [(t.dtype, tuple(t.shape)) for t in tree_leaves(x) if isinstance(t, torch.Tensor)] for x in (args, out)
        ]
        self.ops.append(f"{func} {shapes[0]} -> {shapes[1]}")
        return out


def _attention_block(p, x, target):
    """The workloads' shapes of use: linear on 2-D and 3-D inputs with and without bias, the math attention
    kernel (causal and not) the meta cases route to, a weight used twice, layer_norm, cross_entropy."""
    h = F.linear(x, p["w_in"], p["b_in"])  # (T, D) per sample
    qkv = F.linear(h.unsqueeze(0), p["w_qkv"], p["b_qkv"])  # 3-D, bias
    q, k, v = qkv.view(1, x.shape[0], 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
    a = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, True, None, scale=None)[0]
    a = a + torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.0, False, None, scale=0.3)[0]
    h = F.linear(a.transpose(1, 2).reshape(x.shape[0], -1), p["w_in"].t())  # no bias, a 2-D input
    # the weight used twice; layer_norm on float32 (on bf16, CPU's kernel keeps float32 statistics, meta's bf16)
    h = F.layer_norm((h + F.linear(h, p["w_out"]) + F.linear(h, p["w_out"])).float(), h.shape[-1:])
    return F.cross_entropy(h, target)


def _ops_of(device: str, transform: str) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"w_in": (8, 6), "b_in": (8,), "w_qkv": (24, 8), "b_qkv": (24,), "w_out": (6, 6)}
    params = {n: torch.randn(s, generator=generator).to(device) for n, s in shapes.items()}
    params["w_out"] = params["w_out"][:, :6].contiguous()
    batch_x = torch.randn(2, 5, 6, generator=generator).to(device)
    batch_target = torch.randint(0, 6, (2, 5), generator=generator).to(device)

    def loss(p, x, target):
        with torch.autocast(device, dtype=BF16):
            return _attention_block(p, x, target)

    with _OpLog() as log:
        if transform == "vmap(grad)":
            vmap(grad(loss), in_dims=(None, 0, 0))(params, batch_x, batch_target)
        elif transform == "grad":
            grad(loss)(params, batch_x[0], batch_target[0])
        elif transform == "vmap":  # leaves that require grad, the backward outside the transform
            leaves = {n: p.requires_grad_() for n, p in params.items()}
            vmap(loss, in_dims=(None, 0, 0))(leaves, batch_x, batch_target).sum().backward()
        else:
            leaves = {n: p.requires_grad_() for n, p in params.items()}
            loss(leaves, batch_x[0], batch_target[0]).backward()
    return log.ops


def test_a_listed_op_on_batched_tensors_with_vmap_innermost_is_refused():
    """There the batching layer runs before autocast and decomposes some listed ops (addmm into mm, a scaled
    bias and an add, only mm cast): not emulated (no method autocasts inside vmap without grad)."""
    refused = pytest.raises(NotImplementedError, match=r"inside torch\.func\.vmap with no grad transform")
    with refused, warnings.catch_warnings(), meta_autocast(CPU_POLICIES):
        warnings.simplefilter("ignore")
        _ops_of("meta", "vmap")


@pytest.mark.parametrize("transform", ["none", "grad", "vmap(grad)"])
def test_the_emulation_makes_the_ops_cpu_autocast_makes_under_torch_func(transform):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = _ops_of("cpu", transform)
        with meta_autocast(CPU_POLICIES):
            emulated = _ops_of("meta", transform)
    assert any("_to_copy" in op for op in real)
    assert emulated == real
