"""Activation checkpointing of a model's blocks, applied from outside the model, and the pass it is in.

:func:`checkpoint_modules` replaces the ``forward`` of every module of the given types (the outermost ones; a
matching module inside another is left alone) by a call through ``torch.utils.checkpoint.checkpoint``,
non-reentrant, as people train transformers when memory is tight: the block's internal activations are dropped
after the forward and recomputed when the backward reaches the block. :meth:`CheckpointedBlocks.remove` puts the
model's own ``forward`` back; the model's code is never edited.

Three settings, each for a reason:

* ``use_reentrant=False``: the reentrant variant runs the forward under ``no_grad``, so no per-sample-gradient
  hook sees a layer's output gradient (torch recommends non-reentrant; it is the default people get);
* ``early_stop=False``: by default the recompute stops as soon as the tensors the backward needs exist, so the
  last layer of a block is never run again and a forward hook that captures activations during the recompute
  (Opacus' does, see bench/dp/opacus.py) would miss it. The cost is that layer's forward, once per block;
* ``preserve_rng_state=False``: the workload contract forbids a model that draws random numbers (dropout), so
  there is no RNG state to replay, and stashing it would cost a copy per block.

Forward hooks of layers *inside* a checkpointed block fire twice per step — in the forward and again in the
recompute, during the backward. A hook that must see each layer once asks :func:`checkpoint_pass`:
``"forward"`` in the original forward of a checkpointed block (whose saved activations are about to be
dropped), ``"recompute"`` while the backward recomputes it, ``None`` outside checkpointed blocks. The pass is
tracked per thread: the recompute runs in whichever thread runs the backward, and so do the hooks it fires.

A context that is active around a block's original forward (a torch-function mode that routes an op to
another kernel, say) is not active in its recompute, which runs later, inside the backward: the recompute
would take another path, save other tensors, and the checkpoint refuses it ("A different number of tensors
was saved"). :func:`also_in_recompute` registers such a context: every block that runs its original forward
while it is registered enters it again around its recompute.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedBlocks", "also_in_recompute", "checkpoint_modules", "checkpoint_pass", "checkpointed_modules"]

_WRAPPER_FLAG = "_dpmem_checkpointed"  # set on the forward functions checkpoint_modules installs


class _PassState(threading.local):
    def __init__(self) -> None:
        self.stack: list[str] = []
        self.recompute_contexts: list[Callable[[], AbstractContextManager]] = []


_PASS = _PassState()


def checkpoint_pass() -> str | None:
    """``"forward"`` (a checkpointed block's original forward), ``"recompute"`` (its recompute during the
    backward) or ``None`` (not inside a checkpointed block), in this thread."""
    return _PASS.stack[-1] if _PASS.stack else None


class _InPass:
    """Marks this thread as inside ``kind`` while entered, inside ``contexts`` (each factory's context, entered
    in order). Reusable: a graph kept for a second backward (Opacus' ghost clipping) recomputes a block twice
    with the same context."""

    def __init__(self, kind: str, contexts: tuple[Callable[[], AbstractContextManager], ...] = ()):
        self.kind, self.contexts = kind, contexts
        self._entered: list[ExitStack] = []

    def __enter__(self) -> None:
        with ExitStack() as stack:  # a context that fails to enter leaves the others and the pass as they were
            for context in self.contexts:
                stack.enter_context(context())
            self._entered.append(stack.pop_all())
        _PASS.stack.append(self.kind)

    def __exit__(self, *exc) -> None:
        self._entered.pop().close()
        _PASS.stack.pop()


def _pass_contexts() -> tuple[_InPass, _InPass]:
    """``context_fn`` of torch.utils.checkpoint (called when the block's forward starts): one context around the
    forward, one around the recompute — with the contexts registered by :func:`also_in_recompute` now."""
    return _InPass("forward"), _InPass("recompute", tuple(_PASS.recompute_contexts))


@contextmanager
def also_in_recompute(context: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """While this block runs, a checkpointed block's recompute also runs inside ``context()`` (a fresh context
    per recompute), so it takes the path its original forward took."""
    _PASS.recompute_contexts.append(context)
    try:
        yield
    finally:
        _PASS.recompute_contexts.remove(context)


def _checkpointed_forward(original, *args, **kwargs):
    return checkpoint(
        original,
        *args,
        use_reentrant=False,
        context_fn=_pass_contexts,
        preserve_rng_state=False,
        early_stop=False,
        **kwargs,
    )


class CheckpointedBlocks:
    """The modules :func:`checkpoint_modules` wrapped, by name; :meth:`remove` unwraps them."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules.values():
            if getattr(module.__dict__.get("forward"), _WRAPPER_FLAG, False):
                del module.forward
        self.modules = {}


def checkpoint_modules(model: nn.Module, module_types: tuple[type[nn.Module], ...]) -> CheckpointedBlocks:
    """Checkpoint every outermost module of ``model`` whose type is one of ``module_types`` (see the module
    docstring); returns the handle that undoes it. Reads no tensor: works on a model on any device, meta too.
    A model that is already checkpointed is a ValueError (the recompute would nest)."""
    if checkpointed_modules(model):
        raise ValueError(f"{type(model).__name__} is already checkpointed")
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside_chosen = any(outer == "" or name.startswith(f"{outer}.") for outer in chosen)
        if inside_chosen or not isinstance(module, tuple(module_types)):
            continue
        wrapper = partial(_checkpointed_forward, module.forward)
        setattr(wrapper, _WRAPPER_FLAG, True)
        module.forward = wrapper  # an instance attribute shadows the class's forward; `del` restores it
        chosen[name] = module
    return CheckpointedBlocks(chosen)


def checkpointed_modules(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules whose forward runs through :func:`checkpoint_modules`' wrapper."""
    return [
        name for name, module in model.named_modules() if getattr(module.__dict__.get("forward"), _WRAPPER_FLAG, False)
    ]
