"""Exact work counts of one step: floating-point operations and bytes moved, op by op, per phase and op class.

:class:`WorkCounter` is a ``TorchDispatchMode`` like the tensor tracker (bench/trackers/memory/tensors.py) and
is entered inside it, so it sees every aten op the tracker sees — on cpu, cuda and meta alike, the meta op
cache's repeats included (the cache sits below both modes: a cached op still reaches the counter first). Ops
reach Python dispatch *after* autograd and functorch: the backward's ops are counted as they run, torch.func's
vmap'd ops arrive as the batched (physical) ops, the per-sample loop's B passes as B passes.

Per op, from the shapes alone (so meta counts equal cpu counts for the same ops):

* **FLOPs.** ``matmul`` (mm, addmm, bmm, baddbmm, convolution and its backward) and ``attention`` (every SDPA
  kernel the ``--attention`` router can pick: efficient, flash, cudnn, flash-for-cpu, forward and backward) by
  torch's own formulas (``torch.utils.flop_counter.flop_registry``: 2·m·n·k per product; an attention forward
  is its two products Q·Kᵀ and P·V, its backward five — the recomputed scores plus four gradient products; a
  causal mask is not discounted, as in torch's counter). The math kernel is no op of its own: it decomposes
  into bmm/softmax ops, counted as those. ``elementwise`` ops (arithmetic, activations, random draws, in-place
  updates, the optimizer's foreach ops) count 1 FLOP per element written; *reductions* (sum, mean, norm,
  softmax, max, var …) 1 FLOP per element read. ``copy`` ops (copy_, clone, cat, _to_copy, index/gather/
  scatter, fill, zero_) count 0 FLOPs.
* **Bytes.** Each op's input tensors plus its output tensors (an in-place op's mutated arguments when it
  returns nothing), each at its distinct elements (a broadcast dimension, stride 0, counts once) × element
  size: the traffic of running every op as its own kernel, **with no fusion** and no cache reuse — an upper
  bound on a fused or compiled step's memory traffic. An in-place op that overwrites its destination without
  reading it (``copy_``, ``fill_``, ``zero_``, the in-place random draws) counts the destination once, as
  written: a copy moves its source's bytes in and its destination's out, whether it runs as ``clone`` or
  ``copy_``.
* Views and metadata ops (results aliasing an input without writing it: view, transpose, expand, detach,
  slicing …), allocations without a write (empty, empty_like) and ``set_`` (re-pointing a tensor at a storage)
  move 0 bytes, do no arithmetic and are not counted as ops (they launch no kernel). Everything else counts one
  op (the launch-overhead term).

Aggregation: per phase (the step's marks, :data:`bench.trackers.channel.PHASES`; ops before the first mark or
after ``"end"`` count as ``outside``) and per op class, and as *op groups*: every distinct (class, dtype,
FLOPs, bytes) with how many ops had it. Ops with the same aten overload and shapes fall in one group, so a
step has tens to hundreds of groups; a roofline time model (bench/plan/timemodel.py), which takes a max over
each op, is exact on the groups for any GPU given later. An op's dtype is its first floating-point input's
(its output's if it has none). The per-signature result is cached (op + input/output layouts), so an op
seen before costs one key build and a dict update.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from math import prod

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from bench.results.record import OP_CLASSES, WORK_PHASES, OpGroup, StepWork
from bench.trackers.channel import PHASES, PhaseMarker
from bench.trackers.memory.tensors import tensors_in

__all__ = ["WorkCounter", "counted", "op_work"]

_aten = torch.ops.aten
OUTSIDE = "outside"  # ops before the first phase mark or after "end"
assert (*PHASES, OUTSIDE) == WORK_PHASES, "record.WORK_PHASES must be channel.PHASES + outside"

# Kernels torch's registry lacks, with their arguments in the order its formulas take (q, k, v[, grad_out first]).
_CPU_FLASH = _aten._scaled_dot_product_flash_attention_for_cpu
_CPU_FLASH_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward
_ATTENTION_PACKETS = {
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._scaled_dot_product_efficient_attention_backward,
    _aten._scaled_dot_product_flash_attention_backward,
    _aten._scaled_dot_product_cudnn_attention_backward,
    _aten._flash_attention_forward,
    _aten._efficient_attention_forward,
    _aten._flash_attention_backward,
    _aten._efficient_attention_backward,
    _CPU_FLASH,
    _CPU_FLASH_BACKWARD,
}

# Reductions: 1 FLOP per element read (names of aten packets; "_foreach_norm" reduces each list entry).
_REDUCTIONS = frozenset(
    {
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "argmax",
        "argmin",
        "norm",
        "linalg_vector_norm",
        "_foreach_norm",
        "var",
        "var_mean",
        "std",
        "std_mean",
        "prod",
        "logsumexp",
        "_softmax",
        "_log_softmax",
        "_softmax_backward_data",
        "_log_softmax_backward_data",
        "native_layer_norm",
        "native_layer_norm_backward",
        "native_group_norm",
        "native_group_norm_backward",
        "native_batch_norm",
        "native_batch_norm_backward",
        "nll_loss_forward",
        "nll_loss_backward",
        "nll_loss2d_forward",
        "nll_loss2d_backward",
        "mse_loss",
        "mse_loss_backward",
        "cumsum",
        "any",
        "all",
        "dot",
        "vdot",
    }
)
# Data movement: 0 FLOPs, bytes only.
_COPIES = frozenset(
    {
        "copy_",
        "clone",
        "_to_copy",
        "cat",
        "stack",
        "index_select",
        "index",
        "index_put",
        "index_put_",
        "index_add",
        "index_add_",
        "gather",
        "scatter",
        "scatter_",
        "scatter_add",
        "scatter_add_",
        "embedding",
        "embedding_dense_backward",
        "fill",
        "fill_",
        "zero_",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "full_like",
        "new_zeros",
        "new_ones",
        "new_full",
        "constant_pad_nd",
        "repeat",
        "roll",
        "flip",
        "slice_scatter",
        "select_scatter",
        "as_strided_scatter",
        "masked_fill",
        "masked_fill_",
        "where",
        "lift_fresh_copy",
        "_unsafe_index",
        "_unsafe_index_put",
        "unfold_backward",
        "masked_scatter",
        "tril",
        "triu",
        "arange",
        "scalar_tensor",
        "_foreach_copy_",
        "_foreach_zero_",
        "nonzero",
        "unique_dim",
        "_unique2",
        "sort",
    }
)
# In-place ops that overwrite their destination without reading it: it counts once, as written.
_WRITE_ONLY = frozenset(
    {"copy_", "fill_", "zero_", "_foreach_copy_", "_foreach_zero_", "normal_", "uniform_", "bernoulli_", "random_"}
)
# Allocation without a write, and set_ (a tensor re-pointed at a storage: Tensor.__deepcopy__ does it on CPU and
# CUDA): no kernel, nothing moved.
_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_"})


def _is_view(func) -> bool:
    """Every result aliases an argument that the op does not write: a view or metadata op."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _written_arguments(func) -> tuple[int, ...]:
    """Positions of the arguments an op writes in place (``add_``'s self, ``_foreach_mul_``'s list)."""
    return tuple(i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write)


