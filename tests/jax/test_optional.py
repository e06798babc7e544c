"""The JAX methods are an optional extra: registered but opt-in, and ``unsupported`` naming the extra when jax does
not import (simulated here by making it unimportable, so the test runs with or without the extra)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import models
from bench import dp
from bench.dp import MethodUnsupported, clipped_grad_sum

JAX_METHODS = ("jax-vmap", "jax-privacy")


def test_the_jax_methods_are_registered_opt_in():
    assert not set(JAX_METHODS) & set(dp.available_methods())
    assert set(JAX_METHODS) <= set(dp.available_methods(include_opt_in=True))


@pytest.mark.parametrize("missing", ["jax", "jax_privacy"])
@pytest.mark.parametrize("method", JAX_METHODS)
def test_without_the_extra_a_jax_method_is_unsupported_naming_it(monkeypatch, method, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now raises ImportError
    workload = models.get_workload("gpt-tiny")
    model = workload.build_model()
    batch = workload.make_batch(2)
    if missing == "jax_privacy" and method == "jax-vmap":  # plain vmap needs no jax-privacy
        pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
        assert clipped_grad_sum(method, workload, model, batch, math.inf)
        return
    with pytest.raises(MethodUnsupported) as info:
        clipped_grad_sum(method, workload, model, batch, 1.0)
    assert missing in info.value.reason and "pip install 'dpmem[jax]'" in info.value.diagnosis
    with pytest.raises(MethodUnsupported, match=r"pip install 'dpmem\[jax\]'"):
        dp.build_step(method, workload, model, privacy=dp.resolve_privacy(1.0, accountant="rdp"), batch_size=2)


@pytest.mark.parametrize("method", JAX_METHODS)
def test_a_bring_your_own_workload_is_unsupported(method):
    pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
    pytest.importorskip("jax_privacy", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
    workload = models.Workload(
        "byo-linear",
        lambda: torch.nn.Linear(3, 1),
        lambda b, g: models.Batch((torch.randn(b, 3, generator=g),), torch.randn(b, 1, generator=g)),
        lambda out, target: (out - target).pow(2).mean(dim=1),
    )
    model = workload.build_model()
    with pytest.raises(MethodUnsupported, match="'byo-linear' has no JAX port") as info:
        clipped_grad_sum(method, workload, model, workload.make_batch(2), 1.0)
    assert "built-in DiT and GPT-2 only" in info.value.diagnosis


def test_a_training_mode_other_than_fp32_full_is_unsupported():
    pytest.importorskip("jax", reason="the JAX methods need the extra: pip install 'dpmem[jax]'")
    workload = models.get_workload("gpt-tiny")
    model = workload.build_model()
    mode = dp.TrainingMode(precision="amp-bf16")
    with pytest.raises(MethodUnsupported, match="training mode amp-bf16"):
        dp.get_method("jax-vmap").check(workload, model, mode)


def test_no_preset_runs_a_jax_method():
    """cpu-smoke's budget (5 min) has no room for a compile per case; the JAX methods run only when named."""
    from bench.config.settings import PRESETS

    for preset in PRESETS.values():
        assert not {m.partition(":")[0] for m in preset.methods or dp.available_methods()} & set(JAX_METHODS)
