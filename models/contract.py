"""The workload contract, checked once before any DP method touches a workload.

Every DP method relies on the same rules (docs/workloads.md "Bring your own model"): ``model(*batch.inputs)`` returns a
tensor, ``loss_fn`` returns the per-sample loss ``[B]``, and a step is a deterministic function of (weights,
batch) — ``make_batch`` draws all randomness from the generator it is given and the model draws none. A
workload that breaks one would otherwise fail differently in every method (an ``error`` here, an
``unsupported`` there) or, worse, run with silently different gradients; :func:`check_workload_contract`
names the broken rule once, as a :class:`WorkloadContractError`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _REGISTRY
from .workload import Batch, Workload, WorkloadError

__all__ = ["CONTRACT_BATCH_SIZE", "WorkloadContractError", "check_workload_contract"]

CONTRACT_BATCH_SIZE = 2  # two samples: a loss of shape [] or [1] cannot pass for [B]
_SEE = '(see docs/workloads.md "Bring your own model")'
_DETERMINISM_RULE = "a step must be a deterministic function of (weights, batch)"

# (workload name, device, what the name is registered as) -> the broken rule, or None: checked once per session.
_VERDICTS: dict[tuple, str | None] = {}


class WorkloadContractError(WorkloadError):
    """A workload breaks the contract every DP method relies on; the message is one line naming the rule."""


def check_workload_contract(workload: Workload, model: nn.Module, device: torch.device | str) -> None:
    """Raise :class:`WorkloadContractError` if ``workload`` (with ``model``, its freshly built model on
    ``device``) breaks the contract. Cheap: two batches of 2 and two forwards (one on ``meta``, which has no
    values to compare), under ``no_grad``, with the global RNG restored afterwards. The verdict is cached per
    workload and device; an exception that is not a contract violation (an OOM, a crash) propagates unchanged."""
    device = torch.device(device)
    registered = _REGISTRY.get(workload.base_name) or (workload.model_fn, workload.batch_fn, workload.loss_fn)
    key = (workload.name, str(device), registered)
    if key not in _VERDICTS:
        _VERDICTS[key] = _broken_rule(workload, model, device)
    if _VERDICTS[key] is not None:
        raise WorkloadContractError(f"workload {workload.name!r}: {_VERDICTS[key]} {_SEE}")


def _broken_rule(workload: Workload, model: nn.Module, device: torch.device) -> str | None:
    b = CONTRACT_BATCH_SIZE
    first = workload.make_batch(b, torch.Generator().manual_seed(workload.seed))
    again = workload.make_batch(b, torch.Generator().manual_seed(workload.seed))
    if not _same_batch(first, again):
        return (
            f"make_batch gave two different batches for two equally seeded generators — {_DETERMINISM_RULE}: "
            "batch_fn must draw all its randomness from the generator it is given, not from torch's global RNG"
        )
    batch = first.to(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
        output = model(*batch.inputs)
        if not isinstance(output, Tensor):
            return f"forward returned {type(output).__name__} — it must return a tensor"
        losses = workload.loss_per_sample(output, batch.target)
        if not isinstance(losses, Tensor):
            return f"loss_fn returned {type(losses).__name__} — it must return the per-sample loss, a tensor [B]"
        if tuple(losses.shape) != (b,):
            return (
                f"loss_fn returned shape {tuple(losses.shape)} for a batch of {b} — it must return the "
                "per-sample loss, shape [B]"
            )
        if device.type == "meta":
            return None
        if not _same_values(output, model(*batch.inputs)):
            return (
                f"two forwards of one batch with the same weights gave different outputs — {_DETERMINISM_RULE}: "
                "the model must not draw random numbers itself (dropout, noise, random label drop in train mode)"
            )
    return None


def _same_batch(a: Batch, b: Batch) -> bool:
    pairs = list(zip((*a.inputs, a.target), (*b.inputs, b.target)))
    return len(a.inputs) == len(b.inputs) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal, or floating point within a relative difference that only the order of a GPU kernel's float sums
    can explain (1e-5; 1e-2 in 16-bit): dropout or added noise differ by orders of magnitude more."""
    if not isinstance(b, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b) or not a.is_floating_point():
        return torch.equal(a, b)
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b):
        return False
    x, y = a[finite_a].double(), b[finite_b].double()
    tolerance = 1e-2 if a.element_size() == 2 else 1e-5
    return float((x - y).norm()) <= tolerance * float(x.norm())
