"""Integer tensors that keep their values on the meta device, so that value-dependent ops on ids run exactly.

A meta tensor has a shape and a dtype but no values, so an op whose *result shape* depends on values —
``torch.unique``, ``nonzero``, boolean indexing, ``.item()`` — cannot run on it. Yet on a meta case the values
that such ops read in practice are known: the batch is drawn on the CPU (token ids, class labels) and the
integer tensors a step derives from it (positions, (sample, id) pairs, masks) are small functions of it. Opacus'
ghost norm of an ``nn.Embedding`` is the case in point: it groups equal (sample, id) pairs with
``torch.unique(dim=0)``, and how many groups there are sizes the next tensors.

:class:`ValuedMetaTensor` is a meta tensor (its own meta storage, device ``meta`` wherever model code looks)
that also holds its values: a CPU tensor of the same layout. Its ``__torch_dispatch__`` runs every op on the
meta tensors as usual and, when *every* tensor input carries values (or is a CPU scalar), runs the op on the
values too; an integer or boolean result then carries the result's values. So:

* a data-independent op (``view``, ``cat``, ``==``, ``repeat_interleave``) gets its layout from the meta kernel,
  as every meta op does; a view shares its base's meta storage and its values share the base's CPU storage;
* a value-dependent op (the meta kernel refuses: :func:`needs_values`) is answered by the values: the result
  gets a fresh meta storage of the CPU result's exact layout and byte size; ``.item()`` returns the number;
* a result that touches a plain meta tensor (a float activation, a gradient) is plain meta, and so is every
  floating-point result: floats stay meta, and a value-dependent op on one stays unsupported naming the op;
* an in-place op that writes a plain meta value into a valued tensor makes its values (and its views')
  unknown from then on (:class:`_Knowledge`): an op that later needs them is unsupported, never wrong.

Values enter only through :func:`with_values` (a meta case's op cache, or :class:`IntegerValuesMode`): an
integer tensor moved from the CPU to meta
(``batch.to("meta")``, Opacus' ``torch.arange(n).to(device)``), or made on meta by a factory whose values
follow from its arguments (``torch.arange(T, device=...)``, ``zeros``, ``full``, ...; integer dtypes only: a
boolean factory makes a mask, such as a causal one, whose values no result shape depends on). Values are kept for
tensors whose storage holds at most :data:`MAX_VALUED_BYTES`: beyond that a result is plain meta (its bytes are
still counted; only an op that would need its values is unsupported), so a case never holds a large int tensor
(Opacus' expanded embedding index, B×T×D int64) on the host; views (``expand``) cost nothing and keep theirs.

The bytes are the meta tensors': the tensor tracker counts a ValuedMetaTensor by its meta storage, allocated and
freed exactly when a plain meta result would be (the CPU values are on another device, which it ignores).
The values make the op results of a ValuedMetaTensor depend on more than layouts, so :class:`MetaOpCache`
never caches an op that has one among its inputs (bench/case/meta_device.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MAX_VALUED_BYTES", "IntegerValuesMode", "ValuedMetaTensor", "needs_values", "with_values"]

# At most 128 MiB of values per storage on the host; the ids of a paper-size batch are far below (gpt2-large at
# batch 256: 2 MiB).
MAX_VALUED_BYTES = 1 << 27

# What torch says when a meta kernel needs tensor values (first line, lowercased substrings).
_NEEDS_VALUES_MESSAGES = (
    "cannot be called on meta tensors",
    "cannot copy out of meta tensor",
    "with meta tensors",
    "meta device type tensor",
    "a meta tensor without",
    "data-independent implementation does not exist",
)

_META = torch.device("meta")
_CPU = torch.device("cpu")


def needs_values(exc: BaseException) -> bool:
    """Whether ``exc`` is a meta kernel refusing an op because its result depends on tensor values."""
    text = str(exc).strip()
    first = text.splitlines()[0].lower() if text else ""
    return any(message in first for message in _NEEDS_VALUES_MESSAGES)


def _carries_values(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


class _Knowledge:
    """Whether the values of one meta storage's tensors are still known; shared by a tensor and its views."""

    __slots__ = ("known",)

    def __init__(self, known: bool = True) -> None:
        self.known = known


