"""Tiny bring-your-own workloads for the DP tests: a two-layer MLP that every method supports, and variants that
break the workload contract or fail on demand. ``registered(...)`` puts them in a private copy of the registry,
so ``bench.case.runner.run_case`` finds them by name and nothing leaks into other tests."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import pytest
import torch
from torch import Tensor, nn

import models
from bench import dp
from bench.case.runner import run_case
from bench.case.spec import CaseSpec
from bench.config.settings import BenchConfig
from bench.results.record import CaseRecord
from models import Batch, Workload

IN, HIDDEN, OUT = 6, 8, 3


class Injector:
    """Raises a fresh exception from ``make()`` on every call while armed; counts the calls."""

    def __init__(self) -> None:
        self.make: Callable[[], BaseException] | None = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.make is not None:
            raise self.make()


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, tuple_output: bool = False, injector: Injector | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.tuple_output, self.injector = tuple_output, injector

    def forward(self, x: Tensor):
        h = torch.tanh(self.fc1(x))
        if self.injector is not None:
            self.injector()
        if self.dropout is not None:
            h = self.dropout(h)
        out = self.fc2(h)
        return (out, h) if self.tuple_output else out


def seeded_batch(batch_size: int, generator: torch.Generator) -> Batch:
    x = torch.randn(batch_size, IN, generator=generator)
    return Batch((x,), torch.randn(batch_size, OUT, generator=generator))


def global_rng_batch(batch_size: int, generator: torch.Generator) -> Batch:
    """Ignores its generator: every call draws new numbers from torch's global RNG."""
    return Batch((torch.randn(batch_size, IN),), torch.randn(batch_size, OUT))


def mse_per_sample(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).mean(dim=1)


def mse_mean(output: Tensor, target: Tensor) -> Tensor:
    """The classic mistake: a scalar batch loss instead of the per-sample loss."""
    return ((output - target) ** 2).mean()


def mlp_workload(name: str, *, model_fn=MLP, batch_fn=seeded_batch, loss_fn=mse_per_sample) -> Workload:
    return Workload(name=name, model_fn=model_fn, batch_fn=batch_fn, loss_fn=loss_fn, input_names=("x",))


CONTRACT_BREAKERS = {
    "byo-scalar-loss": mlp_workload("byo-scalar-loss", loss_fn=mse_mean),
    # a model returning (output, hidden), as many libraries' models do, with the loss written for a tensor
    "byo-tuple-forward": mlp_workload("byo-tuple-forward", model_fn=partial(MLP, tuple_output=True)),
    "byo-dropout": mlp_workload("byo-dropout", model_fn=partial(MLP, dropout=0.5)),
    "byo-global-rng-batch": mlp_workload("byo-global-rng-batch", batch_fn=global_rng_batch),
}


@contextmanager
def registered(*workloads: Workload) -> Iterator[None]:
    """Register ``workloads`` in a private copy of the registry for the duration of the block."""
    models.list_workloads()  # the built-ins first, so the copy has them
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
        for workload in workloads:
            models.register_workload(workload)
        yield


def cpu_config(**overrides) -> BenchConfig:
    """The settings ``run_case`` reads, for CPU cases run in-process (σ = 1: noise on; RDP: instant)."""
    settings = dict(
        preset="cpu-smoke",
        workloads=(),
        methods=tuple(dp.available_methods()),
        batch_sizes=(4,),
        devices=("cpu",),
        rounds=1,
        privacy=dp.resolve_privacy(1.0, noise_multiplier=1.0, accountant="rdp"),
        memory_cap_bytes=None,
    )
    return BenchConfig.from_fields(**{**settings, **overrides})


def run_cpu_cases(specs: Iterable[CaseSpec], config: BenchConfig) -> dict[CaseSpec, CaseRecord]:
    """``run_case`` (no timed rounds) for every spec. The case boundaries' ``gc.collect()`` is skipped: it costs
    ~0.3 s a call in a test process full of objects, three calls a case, and these cases allocate a few KB,
    so collecting changes nothing they assert."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gc, "collect", lambda generation=2: 0)
        return {spec: run_case(spec, config, timer=None) for spec in specs}
