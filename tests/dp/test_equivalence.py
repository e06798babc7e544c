"""Every DP method computes the same clipped gradient sum as the per-sample loop, and its fused step adds the
right noise once per batch.

Reference: ``microbatch`` (B forward+backward passes of one sample each). Clip norm: the median per-sample
gradient norm of the batch, so some samples are clipped and some are not (asserted). Tolerance: 1e-4 relative
error in global norm (‖a − b‖ / ‖b‖ over all parameters concatenated). The only allowed failure is
``opacus-ghost`` × tied ``gpt-tiny``, which must carry Opacus' own refusal.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import pytest
import torch

import models
from bench import dp
from bench.dp import MethodUnsupported, clipped_grad_sum

BATCH = 4
TOL = 1e-4
# name -> (workload name, overrides)
WORKLOADS = {
    "dit-tiny-cond": ("dit-tiny-cond", {}),
    "dit-tiny-uncond": ("dit-tiny-uncond", {}),
    "dit-tiny-plain": ("dit-tiny-plain", {}),
    "gpt-tiny": ("gpt-tiny", {}),
    "gpt-tiny-untied": ("gpt-tiny-untied", {}),
    # the #777 fix: the learnable position table in an nn.Embedding submodule — every method must handle it
    "dit-tiny-cond-pos-submodule": ("dit-tiny-cond", {"learnable_pos_embed": True, "pos_embed_in_submodule": True}),
}
# the JAX methods (opt-in: the jax extra) join every torch method when jax is installed
JAX_METHODS = [m for m in dp.available_methods(include_opt_in=True) if m not in dp.available_methods()]
METHODS = dp.available_methods() + (JAX_METHODS if importlib.util.find_spec("jax") else [])
GHOST_TIED = ("opacus-ghost", "gpt-tiny")
OPACUS_TYING_MESSAGE = "Parameter tying is not supported with Ghost Clipping"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()]).double()  # float32 norms of 1e5 entries drift by 1e-5


def rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return float((flat(got) - flat(ref)).norm() / flat(ref).norm())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_model_clean(model: torch.nn.Module) -> None:
    """No hook, no per-sample attribute and no gradient left behind."""
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._backward_hooks, f"hooks left on {name or 'root'}"
        assert not module._forward_pre_hooks, f"pre-hooks left on {name or 'root'}"
        assert not hasattr(module, "activations") and not hasattr(module, "autograd_grad_sample_hooks")
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad left behind"
        for attr in ("grad_sample", "summed_grad", "_norm_sample", "_forward_counter"):
            assert not hasattr(p, attr), f"{name}.{attr} left behind"


@dataclass
class Case:
    workload: models.Workload
    model: torch.nn.Module
    batch: models.Batch
    clip: float
    sample_norms: torch.Tensor  # (B,)
    ref_clipped: dict[str, torch.Tensor]  # microbatch at clip
    ref_sum: dict[str, torch.Tensor]  # microbatch at inf: Σ_i g_i


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    out = {}
    for key, (name, overrides) in WORKLOADS.items():
        workload = models.get_workload(name, **overrides)
        model = workload.build_model()
        batch = workload.make_batch(BATCH, generator=torch.Generator().manual_seed(1))
        norms = torch.stack(
            [
                flat(clipped_grad_sum("microbatch", workload, model, batch.select(i), math.inf)).norm()
                for i in range(BATCH)
            ]
        )
        clip = float(norms.median())
        out[key] = Case(
            workload,
            model,
            batch,
            clip,
            norms,
            clipped_grad_sum("microbatch", workload, model, batch, clip),
            clipped_grad_sum("microbatch", workload, model, batch, math.inf),
        )
    return out


def test_every_tiny_workload_is_covered():
    from models.catalog import TINY_WORKLOADS

    assert set(TINY_WORKLOADS) <= {name for name, overrides in WORKLOADS.values() if not overrides}


def test_the_reference_clips_some_samples_and_not_others(cases):
    for key, case in cases.items():
        clipped = case.sample_norms > case.clip
        assert clipped.any() and (~clipped).any(), f"{key}: norms {case.sample_norms.tolist()} vs C={case.clip}"
        # and clipping changes the sum, so the comparison below tests clipping, not just summation
        assert rel_err(case.ref_clipped, case.ref_sum) > 100 * TOL


def test_the_reference_is_right_on_one_sample(cases):
    """The loop's one-sample clipped sum is min(1, C/‖g‖)·g of nondp's plain gradient."""
    case = cases["dit-tiny-cond"]
    one = case.batch.select(0)
    g = clipped_grad_sum("nondp", case.workload, case.model, one, math.inf)
    got = clipped_grad_sum("microbatch", case.workload, case.model, one, case.clip)
    factor = min(1.0, case.clip / (float(flat(g).norm()) + 1e-6))
    assert rel_err(got, {n: factor * t for n, t in g.items()}) < 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", list(WORKLOADS))
def test_clipped_grad_sum_matches_the_per_sample_loop(cases, key, method):
    case = cases[key]
    model = case.model
    before = snapshot(model)
    clip = math.inf if method == "nondp" else case.clip
    if (method, key) == GHOST_TIED:
        with pytest.raises(MethodUnsupported) as info:
            clipped_grad_sum(method, case.workload, model, case.batch, clip)
        assert OPACUS_TYING_MESSAGE in info.value.reason
        assert "wte.weight" in info.value.diagnosis and "lm_head.weight" in info.value.diagnosis
    else:
        got = clipped_grad_sum(method, case.workload, model, case.batch, clip)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert sorted(got) == sorted(trainable)
        for name in got:
            assert got[name].shape == before[name].shape
        ref = case.ref_sum if method == "nondp" else case.ref_clipped
        err = rel_err({n: got[n] for n in ref}, ref)
        assert err <= TOL, f"{method} on {key}: relative error {err:.2e}"
    # weights (frozen DiT pos-embed included) unchanged, nothing left attached
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert_model_clean(model)


def test_frozen_parameters_get_no_entry(cases):
    case = cases["dit-tiny-cond"]
    assert not case.model.pos_embed.requires_grad
    for method in METHODS:
        clip = math.inf if method == "nondp" else case.clip
        assert "pos_embed" not in clipped_grad_sum(method, case.workload, case.model, case.batch, clip)
    assert case.model.pos_embed.grad is None


def test_nondp_refuses_a_finite_clip_norm(cases):
    case = cases["gpt-tiny"]
    with pytest.raises(MethodUnsupported, match="nondp does not clip per sample"):
        clipped_grad_sum("nondp", case.workload, case.model, case.batch, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# the fused step: SGD with lr = 1 makes the update readable: Δw·B = −(Σ_i clipped g_i + noise)


def run_one_step(case: Case, method: str, sigma: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Δw·B + reference clipped sum, per trainable parameter, after one fused step on a fresh model."""
    model = case.workload.build_model()
    before = snapshot(model)
    privacy = dp.resolve_privacy(case.clip, noise_multiplier=sigma, accountant="rdp")  # rdp: fast for any σ
    step = dp.build_step(
        method,
        case.workload,
        model,
        privacy=privacy,
        batch_size=BATCH,
        optimizer="sgd",
        lr=1.0,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    marks: list[str] = []
    try:
        loss = step(case.batch, marks.append)
    finally:
        step.close()
    assert torch.isfinite(loss) and loss.dim() == 0
    assert marks[0] == "forward" and marks[-1] == "end"
    assert list(dict.fromkeys(marks)) == [*dp.PHASES, "end"], marks  # every phase, in order of first mark
    ref = case.ref_sum if method == "nondp" else case.ref_clipped
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in frozen)
    return {n: (p.detach() - before[n]) * BATCH + ref[n] for n, p in model.named_parameters() if n in ref}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ["dit-tiny-cond", "gpt-tiny"])
