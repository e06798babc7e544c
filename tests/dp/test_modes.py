"""Every DP method in every training mode (precision × activation checkpointing): right or refused, never
silently wrong.

Reference: the per-sample loop (``microbatch``) in fp32 without checkpointing, on a model built from the same
seed; the tested model is built again and prepared for the mode (``prepare_model``: bf16 weights, checkpointed
blocks). The clip norm sits in the middle of the largest gap between two adjacent per-sample norms of a batch
chosen to have one (``MARGIN_SEEDS``): some samples clip, some do not, and every norm is ≥ ``MIN_MARGIN`` away
from C.

Tolerances, relative error of the clipped sum in global norm, and why:

* fp32 with checkpointing: 1e-5 — the recompute runs the same fp32 kernels on the same inputs (measured: the
  same error as without checkpointing, ≤ 3e-7, all of it the methods' own summation order);
* amp-fp16: 2e-3 ≈ 8 u with u = 2^-12, fp16's unit roundoff — autocast rounds every matmul's inputs and outputs
  to fp16 in the forward and the backward (measured 3.5e-4 … 7e-4);
* amp-bf16 and bf16: 1.6e-2 ≈ 8 u with u = 2^-9, bf16's (measured 3e-3 … 7.6e-3; pure bf16 also rounds the
  weights and the gradients).

(``bench.dp.modes.EQUIVALENCE_TOLERANCE``, which ``python -m bench.dp --modes`` judges by too.)

What these catch: a layer seen twice or missed in a recomputed block, or a loss scale in the clipping norm
(2^16), changes the sum by O(1). A sample clipped that should not be (or the reverse) changes it by about
margin × ‖g_i‖/‖Σ‖, which in bf16 can hide under the tolerance — so every cell also recovers the clip factors
the method applied (least squares of its sum on the reference per-sample gradients) and requires the clipped
set to be the reference's and each factor within ``FACTOR_TOL`` of it. Norms must be accumulated in fp32 for
that: a 16-bit norm rounds to 8 or 11 bits.

Budget: every method × every mode on dit-tiny-cond and gpt-tiny-untied; tied gpt-tiny (BK's cross terms,
Opacus ghost's refusal) in the modes that change them; the plain and unconditional DiTs with checkpointing
(their own block types) in one mode each. Models at module scope, batch 4.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

import models
from bench import dp
from bench.dp import DPConfigError, MethodUnsupported, ModeUnsupported, TrainingMode, clipped_grad_sum, prepare_model
from bench.dp._common import clip_factors
from bench.dp.bk import BookKeeping
from bench.dp.bk_layers import Factored, factored_inner
from bench.dp.modes import EQUIVALENCE_TOLERANCE
from models.checkpointing import checkpoint_modules, checkpoint_pass, checkpointed_modules

from .custom_workloads import mlp_workload
from .threads import single_thread  # noqa: F401  (an autouse fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BATCH = 4
TOLERANCE = EQUIVALENCE_TOLERANCE
TOL_FP16 = TOLERANCE["amp-fp16"]
FACTOR_TOL = 1e-2  # recovered clip factors: measured ≤ 6.5e-3 in bf16, ≤ 1.3e-4 in fp16, ≤ 7e-8 in fp32
MIN_MARGIN = 0.03  # every per-sample norm at least 3 % from C (bf16 norms are off by 0.2–0.4 %)
# batch seed per workload: one whose sorted per-sample norms have a gap of ≥ 2·MIN_MARGIN (checked below)
MARGIN_SEEDS = {"dit-tiny-cond": 5, "gpt-tiny-untied": 3, "gpt-tiny": 1, "dit-tiny-plain": 1, "dit-tiny-uncond": 1}
ALL_MODES = [TrainingMode(p, c) for p in dp.PRECISIONS for c in dp.CHECKPOINTINGS]
GRID_MODES = {
    "dit-tiny-cond": ALL_MODES,
    "gpt-tiny-untied": ALL_MODES,
    "gpt-tiny": [TrainingMode("amp-bf16", "blocks"), TrainingMode("bf16"), TrainingMode("amp-fp16")],
    "dit-tiny-plain": [TrainingMode("amp-bf16", "blocks")],
    "dit-tiny-uncond": [TrainingMode("bf16", "blocks")],
}
METHODS = dp.available_methods()

# The refusals the modes cause, and the library text each must carry (None: runs and must match).
OPACUS = ("opacus-hooks", "opacus-functorch", "opacus-ew", "opacus-ghost")


def expected_refusal(method: str, workload: str, mode: TrainingMode) -> str | None:
    if method.startswith("opacus") and mode.loss_scaling:
        return "no loss-scaling (GradScaler) support"
    if method == "opacus-ghost" and workload == "gpt-tiny":
        return "Parameter tying is not supported with Ghost Clipping"
    if method == "opacus-ew" and mode.autocast_dtype is not None:  # fails in the first backward, before any recompute
        return "expected m1 and m2 to have the same dtype"
    if method == "opacus-ew" and mode.checkpointing == "blocks":
        return "CheckpointError"
    if method == "torch-func" and mode.checkpointing == "blocks":
        return "don't yet support saved tensor hooks"
    return None


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


@dataclass
class Reference:
    workload: models.Workload
    batch: models.Batch
    names: list[str]
    per_sample: torch.Tensor  # (P, B) float64: fp32 per-sample gradients, parameters concatenated
    clip: float
    factors: torch.Tensor  # (B,) float64: min(1, C/(‖g_i‖ + 1e-6))
    clipped_sum: dict[str, torch.Tensor]
    plain_sum: dict[str, torch.Tensor]  # Σ_i g_i (nondp's, at C = inf)
    margin: float

    def recovered_factors(self, got: dict[str, torch.Tensor]) -> torch.Tensor:
        """The c_i with Σ_i c_i g_i closest to ``got`` (least squares on the reference per-sample gradients)."""
        target = flat({n: got[n] for n in self.names}).unsqueeze(1)
        return torch.linalg.lstsq(self.per_sample, target).solution.squeeze(1)


@pytest.fixture(scope="module")
def references() -> dict[str, Reference]:
    out = {}
    for name, seed in MARGIN_SEEDS.items():
        workload = models.get_workload(name)
        model = workload.build_model()
        batch = workload.make_batch(BATCH, generator=torch.Generator().manual_seed(seed))
        samples = [clipped_grad_sum("microbatch", workload, model, batch.select(i), math.inf) for i in range(BATCH)]
        per_sample = torch.stack([flat(g) for g in samples], dim=1)  # (P, B)
        norms = per_sample.norm(dim=0)
        ordered = norms.sort().values
        k = int((ordered[1:] / ordered[:-1]).argmax())
        clip = float((ordered[k] * ordered[k + 1]).sqrt())  # the middle of the largest gap, geometrically
        margin = float((ordered[k + 1] / ordered[k]).sqrt()) - 1
        out[name] = Reference(
            workload,
            batch,
            list(samples[0]),
            per_sample,
            clip,
            clip_factors(norms, clip),
            clipped_grad_sum("microbatch", workload, model, batch, clip),
            clipped_grad_sum("microbatch", workload, model, batch, math.inf),
            margin,
        )
    return out


@pytest.fixture(scope="module")
def prepared_models() -> dict[tuple[str, TrainingMode], torch.nn.Module]:
    """One model per (workload, mode), built on first use and shared by every method."""
    return {}


def prepared(cache, name: str, mode: TrainingMode) -> torch.nn.Module:
    if (name, mode) not in cache:
        workload = models.get_workload(name)
        model = workload.build_model()
        prepare_model(model, workload, mode, "cpu")
        cache[name, mode] = model
    return cache[name, mode]


def test_the_reference_batches_have_margins(references):
    for name, ref in references.items():
        clipped = ref.factors < 1
        assert clipped.any() and (~clipped).any(), f"{name}: factors {ref.factors.tolist()}"
        assert ref.margin >= MIN_MARGIN, f"{name}: margin {ref.margin:.3f}"


GRID = [(name, mode, method) for name, modes in GRID_MODES.items() for mode in modes for method in METHODS]


@pytest.mark.parametrize(
    "name,mode,method", GRID, ids=[f"{n}-{m}-{'-'.join(mode.id_parts) or 'fp32'}" for n, mode, m in GRID]
)
def test_right_or_refused(references, prepared_models, name, mode, method):
    ref = references[name]
    model = prepared(prepared_models, name, mode)
    refusal = expected_refusal(method, name, mode)
    clip = math.inf if method == "nondp" else ref.clip
    if refusal is not None:
        with pytest.raises(MethodUnsupported) as info:
            clipped_grad_sum(method, ref.workload, model, ref.batch, clip, mode=mode)
        assert refusal in info.value.reason and info.value.diagnosis, str(info.value)
        return
    got = clipped_grad_sum(method, ref.workload, model, ref.batch, clip, mode=mode)
    want = ref.plain_sum if method == "nondp" else ref.clipped_sum
    err = float((flat({n: got[n] for n in want}) - flat(want)).norm() / flat(want).norm())
    assert err <= TOLERANCE[mode.precision], f"{method} {mode}: relative error {err:.2e}"
    assert all(got[n].dtype == mode.param_dtype for n in got)  # sums in the weights' dtype, like p.grad
    if method == "nondp":
        return
    factors = ref.recovered_factors(got)
    assert torch.equal(factors < 1 - ref.margin / 2, ref.factors < 1), f"clipped set {factors.tolist()}"
    assert float((factors - ref.factors).abs().max()) <= FACTOR_TOL, factors.tolist()


def test_checkpointing_really_recomputes_and_the_opacus_recipe_is_needed(references):
    """The blocks run twice per step (a layer's forward hook fires in the forward and in the recompute), and
    Opacus' own GradSampleModule — capturing in both — fails on that; dpmem's wrapper captures once."""
    ref = references["gpt-tiny-untied"]
    model = ref.workload.build_model()
    prepare_model(model, ref.workload, TrainingMode(checkpointing="blocks"), "cpu")
    assert checkpointed_modules(model) == ["h.0", "h.1"]
    passes = []
    handle = model.h[0].attn.c_attn.register_forward_hook(lambda *_: passes.append(checkpoint_pass()))
    ref.workload.loss_per_sample(model(*ref.batch.inputs), ref.batch.target).sum().backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    assert passes == ["forward", "recompute"]
    wrapper = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        ref.workload.loss_per_sample(wrapper(*ref.batch.inputs), ref.batch.target).mean().backward()
        optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=BATCH,
            loss_reduction="mean",
        )
        with pytest.raises(ValueError, match="Per sample gradient is not initialized"):
            optimizer.clip_and_accumulate()
    finally:
        wrapper._close()


def test_bk_records_each_layer_once_per_step_under_checkpointing(references, monkeypatch):
    ref = references["dit-tiny-cond"]
    collect = BookKeeping._collect_terms
    seen: list[tuple[str, int]] = []

    def counting(self, uses, grads, batch_size):
        seen.append((self.mode.checkpointing, len(uses)))
        return collect(self, uses, grads, batch_size)

    monkeypatch.setattr(BookKeeping, "_collect_terms", counting)
    for mode in (TrainingMode(), TrainingMode(checkpointing="blocks")):
        model = ref.workload.build_model()
        prepare_model(model, ref.workload, mode, "cpu")
        with BookKeeping(model, mode=mode) as engine:
            engine.run(ref.workload, ref.batch, ref.clip)
    counts = {kind: [n for k, n in seen if k == kind] for kind in ("none", "blocks")}
    assert counts["blocks"] == counts["none"] and counts["none"][0] > 0


def test_ghost_norms_accumulate_in_fp32():
    """A Gram of 16-bit factors, accumulated in 16 bits, is off by ~1e-3; BK's is the fp64 value to fp32
    precision."""
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(3, 64, 48, generator=gen).bfloat16()
    right = torch.randn(3, 64, 40, generator=gen)  # fp32 input, bf16 output gradient: autocast's mix
    use = Factored(left=left, right=right, rows=48)
    got = factored_inner(use, use, tile=16)
    exact = torch.stack([(left[i].double().T @ right[i].double()).pow(2).sum() for i in range(3)])
    assert got.dtype == torch.float32
    assert float(((got.double() - exact) / exact).abs().max()) < 1e-5
    weighted = use.weighted_sum(torch.tensor([0.5, 1.0, 0.25]))
    assert weighted.dtype == torch.float32  # the common dtype of the two factors


# ---------------------------------------------------------------------------------------------------------------
# loss scaling (amp-fp16)


def test_a_gradscaler_around_opacus_would_clip_silently_wrong(references):
    """Why opacus-* × amp-fp16 is refused: GradScaler unscales p.grad, but DPOptimizer clips p.grad_sample, so
    the loss scale enters the clipping norm and every sample is clipped to C/scale."""
    ref = references["dit-tiny-cond"]
    model = ref.workload.build_model()
    wrapper = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    scaler = torch.amp.GradScaler("cpu")
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ref.workload.loss_per_sample(wrapper(*ref.batch.inputs), ref.batch.target).mean()
        scaler.scale(loss).backward()
        optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=ref.clip,
            expected_batch_size=BATCH,
            loss_reduction="mean",
        )
        scaler.unscale_(optimizer)  # what a GradScaler does before optimizer.step()
        optimizer.clip_and_accumulate()
        got = {n: p.summed_grad for n, p in model.named_parameters() if p.requires_grad}
    finally:
        wrapper._close()
    factors = ref.recovered_factors(got)
    assert float(factors.max()) < 1e-3  # every sample clipped, to about C/2^16 of its gradient


def fused_update(ref: Reference, method: str, mode: TrainingMode, init_scale: float | None = None):
    """(Δw·B per parameter, the step) after one fused step with σ = 0 and SGD lr = 1: Δw·B = −Σ_i clipped g_i."""
    model = ref.workload.build_model()
    prepare_model(model, ref.workload, mode, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    privacy = dp.resolve_privacy(ref.clip, noise_multiplier=0.0, accountant="rdp")
    step = dp.build_step(
        method, ref.workload, model, privacy=privacy, batch_size=BATCH, optimizer="sgd", lr=1.0, mode=mode
    )
    if init_scale is not None:
        step.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    try:
        marks: list[str] = []
        step(ref.batch, marks.append)
        assert list(dict.fromkeys(marks)) == [*dp.PHASES, "end"]
    finally:
        step.close()
    return {n: (before[n] - p.detach()) * BATCH for n, p in model.named_parameters() if p.requires_grad}, step


@pytest.mark.parametrize("method", ["nondp", "bk", "bk-tiled", "torch-func", "microbatch"])
def test_fused_amp_fp16_step_applies_the_unscaled_clipped_sum(references, method):
    ref = references["gpt-tiny-untied"]
    applied, step = fused_update(ref, method, TrainingMode("amp-fp16"))
    want = ref.plain_sum if method == "nondp" else ref.clipped_sum
    err = float((flat({n: applied[n] for n in want}) - flat(want)).norm() / flat(want).norm())
    assert err <= TOL_FP16, f"{method}: relative error {err:.2e}"
    assert step.scaler.get_scale() == 2.0**16  # no overflow at the initial scale: the scale stays


@pytest.mark.parametrize("method", ["nondp", "bk", "microbatch"])
def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(references, method):
    ref = references["dit-tiny-cond"]
    applied, step = fused_update(ref, method, TrainingMode("amp-fp16"), init_scale=2.0**40)
    assert all(float(d.abs().max()) == 0 for d in applied.values())  # weights untouched
    assert step.scaler.get_scale() == 2.0**39


# ---------------------------------------------------------------------------------------------------------------
# preparation: what a device or a workload cannot do, and a model prepared for another mode


def test_prepare_model_casts_and_wraps_and_reads_no_values():
    workload = models.get_workload("dit-tiny-cond")
    model = workload.build_model("meta")
    handle = prepare_model(model, workload, TrainingMode("bf16", "blocks"), "meta")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert checkpointed_modules(model) == ["blocks.0", "blocks.1"]
    handle.remove()
    assert checkpointed_modules(model) == []


@pytest.mark.parametrize("precision", ["amp-bf16", "amp-fp16"])
def test_autocast_on_meta_is_emulated_never_silently_fp32(precision):
    """A meta case autocasts inside bench.dp.autocast_emulation.meta_autocast (the runner enters it); outside
    it the forward context refuses, naming it, instead of running an fp32 forward."""
    from bench.dp.autocast_emulation import MetaGradScaler, meta_autocast

    workload = models.get_workload("gpt-tiny")
    model = workload.build_model("meta")
    mode = TrainingMode(precision)
    assert prepare_model(model, workload, mode, "meta") is None
    meta = torch.device("meta")
    with pytest.raises(DPConfigError, match="meta_autocast"):
        mode.forward_context(meta)
    batch = workload.make_batch(2, generator=torch.Generator().manual_seed(0), device="meta")
    with meta_autocast(), mode.forward_context(meta):
        assert model(*batch.inputs).dtype == mode.autocast_dtype  # lm_head is a Linear: cast to the autocast dtype
    assert isinstance(mode.new_scaler(meta), MetaGradScaler) == mode.loss_scaling


def test_a_workload_without_block_types_cannot_be_checkpointed():
    workload = mlp_workload("byo-mlp")
    with pytest.raises(ModeUnsupported, match="names no module types to checkpoint") as info:
        prepare_model(workload.build_model(), workload, TrainingMode(checkpointing="blocks"), "cpu")
    assert "checkpoint_module_types" in info.value.diagnosis
    stranger = dataclasses.replace(workload, checkpoint_module_types=(torch.nn.Conv3d,))
    with pytest.raises(ModeUnsupported, match="has no module of type Conv3d"):
        prepare_model(stranger.build_model(), stranger, TrainingMode(checkpointing="blocks"), "cpu")


def test_a_model_prepared_for_another_mode_is_a_usage_error(references):
    ref = references["gpt-tiny-untied"]
    plain = ref.workload.build_model()
    privacy = dp.resolve_privacy(1.0, accountant="rdp")
    with pytest.raises(DPConfigError, match="precision bf16 trains bfloat16 weights but the model's are float32"):
        clipped_grad_sum("bk", ref.workload, plain, ref.batch, 1.0, mode=TrainingMode("bf16"))
    with pytest.raises(DPConfigError, match="checkpointing 'blocks' but the model is not checkpointed"):
        dp.build_step("bk", ref.workload, plain, privacy=privacy, batch_size=2, mode=TrainingMode("fp32", "blocks"))
    cast = ref.workload.build_model().to(torch.bfloat16)
    with pytest.raises(DPConfigError, match="precision amp-bf16 trains float32 weights but the model's are bfloat16"):
        clipped_grad_sum("bk", ref.workload, cast, ref.batch, 1.0, mode=TrainingMode("amp-bf16"))
    assert clipped_grad_sum("bk", ref.workload, plain.double(), ref.batch, 1.0)  # float64 is the user's choice
    plain.float()
    checkpoint_modules(plain, ref.workload.checkpoint_module_types)
    with pytest.raises(DPConfigError, match="checkpointing 'none' but the model is checkpointed"):
        dp.build_step("nondp", ref.workload, plain, privacy=privacy, batch_size=2)
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_modules(plain, ref.workload.checkpoint_module_types)


def test_mode_names_and_case_id_parts():
    assert TrainingMode().id_parts == ()
    assert TrainingMode("amp-bf16", "blocks").id_parts == ("amp-bf16", "ckpt")
    assert TrainingMode("bf16").param_dtype == torch.bfloat16 and TrainingMode("amp-bf16").param_dtype == torch.float32
    with pytest.raises(DPConfigError, match="unknown precision 'fp8'; valid: fp32, amp-bf16, amp-fp16, bf16"):
        TrainingMode("fp8")
    with pytest.raises(DPConfigError, match="unknown checkpointing 'all'; valid: none, blocks"):
        TrainingMode(checkpointing="all")