def _op_class(func) -> str | None:
    """The op class of an aten overload (record.OP_CLASSES), or None for a view / allocation (not an op)."""
    packet = func._overloadpacket
    if packet in _ATTENTION_PACKETS:
        return "attention"
    if packet in flop_registry:
        return "matmul"
    name = packet.__name__
    if name in _ALLOCATIONS or _is_view(func):
        return None
    if name in _COPIES:
        return "copy"
    return "elementwise"


def _distinct_bytes(t: Tensor) -> int:
    """Bytes of a tensor's distinct elements: a broadcast (stride-0) dimension counts once."""
    return prod(size for size, stride in zip(t.shape, t.stride(), strict=True) if stride != 0) * t.element_size()


def _shapes(args) -> list:
    return [tuple(a.shape) if isinstance(a, Tensor) else a for a in args]


def _registry_flops(func, args, kwargs, out) -> int:
    packet = func._overloadpacket
    if packet is _CPU_FLASH:
        return sdpa_flop_count(*_shapes(args[:3]))
    if packet is _CPU_FLASH_BACKWARD:
        return sdpa_backward_flop_count(*_shapes(args[:4]))
    return int(flop_registry[packet](*args, **kwargs, out_val=out))


def op_work(func, args, kwargs, out) -> tuple[str, str, int, int] | None:
    """(op class, dtype, FLOPs, bytes) of one aten op call (module docstring), or None for a view/allocation."""
    op_class = _op_class(func)
    if op_class is None:
        return None
    if func._overloadpacket.__name__ in _WRITE_ONLY:  # the destination is written, not read
        written = _written_arguments(func)
        read = [a for i, a in enumerate(args) if i not in written]
    else:
        read = list(args)
    inputs = list(tensors_in((*read, *kwargs.values())))
    outputs = list(tensors_in((out,)))
    if not outputs:  # in-place ops returning nothing (_foreach_add_): what they wrote
        outputs = list(tensors_in(args[i] for i in _written_arguments(func) if i < len(args)))
    moved = sum(map(_distinct_bytes, inputs)) + sum(map(_distinct_bytes, outputs))
    floating = [t for t in (*inputs, *outputs) if t.is_floating_point()]
    dtype = str(floating[0].dtype if floating else (inputs or outputs or [torch.empty(0)])[0].dtype)
    if op_class in ("matmul", "attention"):
        flops = _registry_flops(func, args, kwargs, out)
    elif op_class == "copy":
        flops = 0
    elif func._overloadpacket.__name__ in _REDUCTIONS:
        flops = sum(t.numel() for t in inputs)
    else:
        flops = sum(t.numel() for t in outputs)
    return op_class, dtype.replace("torch.", ""), flops, moved


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_VALUES = (int, float, bool, str, type(None))