def test_fused_step_without_noise_applies_the_clipped_sum(cases, key, method):
    case = cases[key]
    if (method, key) == GHOST_TIED:
        with pytest.raises(MethodUnsupported, match=OPACUS_TYING_MESSAGE):
            run_one_step(case, method, 0.0)
        return
    residual = run_one_step(case, method, 0.0)
    ref = case.ref_sum if method == "nondp" else case.ref_clipped
    assert float(flat(residual).norm() / flat(ref).norm()) <= TOL


@pytest.mark.parametrize("method", [m for m in METHODS if m != "nondp"])
def test_fused_step_adds_noise_sigma_c_once_per_batch(cases, method):
    case = cases["dit-tiny-cond"]
    sigma = 0.5
    residual = flat(run_one_step(case, method, sigma, seed=7))  # = the noise vector, N(0, (σC)²) per coordinate
    n, expected = residual.numel(), sigma * case.clip
    # The sample std of n normals has standard error ≈ σ/√(2n); 6 standard errors (n ≈ 1.8e5: ±1.0 %).
    # Noise added per sample instead of per batch would give √B·σC, noise divided twice σC/B: both far outside.
    assert abs(float(residual.std()) - expected) <= 6 * expected / math.sqrt(2 * n)
    assert abs(float(residual.mean())) <= 6 * expected / math.sqrt(n)
    # reproducible from the step's noise generator
    again = flat(run_one_step(case, method, sigma, seed=7))
    assert torch.allclose(residual, again, rtol=0, atol=1e-6 * expected)
    other = flat(run_one_step(case, method, sigma, seed=8))
    assert not torch.allclose(residual, other, rtol=0, atol=expected)


