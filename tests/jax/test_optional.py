"""The JAX methods are an optional extra: registered but opt-in, and ``unsupported`` naming the extra when jax does
not import (simulated here by making it unimportable, so the test runs with or without the extra)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from bench import dp
from bench.config.cli import pytest_bench_command
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


@pytest.mark.parametrize(
    "methods, expected, code",
    [
        (
            "jax-privacy:microbatch=0",
            "ERROR: --methods: DP method 'jax-privacy': microbatch must be an integer >= 1",
            4,
        ),
        ("jax-privacy:microbatch=04,bk", "gpt-tiny-jax-privacy:microbatch=4-bs4-meta", 0),  # canonical in the case id
    ],
)
def test_pytest_bench_takes_the_microbatch_spec(methods, expected, code):
    """The spec is checked and spelled canonically before any case runs (no jax needed to collect)."""
    repo = Path(__file__).resolve().parents[2]
    args = ("--workloads", "gpt-tiny", "--devices", "meta", "--batch-sizes", "4", "--methods", methods)
    command = pytest_bench_command(*args, "--precision", "fp32", "--checkpointing", "none", "--collect-only")
    proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in (proc.stderr if code else proc.stdout)