class ValuedMetaTensor(Tensor):
    """A meta tensor with its values: ``host_values`` (CPU, the same shape, strides and storage offset), valid
    while ``known``. See the module docstring."""

    host_values: Tensor | None
    knowledge: _Knowledge

    # Ops reach __torch_dispatch__ as aten ops; torch-function-level wrapping would turn float results into
    # ValuedMetaTensors without values.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, meta: Tensor, values: Tensor | None, knowledge: _Knowledge | None = None) -> ValuedMetaTensor:
        with no_dispatch():  # an alias of ``meta``: the same meta storage, no op seen by any mode
            tensor = Tensor._make_subclass(cls, meta)
        tensor.host_values = values
        tensor.knowledge = knowledge if knowledge is not None else _Knowledge(values is not None)
        return tensor

    @property
    def known(self) -> bool:
        return self.knowledge.known

    def __deepcopy__(self, memo: dict) -> ValuedMetaTensor:
        # Tensor.__deepcopy__ clones a meta tensor and insists on the same type, which an unknown one's clone
        # (plain meta) is not; the clone still goes through the dispatcher, as a meta tensor's copy does.
        if id(self) not in memo:
            copy = self.clone()
            memo[id(self)] = copy if isinstance(copy, ValuedMetaTensor) else ValuedMetaTensor(copy, None)
        return memo[id(self)]

    def tolist(self):  # not an aten op: Tensor.tolist refuses subclasses
        if self.known:
            return self.host_values.tolist()
        with no_dispatch():
            plain = self.view(self.shape)
        return plain.tolist()  # the error a plain meta tensor gives (the op cache names the op)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # A random draw is the device generator's, not ours to make on the host: its result has no values.
        known = torch.Tag.nondeterministic_seeded not in func.tags and all(
            _has_values(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        )
        try:
            with no_dispatch():
                meta_out = func(*args, **kwargs)
        except Exception as exc:
            if not (known and needs_values(exc)):
                raise
            return _answered_by_values(func, args, kwargs)
        if not known:
            _forget_written(func, args, kwargs)
            return meta_out
        if not _small(meta_out):
            _forget_written(func, args, kwargs)
            return _plain(meta_out, args, kwargs)
        with no_dispatch():
            values_out = func(*_values_of(args), **_values_of(kwargs))
        return _paired(meta_out, values_out, _valued_inputs(args, kwargs))


def _has_values(tensor: Tensor) -> bool:
    if isinstance(tensor, ValuedMetaTensor):
        return tensor.known
    return tensor.device == _CPU and tensor.dim() == 0  # a CPU scalar, which any device's op takes


def _values_of(tree: Any) -> Any:
    if isinstance(tree, ValuedMetaTensor):
        return tree.host_values
    if isinstance(tree, (list, tuple)):
        return type(tree)(_values_of(item) for item in tree)
    if isinstance(tree, dict):
        return {key: _values_of(value) for key, value in tree.items()}
    return tree


def _valued_inputs(args: Any, kwargs: dict) -> list[ValuedMetaTensor]:
    return [t for t in tree_leaves((args, kwargs)) if isinstance(t, ValuedMetaTensor)]


def _small(out: Any) -> bool:
    """Whether every integer result of an op is small enough to keep its values (MAX_VALUED_BYTES)."""
    return all(
        _storage_bytes(t) <= MAX_VALUED_BYTES
        for t in tree_leaves(out)
        if isinstance(t, Tensor) and _carries_values(t.dtype)
    )


def _storage_bytes(tensor: Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _forget_written(func, args: tuple, kwargs: dict) -> None:
    """The op wrote into its valued inputs without computing their new values: they (and their views) are unknown."""
    schema = func._schema
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = kwargs.get(argument.name) if argument.kwarg_only or index >= len(args) else args[index]
        for tensor in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(tensor, ValuedMetaTensor):
                tensor.knowledge.known = False


def _plain(out: Any, args: tuple, kwargs: dict) -> Any:
    """``out`` without values; a view of a valued input makes that input's values unknown (the view's writes
    would not reach them)."""
    inputs = {id(t.untyped_storage()): t for t in _valued_inputs(args, kwargs)}
    for tensor in tree_leaves(out):
        if isinstance(tensor, Tensor) and not isinstance(tensor, ValuedMetaTensor):
            base = inputs.get(id(tensor.untyped_storage()))
            if base is not None:
                base.knowledge.known = False
    return out


def _paired(meta_out: Any, values_out: Any, inputs: list[ValuedMetaTensor]) -> Any:
    """The meta kernel's results, each integer one carrying the values run's result (same structure)."""
    if isinstance(meta_out, (list, tuple)):
        return type(meta_out)(_paired(m, v, inputs) for m, v in zip(meta_out, values_out, strict=True))
    if not isinstance(meta_out, Tensor):
        return values_out if values_out is not None else meta_out  # a number: the values know it
    if isinstance(meta_out, ValuedMetaTensor) or not _carries_values(meta_out.dtype):
        return meta_out  # an input returned by an in-place op (its values were updated in place), or a float
    if tuple(meta_out.shape) != tuple(values_out.shape) or meta_out.dtype != values_out.dtype:
        raise RuntimeError(
            f"meta and CPU kernels disagree on a result: {tuple(meta_out.shape)} {meta_out.dtype} on meta, "
            f"{tuple(values_out.shape)} {values_out.dtype} on the CPU"
        )
    storage = meta_out.untyped_storage()
    for base in inputs:
        if base.untyped_storage() is storage:  # a view of a valued input: its values are a view of the base's
            shares = values_out.untyped_storage() is base.host_values.untyped_storage()
            if shares and _same_layout(meta_out, values_out):
                return ValuedMetaTensor(meta_out, values_out, base.knowledge)
            base.knowledge.known = False
            return meta_out
    return ValuedMetaTensor(meta_out, _laid_out_like(meta_out, values_out))


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()


def _laid_out_like(meta: Tensor, values: Tensor) -> Tensor:
    """``values`` in ``meta``'s strides and storage offset, so that views of both stay alike."""
    if _same_layout(meta, values):
        return values
    elements = meta.untyped_storage().nbytes() // meta.element_size()
    with no_dispatch():
        out = torch.empty(elements, dtype=values.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())
        return out.copy_(values)


def _answered_by_values(func, args: tuple, kwargs: dict) -> Any:
    """A value-dependent op on valued inputs: run on the values; each tensor result gets a meta twin."""
    with no_dispatch():
        values_out = func(*_values_of(args), **_values_of(kwargs))
    if func is torch.ops.aten._to_copy.default:
        return values_out  # .cpu() / .to("cpu"): a host copy, as a GPU run makes one
    cpu_inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.device == _CPU}
    return _twins(values_out, cpu_inputs)


def _twins(values_out: Any, cpu_inputs: set[int]) -> Any:
    if isinstance(values_out, (list, tuple)):
        return type(values_out)(_twins(v, cpu_inputs) for v in values_out)
    if not isinstance(values_out, Tensor) or id(values_out) in cpu_inputs:
        return values_out
    meta = meta_twin(values_out)
    if _carries_values(values_out.dtype) and _storage_bytes(values_out) <= MAX_VALUED_BYTES:
        return ValuedMetaTensor(meta, values_out)
    return meta


def meta_twin(values: Tensor) -> Tensor:
    """A meta tensor with ``values``' shape, strides, storage offset, dtype and storage byte size."""
    with no_dispatch():
        storage = torch.UntypedStorage(values.untyped_storage().nbytes(), device=_META)
        twin = torch.empty(0, dtype=values.dtype, device=_META)
        return twin.set_(storage, values.storage_offset(), values.shape, values.stride())


# --- where values enter: a CPU integer tensor moved to meta, or a factory on meta whose values its arguments fix ---

_aten = torch.ops.aten
# Factories computed on the CPU with the same arguments (device aside).
_FACTORIES = {
    id(op)
    for op in (
        _aten.arange.default,
        _aten.arange.start,
        _aten.arange.start_step,
        _aten.zeros.default,
        _aten.ones.default,
        _aten.full.default,
        _aten.scalar_tensor.default,
        _aten.eye.default,
        _aten.eye.m,
        _aten.tril_indices.default,
        _aten.triu_indices.default,
    )
}
# Factories shaped like their first argument (a meta tensor), filled with one value: the result's fill value.
_FILLED_LIKE = {
    id(_aten.zeros_like.default): lambda args: 0,
    id(_aten.ones_like.default): lambda args: 1,
    id(_aten.full_like.default): lambda args: args[1],
    id(_aten.new_zeros.default): lambda args: 0,
    id(_aten.new_ones.default): lambda args: 1,
    id(_aten.new_full.default): lambda args: args[2],
}
_TO_COPY = _aten._to_copy.default


_ENTRIES = _FACTORIES | set(_FILLED_LIKE) | {id(_TO_COPY)}


def with_values(func, args: tuple, kwargs: dict, out: Any) -> Any:
    """``out``, the result of ``func(*args, **kwargs)``, as a ValuedMetaTensor where values enter: an integer
    tensor moved from the CPU to meta, or an integer factory result on meta (module docstring); else ``out``.
    One set lookup for every other op: it runs on every op of a meta step."""
    key = id(func)
    if key not in _ENTRIES:
        return out
    if type(out) is not Tensor or out.device != _META or not _carries_values(out.dtype):
        return out
    if _storage_bytes(out) > MAX_VALUED_BYTES or (out.dtype == torch.bool and func is not _TO_COPY):
        # A boolean factory makes a mask (``torch.ones(T, T, dtype=bool).tril()``, causal attention): no
        # result shape depends on it, and valued, each layer's mask ops would run on the host, uncached.
        return out
    with no_dispatch():
        if func is _TO_COPY:
            source = args[0]
            if isinstance(source, ValuedMetaTensor) or source.device != _CPU:
                return out  # meta to meta: the subclass handled it, or a plain meta source has no values
            values = source.to(dtype=out.dtype, copy=True)  # .to(device) copies: the source may change
        elif key in _FACTORIES:
            values = func(*args, **{**kwargs, "device": _CPU, "pin_memory": None})
        else:
            values = torch.full(out.shape, _FILLED_LIKE[key](args), dtype=out.dtype)
    return ValuedMetaTensor(out, _laid_out_like(out, values))


class IntegerValuesMode(TorchDispatchMode):
    """:func:`with_values` on its own, for meta work outside a case (building a model on meta). A meta case
    gets the same from its op cache (bench/case/meta_device.py, :class:`ValuedOpCache`) instead: a second
    dispatch mode would cost every op of the step another Python dispatch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return with_values(func, args, kwargs, func(*args, **kwargs))