# ---------------------------------------------------------------------------------------------------------------
# a DiT whose top-level module owns a learnable position embedding (Opacus issue #777)


@pytest.fixture(scope="module")
def pos_embed_case():
    workload = models.get_workload("dit-tiny-cond", learnable_pos_embed=True)
    model = workload.build_model()
    return workload, model, workload.make_batch(BATCH, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["opacus-hooks", "opacus-functorch", "opacus-ghost"])
def test_opacus_replays_the_top_level_module_with_only_x(pos_embed_case, method):
    workload, model, batch = pos_embed_case
    with pytest.raises(MethodUnsupported) as info:
        clipped_grad_sum(method, workload, model, batch, 1.0)
    exc = info.value
    assert exc.reason.startswith("TypeError:") and "'t' and 'y'" in exc.reason  # Opacus' own failure
    assert "top-level DiT" in exc.diagnosis and "'pos_embed'" in exc.diagnosis and "#777" in exc.diagnosis
    assert "move the parameter into a submodule with a grad sampler" in exc.diagnosis
    with pytest.raises(MethodUnsupported):  # the fused step refuses too: no silent fallback
        dp.build_step(method, workload, model, privacy=dp.resolve_privacy(1.0, accountant="rdp"), batch_size=BATCH)
    assert_model_clean(model)
    model(*batch.inputs).sum().backward()  # still a usable plain module
    model.zero_grad(set_to_none=True)


def test_expanded_weights_refuses_the_learnable_pos_embed(pos_embed_case):
    workload, model, batch = pos_embed_case
    with pytest.raises(MethodUnsupported) as info:
        clipped_grad_sum("opacus-ew", workload, model, batch, 1.0)
    assert "Expanded Weights encountered but cannot handle function add" in info.value.reason
    assert "pos_embed" in info.value.diagnosis
    assert_model_clean(model)


def test_torch_func_trains_the_learnable_pos_embed(pos_embed_case):
    workload, model, batch = pos_embed_case
    norms = torch.stack(
        [flat(clipped_grad_sum("microbatch", workload, model, batch.select(i), math.inf)).norm() for i in range(BATCH)]
    )
    clip = float(norms.median())
    ref = clipped_grad_sum("microbatch", workload, model, batch, clip)
    got = clipped_grad_sum("torch-func", workload, model, batch, clip)
    assert "pos_embed" in got and float(got["pos_embed"].norm()) > 0
    assert rel_err({n: got[n] for n in ref}, ref) <= TOL
