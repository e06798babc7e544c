"""Running a case on the meta device: tensors with shapes and dtypes but no data, so nothing is allocated.

The fused step runs as usual under the tensor tracker and gives the exact live tensor bytes of any model at any
batch size (docs/meta-and-planner.md, "Paper-scale answers without a GPU"). Four pieces make that practical and honest:

* :class:`MetaOpCache` — a meta op costs no arithmetic, but many meta kernels are Python decompositions
  (layer norm backward, gelu, the foreach optimizer ops: 0.3–5 ms each), which made one DiT-XL/2 step take
  ~2 s. A *functional* op's output shapes, strides and dtypes are a function of its inputs' shapes, strides,
  dtypes and its other arguments, so the cache keys each functional op on exactly those and, on a repeat
  (every transformer block repeats the same ops), returns fresh meta tensors of the recorded layout instead
  of running the kernel again. An *in-place* op that mutates only its first argument (``add_``,
  ``_foreach_addcmul_``) and left its layout unchanged the first time returns that argument (or nothing, as
  its schema says) on a repeat. Always run for real: views and ops that change a layout in place (``t_``,
  ``resize_``), ``out=`` ops, ops on or returning non-meta tensors, results sharing a storage or whose
  storage is not exactly what a fresh tensor of that layout has. The cache sits *below* the tensor tracker,
  so the tracker sees each result as the new storage it is, and a repeated in-place op as the no-allocation
  it is.
* :func:`meta_model` — building a paper-size DiT on meta takes seconds (initialisers run as Python meta
  ops); a built model is kept per workload and each case gets a ``copy.deepcopy`` of it (tied parameters
  stay tied), which is what a fresh build would give: meta parameters hold no values.
* :class:`ValuedOpCache` — the op cache a case runs under, through which integer tensors enter with their
  values (bench/case/meta_values.py): the batch's ids, labels and what the step derives from them carry
  their CPU values, so value-dependent ops on them (Opacus ghost clipping's ``torch.unique`` of (sample, id)
  pairs, ``.item()``, ``nonzero``) run with their true results. The cache never caches an op on such a tensor.
* :func:`unsupported_reason` — an op whose result depends on the values of a tensor that has none (a float, or
  an integer that did not come from the batch: ``.item()``, ``.tolist()``, ``nonzero``, ``unique``,
  ``masked_select``) cannot run on meta; the case is then ``unsupported`` with the op named, and the other
  cases go on.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.case.meta_values import IntegerValuesMode, ValuedMetaTensor, needs_values, with_values
from bench.dp.trainable import apply_trainable, parse_trainable

__all__ = ["MetaOpCache", "ValuedOpCache", "meta_model", "unsupported_reason"]

# Non-tensor argument types whose value (not identity) decides an op's output layout.
_VALUE_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


_PLAIN_TENSORS = (Tensor, nn.Parameter)


class _Uncacheable(Exception):
    pass


def _layout_key(value: Any) -> Any:
    """What of an argument can decide an op's output layout: a meta tensor's shape, strides, dtype and offset, a
    plain value itself; anything else (a CPU tensor, a generator, an object) makes the call uncacheable."""
    if isinstance(value, Tensor):
        # is_meta makes no torch.device object (this runs for every tensor argument of every op); a subclass may
        # say where it lives otherwise (FakeTensor.device), so it is asked for its device; a ValuedMetaTensor's op
        # results depend on its values (bench/case/meta_values.py): never cached
        if type(value) in _PLAIN_TENSORS:
            meta = value.is_meta
        else:
            meta = value.device.type == "meta" and not isinstance(value, ValuedMetaTensor)
        if not meta or value.layout != torch.strided:
            raise _Uncacheable
        return (value.shape, value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return (type(value), *map(_layout_key, value))
    if isinstance(value, _VALUE_TYPES):
        return (type(value), value)
    raise _Uncacheable


def _output_template(out: Any, seen: set[int]) -> Any:
    """A description of ``out`` from which :func:`_fresh` rebuilds an equal result; _Uncacheable if it cannot."""
    if isinstance(out, Tensor):
        if out.device.type != "meta" or out.layout != torch.strided or out.storage_offset() != 0:
            raise _Uncacheable
        storage = out.untyped_storage()
        if id(storage) in seen:  # two results sharing one storage: fresh tensors would not
            raise _Uncacheable
        seen.add(id(storage))
        template = ("tensor", tuple(out.shape), out.stride(), out.dtype)
        if _fresh(template).untyped_storage().nbytes() != storage.nbytes():
            raise _Uncacheable
        return template
    if isinstance(out, (list, tuple)):
        return (type(out), tuple(_output_template(o, seen) for o in out))
    if isinstance(out, (int, float, bool, type(None))):
        return ("value", out)
    raise _Uncacheable


def _fresh(template: Any) -> Any:
    kind = template[0]
    if kind == "tensor":
        return torch.empty_strided(template[1], template[2], dtype=template[3], device="meta")
    if kind == "value":
        return template[1]
    return kind(_fresh(t) for t in template[1])


# Layouts are a pure function of the key, so every cache in the process shares one table (a case reuses what
# the cases before it learnt); it is emptied when it grows past this many entries.
_MAX_TEMPLATES = 200_000
_SHARED_TEMPLATES: dict[tuple, Any] = {}
_SHARED_KINDS: dict[int, str | None] = {}
_UNKNOWN = object()


class MetaOpCache(TorchDispatchMode):
    """Reuse the output layout of repeated functional meta ops (module docstring). Enter it *outside* the
    tensor tracker. ``failed_op`` names the last op that raised on meta (for :func:`unsupported_reason`)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in a frame that turns TorchDynamo off, for steps run under
        # torch.compile; no meta step is compiled, and that wrapper was ~6 % of a meta case's time.
        return False

    def __init__(self):
        super().__init__()
        if len(_SHARED_TEMPLATES) > _MAX_TEMPLATES:
            _SHARED_TEMPLATES.clear()
        self._templates = _SHARED_TEMPLATES
        self._kinds = _SHARED_KINDS
        self.hits = 0
        self.misses = 0
        self.failed_op: str | None = None

    def _kind(self, func) -> str | None:
        """ "functional", "inplace" (mutates only its first argument, returns it or nothing), or None. Keyed by
        ``id``: an OpOverload's ``__hash__`` is Python code, and overloads live as long as the process."""
        kind = self._kinds.get(id(func), _UNKNOWN)
        if kind is _UNKNOWN:
            kind = self._kinds[id(func)] = _op_kind(func)
        return kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func)
        key = None
        if kind is not None:
            try:
                key = (id(func), _layout_key(args), _layout_key(tuple(sorted(kwargs.items()))))
            except _Uncacheable:
                key = None
        if key is not None and key in self._templates:
            self.hits += 1
            template = self._templates[key]
            if kind == "functional":
                return _fresh(template)
            return args[0] if template == "self" else None
        try:
            out = func(*args, **kwargs)
        except Exception:
            self.failed_op = str(func.overloadpacket)
            raise
        if key is not None:
            self.misses += 1
            self._remember(key, kind, args, kwargs, out)
        return out

    def _remember(self, key: tuple, kind: str, args: tuple, kwargs: dict, out: Any) -> None:
        try:
            if kind == "functional":
                inputs = {id(t.untyped_storage()) for t in _tensors(args, kwargs)}
                if any(id(t.untyped_storage()) in inputs for t in _tensors(out, {})):
                    # an op that returns a view despite its schema (aten::_unsafe_view): never cache it
                    self._kinds[key[0]] = None
                    return
                self._templates[key] = _output_template(out, set())
            elif key[1:] == (_layout_key(args), _layout_key(tuple(sorted(kwargs.items())))):  # layout unchanged
                self._templates[key] = "self" if out is not None else "none"
        except _Uncacheable:
            pass


