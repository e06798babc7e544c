"""Autocast on the meta device, emulated above autograd, with a device's op lists as versioned data.

Autocast is a dispatch key that sits above autograd: for an op on its lists it casts the op's tensor arguments
(the casts are autograd ops, so the backward casts the gradients back) and runs the op below itself. Meta tensors
have no autocast key, and torch's CPU and CUDA autocast cast only their own device's tensors, so on meta an
``amp-*`` forward would silently run in fp32. This module makes ``meta`` an autocast device while a
:func:`meta_autocast` session is active:

* **the context manager is torch's own.** ``torch.autocast``/``torch.amp.autocast`` run unchanged for
  ``device_type="meta"``: the session answers the calls they make for that device (``is_autocast_available``,
  ``is_autocast_enabled``, ``get_autocast_dtype``, ``set_autocast_enabled``, ``set_autocast_dtype``) from its own
  state, and ``clear_autocast_cache`` also clears its cache. So the nesting counter, the cache flag
  (``torch.is_autocast_cache_enabled``) and the cache's lifetime (cleared when the outermost autocast region of
  any device exits) are torch's; ``autocast(enabled=False)`` regions nest inside; ``torch.utils.checkpoint``
  captures the state at the forward and re-enters it for the recompute; a library entering
  ``torch.amp.autocast(device_type=<its input's device>)`` (Opacus' functorch sampler) gets the emulation on
  meta. One difference from CUDA: for a target dtype autocast does not support (Opacus asks for int64, the dtype
  of an embedding's ids), torch's ``__init__`` disables a meta region with its warning, as it does on CPU,
  where CUDA keeps it enabled; no listed op runs in such a region of an embedding (only the lookup, a product
  and a ``sum`` of fp32 tensors, which fp32_set_opt_dtype leaves fp32), so the tensors are the same.
* **the casts** are made by :class:`AutocastEmulation`, a ``TorchFunctionMode`` on the stack while emulated
  autocast is enabled. Each torch call is matched to the aten op it is (an ``OpOverload`` by its schema name;
  a Python-level function or ``Tensor`` method by its name, ``__matmul__`` as ``matmul``; the few Python
  functions named otherwise than their op in :data:`PYTHON_NAMES`) and cast as autocast_mode.h's policies do
  (``WrapFunction_``):

  - ``lower_precision_fp``: every eligible tensor argument (a floating meta tensor, not float64, in a list or
    not) not of the autocast dtype is cast to it;
  - ``fp32``: every eligible tensor not float32 is cast to float32;
  - ``fp32_set_opt_dtype``: the op's ``dtype`` argument is set to float32 when it was not given and the first
    argument is eligible (no cast: the kernel reads the low-precision input);
  - ``fp32_append_dtype``: ``norm`` is redispatched to its ``dtype`` overload with float32;
  - ``promote``: eligible tensors are cast to the widest floating type among them (float32 if any is);
  - banned: CUDA's ``binary_cross_entropy`` raises torch's own error.

  The **weight cache** is ``cached_cast``'s: a cast to the autocast dtype of a float32 leaf that requires grad
  and is not a view is made once per outermost autocast region (while ``torch.is_autocast_cache_enabled()``)
  and reused. Anything else falls through, as autocast's fallthrough kernel does.

The lists (:data:`CUDA_POLICIES`, :data:`CPU_POLICIES`) are torch 2.13's, from ``aten/src/ATen/autocast_mode.h``
(``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``) and ``autocast_mode.cpp``
(``TORCH_LIBRARY_IMPL(aten, AutocastCPU, m)`` and the CUDA-only additions), as documented in the AMP docs'
"Autocast Op Reference"; tests/dp/test_autocast_emulation.py checks them against the kernels this torch
registers for ``AutocastCPU`` and ``AutocastCUDA`` and each CPU entry's behaviour under real CPU autocast.
A meta case uses the CUDA lists (meta predicts a GPU); the CPU lists drive the fidelity test against CPU runs.

Where a torch-function mode sees less than the dispatcher: autocast also casts inside a composite op that is not
on its lists (the op falls through and its decomposition is dispatched again), while a torch-function mode sees
only the call a Python caller makes. Composites this matters for are rules of their own (:data:`COMPOSITES`):
``cross_entropy`` on CUDA, where ``cross_entropy_loss`` is not listed and decomposes into ``log_softmax`` in the
input dtype and a float32 ``nll_loss`` (also on CPU when ``torch.func.vmap`` is the innermost transform, whose
batching layer decomposes it before the Autocast key sees it), and the math attention kernel
(``_scaled_dot_product_attention_math``, which the meta cases route to for ``--attention math``), listed on
neither device: it upcasts half inputs to float32 and autocast casts its two matmuls back. ``torch.norm`` /
``Tensor.norm`` are ``linalg_vector_norm``, which torch 2.13 calls for strided tensors. Other unlisted
composites (``einsum`` on CPU, ``F.normalize``, ``F.interpolate``, ``F.pad`` in reflect mode) run uncast inside:
tests cover the workloads' ops, not every composite.

Under ``torch.func`` transforms (whole-model torch-func, Opacus' functorch sampler: ``vmap(grad(f))`` with the
autocast region inside ``f``) the layers are processed from the top, each by its own dispatch keys, and the
Autocast key is left enabled at every layer (DynamicLayer.cpp excludes it from the layers' key sets):

* functorch's front key, the highest, replaces ``linear`` by its own decomposition while any transform is active
  (:data:`FUNCTORCH_FRONT`, PyTorchOperatorHacks.cpp): ``addmm(bias, x, w.t())`` or ``matmul`` and an ``add``,
  whose parts autocast casts — so the weight is cast as the view ``w.t()``, never from the cache;
* a grad layer's autograd sits below autocast, so a cast there is recorded by the transform, as a mode's cast
  is; autocast's cache sees that layer's wrapper (a leaf that requires grad: cached per call), and a vmap
  layer's batching key sits above autocast, so below a vmap on top autocast meets the unwrapped tensor;
* with vmap innermost, its batching layer decomposes some listed ops before autocast (``addmm`` into ``mm``, a
  scaled bias and an ``add``): not emulated, a listed op on tensors batched there is an error naming it (no
  method autocasts inside vmap without grad).

Autocast's wrapper passes ``cached_cast(...)`` of each argument to the op, and GCC (torch's Linux wheels)
evaluates them right to left: the emulation casts the last argument first, which decides a peak that falls
between two casts. A tensor subclass with a ``__torch_function__`` of its own (Opacus' ExpandedWeight) handles a
call before the casts, as it would above the dispatcher.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

__all__ = [
    "CPU_POLICIES",
    "CUDA_POLICIES",
    "META_POLICIES",
    "POLICIES",
    "AutocastEmulation",
    "CastPolicies",
    "MetaGradScaler",
    "meta_autocast",
    "meta_autocast_active",
    "op_name",
]


@dataclass(frozen=True)
class CastPolicies:
    """One device's autocast lists: aten op names (``name`` or ``name.overload``) by cast policy."""

    device_type: str
    default_dtype: torch.dtype  # torch.get_autocast_dtype(device_type) when nothing set it
    source: str  # which torch and which files the lists were taken from
    lower_precision_fp: frozenset[str]
    fp32: frozenset[str]
    fp32_set_opt_dtype: frozenset[str] = frozenset()
    fp32_append_dtype: frozenset[str] = frozenset()
    promote: frozenset[str] = frozenset()
    banned: frozenset[str] = frozenset()
    _by_name: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for policy in ("lower_precision_fp", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned"):
            for entry in getattr(self, policy):
                self._by_name[entry] = policy
                self._by_name.setdefault(entry.split(".")[0], policy)

    def entries(self) -> dict[str, str]:
        """Every listed ``name[.overload]`` with its policy."""
        return {
            entry: policy
            for policy in ("lower_precision_fp", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned")
            for entry in sorted(getattr(self, policy))
        }

    def policy(self, name: str, overload: str | None) -> str | None:
        """The policy of aten op ``name`` (overload ``overload``; None: a Python-level call, any overload)."""
        if overload is None:
            return self._by_name.get(name)
        return self._by_name.get(name if overload == "default" else f"{name}.{overload}")


def _ops(names: str) -> frozenset[str]:
    return frozenset(names.split())


_SOURCE = (
    "torch 2.13.0: aten/src/ATen/autocast_mode.h (AT_FORALL_* lists) and aten/src/ATen/autocast_mode.cpp "
    "(TORCH_LIBRARY_IMPL(aten, Autocast{device}, m)); AMP docs, 'Autocast Op Reference'"
)

# CUDA: AT_FORALL_LOWER_PRECISION_FP plus cudnn_convolution(_transpose), AT_FORALL_FP32 (rms_norm added in
# 2.13), AT_FORALL_FP32_SET_OPT_DTYPE, the two norm redispatches, AT_FORALL_PROMOTE, binary_cross_entropy banned.
# Named-tensor (Dimname) overloads are left out: torch 2.13 registers none of them for AutocastCUDA.
CUDA_POLICIES = CastPolicies(
    device_type="cuda",
    default_dtype=torch.float16,
    source=_SOURCE.format(device="CUDA"),
    lower_precision_fp=_ops(
        """_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d.input
        conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm
        baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell
        rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
        cudnn_convolution cudnn_convolution_transpose"""
    ),
    fp32=_ops(
        """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
        pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm frobenius_norm.dim nuclear_norm
        nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
        hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
        multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
        dist pdist cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
        _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d
        upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa
        rms_norm"""
    ),
    fp32_set_opt_dtype=_ops(
        """prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm
        linalg_matrix_norm.str_ord sum sum.dim_IntList"""
    ),
    fp32_append_dtype=frozenset({"norm.Scalar", "norm.ScalarOpt_dim"}),
    promote=_ops("addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"),
    banned=frozenset({"binary_cross_entropy"}),
)

# CPU: TORCH_LIBRARY_IMPL(aten, AutocastCPU, m) in autocast_mode.cpp, policy by policy.
CPU_POLICIES = CastPolicies(
    device_type="cpu",
    default_dtype=torch.bfloat16,
    source=_SOURCE.format(device="CPU"),
    lower_precision_fp=_ops(
        """conv1d conv1d.padding conv2d conv2d.padding conv3d conv3d.padding bmm mm linalg_vecdot baddbmm addmm
        _addmm_activation addbmm linear _convolution.deprecated matmul conv_tbc mkldnn_rnn_layer conv_transpose1d
        conv_transpose2d.input conv_transpose3d.input prelu scaled_dot_product_attention
        _native_multi_head_attention"""
    ),
    fp32=_ops(
        """avg_pool3d binary_cross_entropy grid_sampler polar prod prod.dim_int quantile quantile.scalar nanquantile
        nanquantile.scalar stft stft.center cdist grid_sampler_2d _grid_sampler_2d_cpu_fallback grid_sampler_3d trace
        view_as_complex cholesky cholesky_inverse cholesky_solve inverse lu_solve orgqr ormqr pinverse max_pool3d
        max_unpool2d max_unpool3d adaptive_avg_pool3d reflection_pad1d reflection_pad2d replication_pad1d
        replication_pad2d replication_pad3d mse_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss
        poisson_nll_loss smooth_l1_loss cross_entropy_loss l1_loss huber_loss margin_ranking_loss soft_margin_loss
        triplet_margin_loss multi_margin_loss ctc_loss.IntList ctc_loss.Tensor kl_div multilabel_margin_loss
        binary_cross_entropy_with_logits fft_fft fft_ifft fft_fft2 fft_ifft2 fft_fftn fft_ifftn fft_rfft fft_irfft
        fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn fft_hfft fft_ihfft linalg_cond linalg_cond.p_str linalg_matrix_rank
        linalg_matrix_rank.tol_tensor linalg_matrix_rank.atol_rtol_tensor linalg_matrix_rank.atol_rtol_float
        linalg_solve linalg_cholesky linalg_svdvals linalg_eigvals linalg_eigvalsh linalg_inv
        linalg_householder_product linalg_tensorinv linalg_tensorsolve fake_quantize_per_tensor_affine geqrf
        _lu_with_info qr svd triangular_solve fractional_max_pool2d fractional_max_pool3d adaptive_max_pool3d
        multilabel_margin_loss_forward linalg_qr linalg_cholesky_ex linalg_svd linalg_eig linalg_eigh linalg_lstsq
        linalg_inv_ex"""
    ),
    promote=frozenset({"stack", "cat", "index_copy"}),
)

POLICIES: dict[str, CastPolicies] = {"cuda": CUDA_POLICIES, "cpu": CPU_POLICIES}

# Python-level functions whose aten op has another name (torch 2.13: F.cross_entropy calls
# torch._C._nn.cross_entropy_loss, F.grid_sample torch.grid_sampler; torch.norm and Tensor.norm call
# torch.linalg.vector_norm on strided tensors).
PYTHON_NAMES = {"cross_entropy": "cross_entropy_loss", "grid_sample": "grid_sampler", "norm": "linalg_vector_norm"}

# fp32_append_dtype: the overload each listed norm is redispatched to, with dtype=float32.
_NORM_WITH_DTYPE = {
    "norm.Scalar": lambda x, p=2: torch.ops.aten.norm.ScalarOpt_dtype(x, p, dtype=torch.float32),
    "norm.ScalarOpt_dim": lambda x, p, dim, keepdim=False: torch.ops.aten.norm.ScalarOpt_dim_dtype(
        x, p, dim, keepdim, dtype=torch.float32
    ),
}


def op_name(func) -> tuple[str, str | None] | None:
    """(aten op name, overload or None) of a torch call as a torch-function mode sees it; None for in-place
    dunders (``__iadd__``), which autocast never casts."""
    if isinstance(func, torch._ops.OpOverload):
        return func._schema.name.split("::")[-1], func._overloadname
    if isinstance(func, torch._ops.OpOverloadPacket):
        return func._qualified_op_name.split("::")[-1], None
    name = getattr(func, "__name__", None)
    if not isinstance(name, str):
        return None
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i"):
            return None
        if name in ("rmatmul", "rpow"):
            name = name[1:]
    return PYTHON_NAMES.get(name, name), None


class _State:
    """The emulated ``meta`` autocast state of a session (torch's is thread-local; the backward of a meta step,
    where a checkpoint's recompute re-enters autocast, may run in an autograd worker thread, so it is shared)."""

    def __init__(self, policies: CastPolicies):
        self.policies = policies
        self.enabled = False
        self.dtype = policies.default_dtype
        self.cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.mode: AutocastEmulation | None = None


_PLAIN_TYPES = (Tensor, torch.nn.Parameter, torch.nn.Buffer)
_TENSOR_TORCH_FUNCTION = Tensor.__torch_function__


def _functorch_layers() -> list:
    """The active torch.func interpreters, outermost first (empty outside any transform)."""
    if torch._C._functorch.peek_interpreter_stack() is None:
        return []
    return retrieve_all_functorch_interpreters()


def _vmap_on_top() -> bool:
    top = torch._C._functorch.peek_interpreter_stack()
    return top is not None and top.key() == TransformType.Vmap


def _batched_on_top(t) -> bool:
    functorch = torch._C._functorch
    return (
        isinstance(t, Tensor)
        and functorch.is_batchedtensor(t)
        and functorch.maybe_get_level(t) == functorch.peek_interpreter_stack().level()
    )


def _met_by_autocast(t: Tensor) -> Tensor | None:
    """The tensor the Autocast key meets for ``t``, which decides ``cached_cast``'s cache: the functorch layers
    are processed from the top; a vmap layer's batching key sits above autocast, so its wrapper is removed and
    the op sent on; an autograd-based layer (grad, jvp) sits below the front key but above autocast, which runs
    there on that layer's wrapper. A tensor not wrapped at that layer is met as a fresh wrapper, which is no
    leaf that requires grad (None); below every layer autocast meets the plain tensor."""
    functorch = torch._C._functorch
    for interpreter in reversed(_functorch_layers()):
        wrapped_here = functorch.is_functorch_wrapped_tensor(t) and functorch.maybe_get_level(t) == interpreter.level()
        if interpreter.key() != TransformType.Vmap:
            return t if wrapped_here else None
        if wrapped_here:
            t = functorch.get_unwrapped(t)
    return t


def _eligible(t) -> bool:
    return isinstance(t, Tensor) and t.device.type == "meta" and t.is_floating_point() and t.dtype != torch.float64


class AutocastEmulation(TorchFunctionMode):
    """Cast a torch call's arguments as the Autocast key does, by the session's policies (module docstring)."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state
        self._policy_of: dict[int, tuple[object, str | None]] = {}  # id(func) -> (func, policy): funcs live long

    def _policy(self, func) -> str | None:
        known = self._policy_of.get(id(func))
        if known is not None and known[0] is func:
            return known[1]
        name = op_name(func)
        policy = None
        if name is not None:
            if name[0] in FUNCTORCH_FRONT:
                policy = "functorch-front"
            elif name[0] in COMPOSITES:
                policy = "composite"
            else:
                policy = self.state.policies.policy(*name)
        self._policy_of[id(func)] = (func, policy)
        return policy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        policy = self._policy(func) if self.state.enabled else None
        if policy is None:
            return func(*args, **kwargs)
        if any(t not in _PLAIN_TYPES and t.__torch_function__ is not _TENSOR_TORCH_FUNCTION for t in types):
            # A tensor subclass with a __torch_function__ of its own (Opacus' ExpandedWeight) handles the call
            # first, as it would above the dispatcher; the calls it makes come back here and are cast then.
            return NotImplemented
        return self._apply(policy, func, args, kwargs)

    def call(self, func, *args, **kwargs):
        """``func`` as a call from the dispatcher's top would be cast: how a decomposition's listed parts run."""
        policy = self._policy(func)
        return func(*args, **kwargs) if policy is None else self._apply(policy, func, args, kwargs)

    def _apply(self, policy: str, func, args, kwargs):
        state = self.state
        if policy == "functorch-front":
            # the functorch layers' front key runs these ops' own decompositions above every layer (and above
            # autocast) while a transform is active; outside one, the op is cast by its list entry, if any
            name = op_name(func)[0]
            if _functorch_layers():
                return FUNCTORCH_FRONT[name](self, *args, **kwargs)
            policy = state.policies.policy(name, None)
            if policy is None:
                return func(*args, **kwargs)
        if policy == "composite":
            # an op the lists do not name decomposes below autocast, whose parts are cast; a listed one is cast
            # as listed, unless vmap's batching layer (above the Autocast key) decomposes it first
            name = op_name(func)[0]
            listed = state.policies.policy(name, None)
            if listed is None or _vmap_on_top():
                return COMPOSITES[name](self, *args, **kwargs)
            policy = listed
        if _vmap_on_top() and any(_batched_on_top(t) for t in _flat(args, kwargs)):
            raise NotImplementedError(
                f"amp on meta: {op_name(func)[0]} inside torch.func.vmap with no grad transform inside it is not "
                "emulated (vmap's batching layer runs before autocast and decomposes some listed ops, addmm "
                "among them); run this case on cpu or cuda"
            )
        if policy == "lower_precision_fp":
            cast = self.caster(state.dtype)
            return _cast_call(func, cast, args, kwargs)
        if policy == "fp32":
            cast = self.caster(torch.float32)
            return _cast_call(func, cast, args, kwargs)
        if policy == "fp32_set_opt_dtype":
            first = args[0] if args else next(iter(kwargs.values()), None)
            given = "dtype" in kwargs or any(isinstance(a, torch.dtype) for a in args)
            if _eligible(first) and not given:
                kwargs = {**kwargs, "dtype": torch.float32}
            return func(*args, **kwargs)
        if policy == "fp32_append_dtype":
            name = op_name(func)
            key = name[0] if name[1] in (None, "default") else f"{name[0]}.{name[1]}"
            redispatch = _NORM_WITH_DTYPE.get(key)
            if redispatch is None or not args or not _eligible(args[0]):
                return func(*args, **kwargs)
            return redispatch(*args, **kwargs)
        if policy == "promote":
            cast = self.caster(self._widest(args, kwargs))
            return _cast_call(func, cast, args, kwargs)
        if policy == "banned":
            raise RuntimeError(
                "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast. Many models "
                "use a sigmoid layer right before the binary cross entropy layer. In this case, combine the two "
                "layers using torch.nn.functional.binary_cross_entropy_with_logits or torch.nn.BCEWithLogitsLoss. "
                "binary_cross_entropy_with_logits and BCEWithLogits are safe to autocast."
            )
        raise AssertionError(f"unknown autocast policy {policy!r}")

    def caster(self, dtype: torch.dtype) -> Callable[[object], object]:
        """``cached_cast(dtype, ·)``: eligible tensors of another dtype cast, leaf fp32 weights once per region."""
        state = self.state

        def cast(t):
            if not _eligible(t) or t.dtype == dtype:
                return t
            met = _met_by_autocast(t)
            cacheable = (
                met is not None
                and dtype == state.dtype
                and t.dtype == torch.float32
                and met.requires_grad
                and met.is_leaf
                and not met._is_view()
                and torch.is_autocast_cache_enabled()
            )
            if not cacheable:
                return t.to(dtype)
            hit = state.cache.get(id(t))
            if hit is not None and hit[0] is t:
                return hit[1]
            casted = t.to(dtype)
            state.cache[id(t)] = (t, casted)  # the source is held, so its id is not reused while cached
            return casted

        return cast

    def _widest(self, args, kwargs) -> torch.dtype:
        """autocast's ``promote_type``: float32 if any eligible argument is, else the autocast dtype."""
        widest = self.state.dtype
        for t in _flat(args, kwargs):
            if isinstance(t, Tensor) and t.device.type == "meta" and t.is_floating_point():
                if t.dtype == torch.float32:
                    widest = torch.float32
                elif t.dtype not in (torch.float64, self.state.dtype):
                    raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
        return widest


def _cast_call(func, cast: Callable[[object], object], args, kwargs):
    """``func`` on its arguments cast by ``cast`` (every element, and one level into lists and tuples — a
    TensorList — like ``cached_cast``'s overloads). Last argument first: autocast's wrapper passes
    ``cached_cast(...)`` of each argument to the op, and GCC, which builds torch's Linux wheels, evaluates a
    call's arguments right to left — which cast is made first decides a peak that falls between them."""
    cast_kwargs = {k: _map_one(cast, kwargs[k]) for k in reversed(list(kwargs))}
    cast_args = [_map_one(cast, v) for v in reversed(args)][::-1]
    return func(*cast_args, **{k: cast_kwargs[k] for k in kwargs})


def _map_one(fn, v):
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return type(v)(fn(x) for x in v)
    return fn(v)


def _flat(args, kwargs) -> Iterator[object]:
    for v in (*args, *kwargs.values()):
        yield from (v if isinstance(v, (list, tuple)) else (v,))


def _decomposed_cross_entropy(
    mode: AutocastEmulation,
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
):
    """``cross_entropy_loss`` decomposed before autocast sees it (:data:`COMPOSITES`): its decomposition
    (LossNLL.cpp, class-index targets, no label smoothing) runs ``log_softmax(input, class_dim, input.dtype)`` —
    the dtype given, so CUDA's fp32_set_opt_dtype keeps it, and CPU does not list it — then ``nll_loss_nd``,
    whose nll_loss/nll_loss2d cast to float32 on both."""
    if label_smoothing != 0.0 or target.is_floating_point():
        raise NotImplementedError(
            "amp on meta: cross_entropy with label smoothing or class-probability targets is not emulated "
            "(its CUDA autocast decomposition differs); run this case on cpu or cuda"
        )
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    class_dim = 0 if input.dim() == 1 else 1
    log_probs = torch.log_softmax(input, class_dim, dtype=input.dtype)
    cast = mode.caster(torch.float32)
    return torch._C._nn.nll_loss_nd(
        cast(log_probs), target, cast(weight), torch.nn._reduction.get_enum(reduction), ignore_index
    )


def _math_attention(
    mode: AutocastEmulation,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    dropout_mask=None,
    *,
    scale=None,
    enable_gqa=False,
):
    """``_scaled_dot_product_attention_math``, listed on neither device, decomposed as torch 2.13's composite
    does (attention.cpp; the op sequence checked against CPU autocast in tests/dp/test_autocast_emulation.py):
    half inputs upcast to float32, q and kᵀ each scaled by √scale, ``matmul(q, kᵀ)`` (+ the mask),
    ``_safe_softmax``, ``matmul(attn, v)``, the output and the weights cast back to the input dtype. Autocast
    casts the two matmuls (both lists: lower precision), so the weights are the autocast dtype."""
    if dropout_p > 0.0 or dropout_mask is not None:
        raise NotImplementedError(
            "amp on meta: math attention with dropout is not emulated; run this case on cpu or cuda"
        )
    if enable_gqa and query.shape[-3] != key.shape[-3]:
        raise NotImplementedError(
            "amp on meta: math attention with grouped-query heads is not emulated; run this case on cpu or cuda"
        )
    origin = query.dtype
    q, k, v = (t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t for t in (query, key, value))
    negative = scale is not None and scale < 0
    factor = math.sqrt(abs(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    q = torch.ops.aten.mul.Scalar(q, -factor if negative else factor)
    if is_causal:
        if attn_mask is not None:
            raise RuntimeError(
                "_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True"
            )
        keep = torch.ones((q.shape[-2], k.shape[-2]), dtype=torch.bool, device=q.device).tril()
        attn_mask = torch.where(keep, 0.0, torch.scalar_tensor(float("-inf"), dtype=q.dtype, device=q.device))
    attn = mode.call(torch.matmul, q, torch.ops.aten.mul.Scalar(k.transpose(-2, -1), factor))
    if attn_mask is not None:
        attn = attn.add(attn_mask)
    attn = torch._safe_softmax(attn, -1)
    weights = attn.to(origin)
    return mode.call(torch.matmul, attn, v).to(origin), weights


# Python-level calls of an op whose decomposition runs listed ops before autocast sees the op itself (a
# torch-function mode sees only the call): on a device that does not list the op, always (CUDA's
# cross_entropy_loss, math attention on both); where it is listed (CPU's cross_entropy_loss, fp32), when
# torch.func's vmap is the innermost transform, whose batching layer (above the Autocast key) decomposes it
# first (functorch's BatchRulesDecompositions.cpp); under a grad transform autocast meets the op itself.
COMPOSITES: dict[str, Callable] = {
    "cross_entropy_loss": _decomposed_cross_entropy,
    "_scaled_dot_product_attention_math": _math_attention,
}


def _functorch_linear(mode: AutocastEmulation, input, weight, bias=None):
    """``linear`` while a torch.func transform is active: functorch's front key (highest, above autocast and
    every layer) replaces it by its own decomposition (PyTorchOperatorHacks.cpp, ``linear_hack``) — ``addmm``
    for a 2-D input with bias (a contiguous 3-D one viewed as 2-D), else ``matmul`` then the bias added (out of
    place under vmap) — whose parts autocast then casts: the weight is cast as ``weight.t()``, a view, never
    from the cache."""
    if bias is not None and (input.dim() == 2 or (input.dim() == 3 and input.is_contiguous())):
        if input.dim() == 2:
            return mode.call(torch.addmm, bias, input, weight.t())
        rows, tokens, features = input.shape
        weight_t = weight.t()  # before the view: C++ evaluates the arguments right to left
        out = mode.call(torch.addmm, bias, input.view(rows * tokens, features), weight_t)
        return out.view(rows, tokens, out.shape[1])
    out = mode.call(torch.matmul, input, weight.t())
    if bias is None:
        return out
    if any(i.key() == TransformType.Vmap for i in _functorch_layers()):
        return out.add(bias)
    return out.add_(bias)


def _functorch_bce_with_logits(mode: AutocastEmulation, *args, **kwargs):
    raise NotImplementedError(
        "amp on meta: binary_cross_entropy_with_logits inside a torch.func transform (functorch decomposes it "
        "above autocast) is not emulated; run this case on cpu or cuda"
    )


# Ops functorch's front key decomposes above autocast while any transform is active (the registrations of
# torch 2.13's FuncTorchDynamicLayerFrontMode that autocast lists; tests check the set).
FUNCTORCH_FRONT: dict[str, Callable] = {
    "linear": _functorch_linear,
    "binary_cross_entropy_with_logits": _functorch_bce_with_logits,
}


# --- the session: "meta" as an autocast device for torch's own context manager -------------------------------

_SESSION_LOCK = threading.Lock()
_ACTIVE: list[_State] = []


def _is_meta(device_type) -> bool:
    return str(getattr(device_type, "type", device_type)) == "meta"


def _push_mode(state: _State) -> None:
    if state.mode is None:
        state.mode = AutocastEmulation(state)
        state.mode.__enter__()


def _pop_mode(state: _State) -> None:
    stack = _get_current_function_mode_stack()
    if state.mode is not None and stack and stack[-1] is state.mode:
        state.mode.__exit__(None, None, None)
        state.mode = None


# The lists a meta case autocasts by: CUDA's, since meta predicts a GPU (tests set CPU_POLICIES to compare a
# meta case with a real CPU one).
META_POLICIES: CastPolicies = CUDA_POLICIES


def meta_autocast_active() -> bool:
    """Whether a :func:`meta_autocast` session is active (``torch.autocast("meta")`` works)."""
    return bool(_ACTIVE)


class MetaGradScaler(torch.amp.GradScaler):
    """torch's GradScaler on meta. Its state is torch's, made by its own code: the scale (float32) and growth
    tracker (int32) scalars, a found-inf scalar and one per device in ``unscale_``. The one thing it cannot do
    on meta is read found-inf (``.item()``) to decide whether to skip the optimizer step; it steps, as a step
    whose gradients did not overflow does (a skipped step holds less: no update)."""

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        return optimizer.step(*args, **kwargs)


@contextmanager
def meta_autocast(policies: CastPolicies | None = None) -> Iterator[None]:
    """While active, ``torch.autocast(device_type="meta", ...)`` autocasts meta tensors by ``policies``
    (default :data:`META_POLICIES`). Not reentrant: one meta case at a time per process."""
    policies = META_POLICIES if policies is None else policies
    originals = {
        "is_autocast_available": torch.amp.autocast_mode.is_autocast_available,
        "is_autocast_enabled": torch.is_autocast_enabled,
        "get_autocast_dtype": torch.get_autocast_dtype,
        "set_autocast_enabled": torch.set_autocast_enabled,
        "set_autocast_dtype": torch.set_autocast_dtype,
        "clear_autocast_cache": torch.clear_autocast_cache,
    }
    state = _State(policies)

    def is_autocast_available(device_type: str) -> bool:
        return _is_meta(device_type) or originals["is_autocast_available"](device_type)

    def is_autocast_enabled(*args, **kwargs) -> bool:
        if (args and _is_meta(args[0])) or _is_meta(kwargs.get("device_type")):
            return state.enabled
        return originals["is_autocast_enabled"](*args, **kwargs)

    def get_autocast_dtype(device_type) -> torch.dtype:
        return state.dtype if _is_meta(device_type) else originals["get_autocast_dtype"](device_type)

    def set_autocast_enabled(*args) -> None:
        if len(args) == 2 and _is_meta(args[0]):
            state.enabled = bool(args[1])
            # the mode is on the stack while enabled; an inner disabled region leaves it there, inert, unless it
            # is on top (its own region), and the next enable finds it
            if state.enabled:
                _push_mode(state)
            else:
                _pop_mode(state)
            return
        originals["set_autocast_enabled"](*args)

    def set_autocast_dtype(device_type, dtype) -> None:
        if _is_meta(device_type):
            state.dtype = dtype
            return
        originals["set_autocast_dtype"](device_type, dtype)

    def clear_autocast_cache() -> None:
        state.cache.clear()
        originals["clear_autocast_cache"]()

    patches = {
        (torch.amp.autocast_mode, "is_autocast_available"): is_autocast_available,
        (torch.amp, "is_autocast_available"): is_autocast_available,
        (torch, "is_autocast_enabled"): is_autocast_enabled,
        (torch, "get_autocast_dtype"): get_autocast_dtype,
        (torch, "set_autocast_enabled"): set_autocast_enabled,
        (torch, "set_autocast_dtype"): set_autocast_dtype,
        (torch, "clear_autocast_cache"): clear_autocast_cache,
    }
    with _SESSION_LOCK:
        if _ACTIVE:
            raise RuntimeError("meta_autocast: a session is already active in this process")
        _ACTIVE.append(state)
        saved = {key: getattr(*key) for key in patches}
        for (owner, name), value in patches.items():
            setattr(owner, name, value)
    try:
        yield
    finally:
        with _SESSION_LOCK:
            for (owner, name), value in saved.items():
                setattr(owner, name, value)
            _ACTIVE.remove(state)
        state.enabled = False
        _pop_mode(state)
        state.cache.clear()
