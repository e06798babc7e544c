"""Exact live tensor bytes during one step, on any device, with a breakdown by category at the peak.

:class:`TensorTracker` is a ``TorchDispatchMode``: every aten op of the step passes through it. For each
tensor an op returns, the tracker looks at the tensor's *untyped storage*: a storage it has not seen before
is an allocation (views and in-place results share a known storage and cost nothing); a weakref on the
storage tells it when the storage is freed. Each allocation/free is appended to an event log with its byte
count; the peak, the live set at the peak and the timeline are found afterwards by replaying the log, so
the per-op cost stays one dict lookup and a list append.

What exists before the step is the *baseline*: the model's parameters and buffers, their ``.grad``, the
optimizer's state (Opacus' ``DPOptimizer.state`` is its ``original_optimizer``'s), leftover per-sample
gradients, and any other pre-existing storage an op reads during the step (the batch, cached constants) —
those are adopted into the baseline when first seen as an op input, since they were live from the start.

Categories (``record.CATEGORIES``), first match wins:
  parameters       storages of trainable model parameters and of buffers at the start
  frozen_parameters  storages of frozen ones (``requires_grad=False``: fine-tuning, ``--trainable``)
  per_sample       storages announced by a DP method via ``bench.trackers.channel.annotate_dp_buffer`` (or found
                   as Opacus' ``p.grad_sample`` / ``p._current_grad_sample``)
  gradients        storages seen as some ``p.grad`` (at the start, at every phase mark, at the end)
  optimizer_state  storages seen in ``optimizer.state`` (same times)
  activations      allocated during the ``forward`` phase
  other            everything else (backward temporaries, noise, adopted inputs)

With ``cap_bytes`` the tracker is also the CPU memory cap (``--memory-cap``): it keeps the running total the
replay would find (start bytes + the highest cumulative allocation so far) and raises
:class:`MemoryCapExceeded` inside the op whose result first takes it past the cap — a few integer operations
per allocation. The bench runs the warm-up step and the measured round under it, so an ``ok`` case's tracked
peak never exceeds the cap.

Storages resized outside dispatch: FSDP2 allocates and frees its all-gathered (unsharded) parameters with
``UntypedStorage.resize_``, which is no aten op. While a tracker records, that method is wrapped (restored
when the last tracker exits), so such a resize is an allocation, a free or a resize in the log like any other;
a storage first seen there with bytes already in it is adopted at those bytes. A wrapper tensor subclass
(DTensor: FSDP2's sharded parameters, gradients and optimizer state) is counted by its inner tensor's
storage, the local shard; its own ``untyped_storage()`` is a placeholder sized like the global tensor.

Limits: tensors without a storage (sparse, nested) are skipped; allocations made inside one kernel and freed
before it returns are invisible (they never reach Python); storages on another device than the tracked one
are ignored (a CUDA step's CPU scalars do not count).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from bench.results.record import CATEGORIES
from bench.trackers.channel import listening

# Event codes of the log. Each event is a tuple (time, code, a, b).
_ALLOC = 0  # a = storage id, b = bytes
_FREE = 1  # a = storage id, b = bytes
_RESIZE = 2  # a = storage id, b = byte delta
_MARK = 3  # a = phase name

# Ops whose input is a tensor created outside dispatch just before (torch.tensor / as_tensor from data).
_FRESH_OPS = (torch.ops.aten.lift_fresh.default,)

# Tensor types that are no wrapper subclass: their own storage holds their memory (see _inner_tensor).
_PLAIN_TENSORS = (Tensor, nn.Parameter)

# Trackers recording now; UntypedStorage.resize_ is wrapped while this list is not empty.
_RESIZE_LISTENERS: list[TensorTracker] = []
_ORIGINAL_RESIZE = torch.UntypedStorage.resize_


def _resize_and_tell(storage, size):
    before = storage.nbytes()
    result = _ORIGINAL_RESIZE(storage, size)
    for tracker in list(_RESIZE_LISTENERS):
        tracker._on_storage_resize(storage, before)
    return result


def _listen_to_resizes(tracker: TensorTracker) -> None:
    if not _RESIZE_LISTENERS:
        torch.UntypedStorage.resize_ = _resize_and_tell
    _RESIZE_LISTENERS.append(tracker)


def _stop_listening_to_resizes(tracker: TensorTracker) -> None:
    if tracker in _RESIZE_LISTENERS:
        _RESIZE_LISTENERS.remove(tracker)
    if not _RESIZE_LISTENERS:
        torch.UntypedStorage.resize_ = _ORIGINAL_RESIZE


# Attributes under which Opacus keeps per-sample gradients on a parameter.
_PER_SAMPLE_ATTRS = ("grad_sample", "_current_grad_sample")


@dataclass
class TensorReport:
    """Result of one tracked step. Byte figures are exact sums of distinct live storages."""

    peak_tensor_bytes: int
    baseline_tensor_bytes: int
    breakdown: dict[str, int]  # CATEGORIES -> bytes live at the peak; sums to peak_tensor_bytes
    peak_phase: str | None  # phase mark in effect when the peak was reached (None: before the first mark)
    trace_t: list[float] = field(default_factory=list)  # perf_counter times of every alloc/free/resize
    trace_bytes: list[int] = field(default_factory=list)  # live bytes just after each of those events
    adopted_storages: int = 0  # pre-existing storages first seen as op inputs (counted in the baseline)
    adopted_bytes: int = 0
    unknown_annotations: int = 0  # annotated tensors whose storage the tracker did not know
    allocations: int = 0


class MemoryCapExceeded(MemoryError):
    """Live tensor bytes passed the configured memory cap (the bench records status ``oom``)."""


class TensorTracker(TorchDispatchMode):
    """Track live tensor storages on ``device`` while active (``with TensorTracker(...) as tr:``).

    Call :meth:`register_state` before entering to declare the pre-existing model/optimizer state, :meth:`mark`
    at each phase start, and :meth:`report` after exiting. With ``cap_bytes``, raise :class:`MemoryCapExceeded`
    the moment the tracked live bytes (what :meth:`report` would give as the peak so far) pass it."""

    def __init__(self, device: torch.device | str = "cpu", cap_bytes: int | None = None):
        super().__init__()
        if cap_bytes is not None and cap_bytes < 1:
            raise ValueError(f"memory cap must be >= 1 byte, got {cap_bytes}")
        self.device = torch.device(device)
        self.cap_bytes = cap_bytes
        # Running figures for the cap: bytes live since the start (baseline + adopted) and the cumulative
        # event sum with its running maximum; start + maximum is the replayed peak so far.
        self._start_bytes = 0
        self._delta_bytes = 0
        self._delta_peak = 0
        self._events: list[tuple[float, int, Any, Any]] = []
        # id(untyped storage) -> [sid, nbytes, weakref]; ids are safe keys because the weakref callback
        # removes the entry while the storage object is being freed, before the id can be reused.
        self._live: dict[int, list] = {}
        self._next_sid = 0
        self._baseline: dict[int, int] = {}  # sid -> bytes, live when the step started
        self._adopted: dict[int, int] = {}  # sid -> bytes, pre-existing storages found during the step
        self._labels: dict[int, str] = {}  # sid -> explicit category
        self._created_phase: dict[int, str | None] = {}
        self._phase: str | None = None
        self._recording = False
        self._finished = False
        self._unknown_annotations = 0
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        # Devices of the storages behind the tracked device's tensors: the device itself, or "meta" for the
        # FakeTensors of a FakeTensorMode (a storage resized outside dispatch is matched by its own device).
        self._storage_devices: set[torch.device] = {self.device}

    # ---- declaring the pre-existing state -----------------------------------------------------------------
    def register_state(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        extra: Iterable[Tensor] = (),
    ) -> None:
        """Declare the storages that exist before the step (model, grads, optimizer state, ``extra`` tensors).

        The model and optimizer are rescanned at each mark and at the end to label gradients and optimizer
        state created during the step."""
        self._model, self._optimizer = model, optimizer
        if model is not None:
            for tensor in _model_state(model):
                frozen = isinstance(tensor, nn.Parameter) and not tensor.requires_grad
                self._label(self._known_or_baseline(tensor), "frozen_parameters" if frozen else "parameters")
        self._scan_state(baseline=True)
        for tensor in extra:
            self._known_or_baseline(tensor)

    def _known_or_baseline(self, tensor: Tensor) -> int | None:
        storage = self._storage_on_device(tensor)
        if storage is None:
            return None
        entry = self._live.get(id(storage))
        if entry is not None:
            return entry[0]
        sid = self._new_entry(storage)
        self._baseline[sid] = nbytes = self._live[id(storage)][1]
        self._start_bytes += nbytes
        return sid

    def _scan_state(self, baseline: bool = False) -> None:
        """Label storages now held as gradients, optimizer state and Opacus per-sample gradients."""
        lookup = self._known_or_baseline if baseline else self._known_sid
        if self._model is not None:
            for p in self._model.parameters():
                if p.grad is not None:
                    self._label(lookup(p.grad), "gradients")
                for attr in _PER_SAMPLE_ATTRS:
                    value = getattr(p, attr, None)
                    for t in value if isinstance(value, (list, tuple)) else (value,):
                        if isinstance(t, Tensor):
                            self._label(lookup(t), "per_sample")
        if self._optimizer is not None:
            for t in optimizer_state_tensors(self._optimizer):
                self._label(lookup(t), "optimizer_state")

    def _known_sid(self, tensor: Tensor) -> int | None:
        storage = self._storage_on_device(tensor)
        entry = self._live.get(id(storage)) if storage is not None else None
        return entry[0] if entry is not None else None

    def _label(self, sid: int | None, category: str) -> None:
        if sid is None:
            return
        current = self._labels.get(sid)
        if current is None or _PRECEDENCE[category] < _PRECEDENCE[current]:
            self._labels[sid] = category

    # ---- recording ----------------------------------------------------------------------------------------
    def __enter__(self):
        if self._finished:
            raise RuntimeError("a TensorTracker measures one step; create a new one")
        self._listening = listening(self._on_annotation)
        self._listening.__enter__()
        _listen_to_resizes(self)
        self._recording = True
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            if self._recording:
                self._scan_state()
        finally:
            self._recording = False
            self._finished = True
            _stop_listening_to_resizes(self)
            self._listening.__exit__(None, None, None)
            # Dropping the weakrefs also drops their callbacks: frees after the step are not logged.
            self._live.clear()
        return super().__exit__(*exc_info)

    def mark(self, phase: str) -> None:
        """A phase begins now (``"end"`` ends the last one); also rescans grads and optimizer state."""
        self._phase = phase
        self._events.append((time.perf_counter(), _MARK, phase, None))
        if self._recording:
            self._scan_state()

    def _on_annotation(self, tensor: Tensor) -> None:
        if not self._recording:
            return
        sid = self._known_sid(tensor)
        if sid is None:
            if self._storage_on_device(tensor) is not None:
                self._unknown_annotations += 1
            return
        self._label(sid, "per_sample")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._recording:
            if func in _FRESH_OPS:  # torch.tensor(data) builds outside dispatch, then announces it here
                for result in tensors_in((out,)):
                    self._note_output(result, func)
                return out
            # Inputs first: an in-place or out= result shares an input's storage and is not a new allocation.
            for arg in tensors_in(args):
                self._note_input(arg)
            for arg in tensors_in(kwargs.values()):
                self._note_input(arg)
            for result in tensors_in(out if isinstance(out, (tuple, list)) else (out,)):
                self._note_output(result, func)
        return out

    def _storage_on_device(self, tensor: Tensor):
        if type(tensor) not in _PLAIN_TENSORS:  # every op's every tensor passes here: the common case first
            tensor = _inner_tensor(tensor)
            if tensor is None:
                return None
        if tensor.device != self.device:
            return None
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, storage-less subclasses
            return None

    def _new_entry(self, storage) -> int:
        self._storage_devices.add(storage.device)
        sid = self._next_sid
        self._next_sid += 1
        key = id(storage)
        ref = weakref.ref(storage, lambda _ref, key=key: self._on_free(key))
        self._live[key] = [sid, storage.nbytes(), ref]
        return sid

    def _note_input(self, tensor: Tensor) -> None:
        storage = self._storage_on_device(tensor)
        if storage is None or id(storage) in self._live:
            return
        self._adopt(storage, storage.nbytes())

    def _adopt(self, storage, nbytes: int) -> list:
        """A pre-existing storage the tracker was not told about: live since the start, at ``nbytes``."""
        sid = self._new_entry(storage)
        self._live[id(storage)][1] = self._adopted[sid] = nbytes
        self._start_bytes += nbytes
        self._check_cap()
        return self._live[id(storage)]

    def _note_output(self, tensor: Tensor, func) -> None:
        storage = self._storage_on_device(tensor)
        if storage is not None:
            self._note_storage(storage)

    def _note_storage(self, storage) -> None:
        """An op (or a resize) returned ``storage``: a new one is an allocation, a known one may have been resized."""
        entry = self._live.get(id(storage))
        now = time.perf_counter()
        if entry is None:
            sid = self._new_entry(storage)
            self._created_phase[sid] = self._phase
            nbytes = self._live[id(storage)][1]
            self._events.append((now, _ALLOC, sid, nbytes))
            self._grow(nbytes)
            return
        nbytes = storage.nbytes()
        if nbytes != entry[1]:  # resize_ / out= grew or shrank a known storage
            self._events.append((now, _RESIZE, entry[0], nbytes - entry[1]))
            grown, entry[1] = nbytes - entry[1], nbytes
            self._grow(grown)

    def _on_storage_resize(self, storage, before: int) -> None:
        """``storage.resize_`` ran outside dispatch (FSDP2's unsharded parameters): log it like an op's result.
        A storage first seen here was allocated by the resize (empty before) or pre-existed at ``before`` bytes."""
        if not self._recording or storage.device not in self._storage_devices:
            return
        if id(storage) not in self._live and before > 0:
            self._adopt(storage, before)
        self._note_storage(storage)

    def _grow(self, nbytes: int) -> None:
        self._delta_bytes += nbytes
        if self._delta_bytes > self._delta_peak:
            self._delta_peak = self._delta_bytes
            self._check_cap()

    def _check_cap(self) -> None:
        peak = self._start_bytes + self._delta_peak
        if self.cap_bytes is not None and peak > self.cap_bytes:
            raise MemoryCapExceeded(f"memory cap exceeded: {peak} tracked tensor bytes > cap {self.cap_bytes}")

    def _on_free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None and self._recording:
            self._events.append((time.perf_counter(), _FREE, entry[0], entry[1]))
            self._delta_bytes -= entry[1]

    # ---- replay -------------------------------------------------------------------------------------------
    def report(self) -> TensorReport:
        """Replay the event log (:func:`replay`): peak, the live set and phase at the peak, the breakdown and
        the trace."""
        return replay(self._events, self._baseline, self._adopted, self._category, self._unknown_annotations)

    def _category(self, sid: int) -> str:
        label = self._labels.get(sid)
        if label is not None:
            return label
        return "activations" if self._created_phase.get(sid) == "forward" else "other"


def replay(
    events: Sequence[tuple[float, int, Any, Any]],
    baseline: dict[int, int],
    adopted: dict[int, int],
    category: Callable[[int], str],
    unknown_annotations: int = 0,
) -> TensorReport:
    """The report of a tracker's event log: ``baseline`` and ``adopted`` (storage id -> bytes) were live from the
    start; ``category(sid)`` names a storage's category; the live set at the peak gives the breakdown."""
    start_live: dict[int, int] = {**baseline, **adopted}
    baseline_bytes = sum(start_live.values())
    trace_t, trace_bytes, peak_bytes, peak_index, allocations = _trace(events, baseline_bytes)
    live_at_peak, phase_at_peak = _live_at(events, start_live, peak_index)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for sid, nbytes in live_at_peak.items():
        breakdown[category(sid)] += nbytes
    assert sum(breakdown.values()) == peak_bytes, "breakdown must sum to the peak"
    return TensorReport(
        peak_tensor_bytes=peak_bytes,
        baseline_tensor_bytes=baseline_bytes,
        breakdown=breakdown,
        peak_phase=phase_at_peak,
        trace_t=trace_t,
        trace_bytes=trace_bytes,
        adopted_storages=len(adopted),
        adopted_bytes=sum(adopted.values()),
        unknown_annotations=unknown_annotations,
        allocations=allocations,
    )


def _trace(events: Sequence[tuple[float, int, Any, Any]], baseline_bytes: int):
    """(trace times, live bytes after each event, peak bytes, index of the peak's event or -1, allocations)."""
    live_bytes = baseline_bytes
    peak_bytes, peak_index = baseline_bytes, -1
    trace_t: list[float] = []
    trace_bytes: list[int] = []
    allocations = 0
    for index, (t, code, _, b) in enumerate(events):
        if code == _MARK:
            continue
        if code == _ALLOC:
            live_bytes += b
            allocations += 1
        elif code == _FREE:
            live_bytes -= b
        else:  # _RESIZE
            live_bytes += b
        trace_t.append(t)
        trace_bytes.append(live_bytes)
        if live_bytes > peak_bytes:
            peak_bytes, peak_index = live_bytes, index
    return trace_t, trace_bytes, peak_bytes, peak_index, allocations


def _live_at(
    events: Sequence[tuple[float, int, Any, Any]], start_live: dict[int, int], peak_index: int
) -> tuple[dict[int, int], str | None]:
    """The storages live at event ``peak_index`` (sid -> bytes) and the phase it fell in (the second pass)."""
    live_at_peak = dict(start_live)
    phase_at_peak: str | None = None
    for _, code, a, b in events[: peak_index + 1]:
        if code == _MARK:
            phase_at_peak = a
        elif code == _ALLOC:
            live_at_peak[a] = b
        elif code == _FREE:
            live_at_peak.pop(a, None)
        else:
            live_at_peak[a] = live_at_peak.get(a, 0) + b
    if peak_index < 0:  # the peak is the baseline itself: phase is the first mark's
        phase_at_peak = next((a for _, code, a, _ in events if code == _MARK), None)
    return live_at_peak, phase_at_peak


# Lower wins when one storage earns two labels (e.g. an announced buffer later handed to p.grad).
_PRECEDENCE = {"parameters": 0, "frozen_parameters": 0, "per_sample": 1, "gradients": 2, "optimizer_state": 3}


def _model_state(model: nn.Module) -> Iterable[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def optimizer_state_tensors(optimizer: Any) -> list[Tensor]:
    """Every tensor in an optimizer's ``state`` (Opacus' DP optimizers hand out their wrapped optimizer's)."""
    tensors: list[Tensor] = []
    for state in getattr(optimizer, "state", {}).values():
        values = state.values() if isinstance(state, dict) else (state,)
        tensors.extend(v for v in values if isinstance(v, Tensor))
    return tensors


def _inner_tensor(tensor: Tensor) -> Tensor | None:
    """The tensor that holds ``tensor``'s memory: a wrapper subclass such as DTensor owns no storage of its own
    (its ``untyped_storage()`` is a placeholder sized like the *global* tensor), its one inner tensor does (the
    local shard). None for a wrapper of several inner tensors (not counted)."""
    while is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()  # DTensor: ["_local_tensor", "device_mesh"] (a mesh is no tensor)
        inner = [t for t in (getattr(tensor, name) for name in names) if isinstance(t, Tensor)]
        if len(inner) != 1:
            return None
        tensor = inner[0]
    return tensor


def tensors_in(values: Iterable[Any]) -> Iterable[Tensor]:
    """Tensors among ``values`` and inside lists/tuples one level down (aten signatures are that flat)."""
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Tensor):
                    yield item