def _tensors(args: Any, kwargs: dict) -> list[Tensor]:
    """The tensors in ``args`` (a value, or lists/tuples of them) and ``kwargs``' values, one level deep."""
    found = []
    for value in (*(args if isinstance(args, (list, tuple)) else (args,)), *kwargs.values()):
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, Tensor):
                found.append(item)
    return found


def _op_kind(func) -> str | None:
    """How :class:`MetaOpCache` may treat ``func``, from its schema (see the module docstring)."""
    schema = func._schema
    if not schema.is_mutable:
        functional = bool(schema.returns) and all(r.alias_info is None for r in schema.returns)
        return "functional" if functional else None
    if torch.Tag.inplace_view in func.tags or "resize" in schema.name or schema.name.endswith("set_"):
        return None
    mutated = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    if mutated != [0] or schema.arguments[0].kwarg_only:
        return None
    first = schema.arguments[0].alias_info.before_set
    if len(schema.returns) > 1 or any(r.alias_info is None or r.alias_info.before_set != first for r in schema.returns):
        return None
    return "inplace"


class ValuedOpCache(MetaOpCache):
    """The op cache of a meta case, where integer tensors also enter with their values
    (:func:`bench.case.meta_values.with_values`): one dispatch mode, not two — a second Python mode costs every
    op of a step another dispatch (measured: ~0.6 s of a 4.5 s gpt2-large opacus-hooks meta case). The cache
    itself only ever sees and stores plain meta results (a factory's values are added after it)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return with_values(func, args, kwargs or {}, super().__torch_dispatch__(func, types, args, kwargs))


_TEMPLATES: dict[tuple, nn.Module] = {}
_TEMPLATES_LOCK = threading.Lock()


def meta_model(workload, trainable: str = "full") -> nn.Module:
    """A fresh meta-device model of ``workload`` (a deep copy of one built once per workload spec in this
    process; :meth:`models.Workload.build_model` if the model cannot be copied), for a fine-tuning ``trainable``
    already frozen and its LoRA adapters injected (bench/dp/trainable.py; ``prepare_model`` then leaves that
    part as it is): peft's injection costs more than a whole meta step of a paper-size DiT, once per template."""
    # The spec alone could name two different models (a bring-your-own workload registered again); the
    # factory's repr tells them apart (a partial of the built-ins' config, or a function's address).
    key = (workload.name, workload.seed, repr(workload.model_fn), trainable)
    with _TEMPLATES_LOCK:
        template = _TEMPLATES.get(key)
        if template is None:
            template = _TEMPLATES[key] = _built(workload, trainable)
    try:
        return copy.deepcopy(template)
    except Exception:  # a bring-your-own module that refuses deepcopy: build it again
        return _built(workload, trainable)


def _built(workload, trainable: str) -> nn.Module:
    with IntegerValuesMode():  # integer buffers (position ids) keep their values, wherever it is called
        model = workload.build_model("meta")
    apply_trainable(model, workload, parse_trainable(trainable))  # a refusal is the case's outcome, as before
    return model


# The Python call behind an aten op whose name says little.
_FRIENDLY_OPS = {"_local_scalar_dense": "Tensor.item() (aten::_local_scalar_dense)"}


def unsupported_reason(exc: BaseException, failed_op: str | None) -> str | None:
    """Why a case cannot run on meta, or None if ``exc`` is not a meta limitation (then it is a real error)."""
    if not needs_values(exc):
        return None
    text = str(exc).strip().splitlines()[0]
    if failed_op is None:
        op = "a Python-level conversion"
    else:
        name = failed_op.split(".")[-1]
        op = _FRIENDLY_OPS.get(name, f"aten::{name}")
    return (
        f"meta device: {op} needs tensor values, which meta tensors do not have (only integer tensors derived "
        f"from the batch keep theirs) ({type(exc).__name__}: {text}); run this case on cpu or cuda"
    )