def _layout(value):
    """What of an argument or result decides an op's counts: a tensor's shape, strides and dtype, a plain value
    itself, any other object its type (a dtype, a device: the results' layouts carry what they decide)."""
    if type(value) in _PLAIN_TENSORS or isinstance(value, Tensor):
        return (value.shape, value.stride(), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple([_layout(v) for v in value])
    return value if isinstance(value, _VALUES) else type(value)


class WorkCounter(TorchDispatchMode):
    """Count every aten op's work while active; :meth:`marker` wraps the step's phase marker, :meth:`work`
    gives the :class:`~bench.results.record.StepWork` afterwards."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # as the meta op cache's: no step is compiled, and torch's dynamo-disabling wrapper costs per op
        return False

    def __init__(self):
        super().__init__()
        self._phase = OUTSIDE
        # (phase, group) -> ops, where group = (class, dtype, flops, bytes)
        self._counts: Counter[tuple[str, tuple[str, str, int, int]]] = Counter()
        # signature (op, input and output layouts) -> group or None (a view): every repeat of an op is a lookup
        self._signatures: dict[tuple, tuple[str, str, int, int] | None] = {}

    def marker(self, mark: PhaseMarker) -> PhaseMarker:
        """``mark`` that also tells this counter which phase begins."""

        def marked(phase: str) -> None:
            self._phase = phase if phase in PHASES else OUTSIDE
            mark(phase)

        return marked

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            key = (id(func), _layout(args), _layout(tuple(kwargs.items())) if kwargs else None, _layout(out))
            hash(key)  # overloads live as long as the process: their id is a safe key
        except TypeError:  # an argument that does not hash (a symbolic size): computed each time
            key = None
        group = self._signatures.get(key, _MISSING) if key is not None else _MISSING
        if group is _MISSING:
            group = op_work(func, args, kwargs, out)
            if key is not None:
                self._signatures[key] = group
        if group is not None:
            self._counts[(self._phase, group)] += 1
        return out

    def work(self) -> StepWork:
        """The counts so far as a :class:`StepWork` (totals, per phase, per class, op groups)."""
        groups: Counter[tuple[str, str, int, int]] = Counter()
        flops_by_phase, bytes_by_phase = Counter(), Counter()
        for (phase, group), n in self._counts.items():
            groups[group] += n
            flops_by_phase[phase] += group[2] * n
            bytes_by_phase[phase] += group[3] * n
        flops_by_class, bytes_by_class, ops_by_class = Counter(), Counter(), Counter()
        for (op_class, _dtype, flops, moved), n in groups.items():
            flops_by_class[op_class] += flops * n
            bytes_by_class[op_class] += moved * n
            ops_by_class[op_class] += n
        ordered = sorted(groups.items(), key=lambda item: (OP_CLASSES.index(item[0][0]), *item[0][1:]))
        return StepWork(
            flops=sum(flops_by_class.values()),
            bytes_accessed=sum(bytes_by_class.values()),
            op_count=sum(ops_by_class.values()),
            flops_by_phase=_in_order(flops_by_phase, WORK_PHASES),
            bytes_by_phase=_in_order(bytes_by_phase, WORK_PHASES),
            flops_by_class=_in_order(flops_by_class, OP_CLASSES),
            bytes_by_class=_in_order(bytes_by_class, OP_CLASSES),
            ops_by_class=_in_order(ops_by_class, OP_CLASSES),
            op_groups=[OpGroup(c, d, f, b, n) for (c, d, f, b), n in ordered],
        )


_MISSING = object()


def _in_order(counts: Counter, keys: tuple[str, ...]) -> dict[str, int]:
    return {k: int(counts[k]) for k in keys if counts[k]}


def counted(run: Callable[[PhaseMarker], object], counter: WorkCounter) -> Callable[[PhaseMarker], object]:
    """``run(mark)`` under ``counter``, its marks passed on to it: for a measured round's step."""

    def run_counted(mark: PhaseMarker):
        with counter:
            return run(counter.marker(mark))

    return run_counted
