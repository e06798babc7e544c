"""DP fine-tuning (``--trainable``, bench/dp/trainable.py): every method right or refused over the trainable
parameters only, the frozen ones untouched, in every trainable mode on every tiny workload, and with the precision
and checkpointing modes.

Reference: the per-sample loop (``microbatch``) on the same prepared model, fp32 without checkpointing; its clipped
sum has the trainable parameters only. peft initialises ``lora_B`` with zeros, which makes every ``lora_A``
gradient zero: a method that got ``lora_A`` wrong would still match. So the LoRA models here get a seeded random
``lora_B`` (the same values in every model of a workload). Clip norm: the median per-sample norm of the batch, so
some samples clip and some do not (asserted). Tolerances: 1e-4 in fp32 (as tests/dp/test_equivalence.py),
``EQUIVALENCE_TOLERANCE`` in the other precisions (tests/dp/test_modes.py says why).
"""

from __future__ import annotations

import builtins
import dataclasses
import math

import pytest
import torch

import models
from bench import dp
from bench.dp import DPConfigError, ModeUnsupported, TrainingMode, clipped_grad_sum, prepare_model
from bench.dp.base import base_optimizer
from bench.dp.modes import EQUIVALENCE_TOLERANCE
from bench.dp.trainable import parse_trainable
from models.catalog import TINY_WORKLOADS

from .custom_workloads import mlp_workload
from .test_modes import expected_refusal
from .threads import single_thread  # noqa: F401  (an autouse fixture)

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BATCH = 4
TOL = 1e-4
TRAINABLES = ("bitfit", "attention", "lora:r=4")
METHODS = dp.available_methods()
# Opacus' per-sample state on a parameter (GradSampleModule, DPOptimizer, ghost clipping).
OPACUS_ATTRS = ("grad_sample", "_current_grad_sample", "summed_grad", "_norm_sample", "_forward_counter")


def prepared(name: str, mode: TrainingMode, device: str = "cpu") -> tuple[models.Workload, torch.nn.Module]:
    workload = models.get_workload(name)
    model = workload.build_model(device)
    prepare_model(model, workload, mode, device)
    if device != "meta":
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if ".lora_B." in pname:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return workload, model


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return float((flat({n: got[n] for n in want}) - flat(want)).norm() / flat(want).norm())


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str], tuple[float, dict, dict]]:
    """(workload, trainable) -> (clip, the loop's clipped sum, its plain sum), fp32."""
    out = {}
    for name in TINY_WORKLOADS:
        for trainable in TRAINABLES:
            mode = TrainingMode(trainable=trainable)
            workload, model = prepared(name, mode)
            batch = workload.make_batch(BATCH)
            norms = torch.stack(
                [
                    flat(clipped_grad_sum("microbatch", workload, model, batch.select(i), math.inf, mode=mode)).norm()
                    for i in range(BATCH)
                ]
            )
            clip = float(norms.median())
            assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any(), norms
            clipped = clipped_grad_sum("microbatch", workload, model, batch, clip, mode=mode)
            plain = clipped_grad_sum("microbatch", workload, model, batch, math.inf, mode=mode)
            out[name, trainable] = (clip, clipped, plain)
    return out


# ---------------------------------------------------------------------------------------------------------------
# what each mode trains


def trained_names(name: str, trainable: str, device: str = "cpu") -> list[str]:
    _, model = prepared(name, TrainingMode(trainable=trainable), device)
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", TINY_WORKLOADS)
def test_each_mode_trains_what_it_says_and_freezes_the_rest(name):
    workload = models.get_workload(name)
    full = dict(workload.build_model().named_parameters())
    bitfit = trained_names(name, "bitfit")
    assert bitfit and all(n.rsplit(".", 1)[1] == "bias" for n in bitfit)
    assert bitfit == [n for n in full if n.endswith(".bias")]  # every bias, LayerNorm ones included
    if name == "dit-tiny-plain" or name.startswith("gpt"):
        assert any("ln" in n or "norm" in n for n in bitfit)  # affine LayerNorms have biases; adaLN's have none
    attention = trained_names(name, "attention")
    projections = ("attn.qkv.", "attn.proj.") if name.startswith("dit") else ("attn.c_attn.", "attn.c_proj.")
    assert attention == [n for n in full if any(p in n for p in projections)] and len(attention) == 8
    lora = trained_names(name, "lora:r=4")
    assert len(lora) == 8 and all(".lora_A.default." in n or ".lora_B.default." in n for n in lora)
    _, model = prepared(name, TrainingMode(trainable="lora:r=4"))
    adapted = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4 and all(m.base_layer.weight.requires_grad is False for m in adapted)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in adapted)  # dropout 0
    assert all(m.scaling["default"] == 1.0 for m in adapted)  # alpha defaults to r
    assert lora == trained_names(name, "lora:r=4", "meta")  # the same on meta


def test_lora_rank_alpha_and_deterministic_adapters():
    _, a = prepared("gpt-tiny", TrainingMode(trainable="lora:r=2:alpha=6"))
    qkv = a.h[0].attn.c_attn
    assert qkv.lora_A["default"].weight.shape == (2, qkv.in_features) and qkv.scaling["default"] == 3.0
    workload = models.get_workload("gpt-tiny")
    one, two = workload.build_model(), workload.build_model()
    for model in (one, two):
        prepare_model(model, workload, TrainingMode(trainable="lora:r=2"), "cpu")
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters()))  # seeded lora_A init
    assert any(float(p.abs().sum()) > 0 for n, p in one.named_parameters() if ".lora_A." in n)


def test_trainable_names_ids_and_bad_input():
    assert TrainingMode(trainable="lora:r=8:alpha=8") == TrainingMode(trainable="lora:r=8")
    assert TrainingMode(trainable="lora:r=8").id_parts == ("lora-r8",)
    assert TrainingMode("bf16", "blocks", "lora:r=8:alpha=16").id_parts == ("bf16", "ckpt", "lora-r8-a16")
    assert TrainingMode(trainable="bitfit").label == "fp32+bitfit" and TrainingMode().id_parts == ()
    assert parse_trainable("lora:r=16:alpha=0.5").alpha == 0.5
    for bad, message in [
        ("lora:r=0", "the rank must be >= 1"),
        ("lora:r=4:alpha=0", "alpha > 0"),
        ("lora", "unknown trainable 'lora'"),
        ("lora:rank=4", "unknown trainable"),
        ("biases", "unknown trainable 'biases'; valid: full, bitfit, attention or lora:r=R"),
    ]:
        with pytest.raises(DPConfigError, match=message) as info:
            TrainingMode(trainable=bad)
        assert "\n" not in str(info.value)


def test_what_a_workload_cannot_fine_tune_is_unsupported_with_the_reason():
    byo = mlp_workload("byo-mlp")  # names no attention modules
    for trainable in ("attention", "lora:r=2"):
        with pytest.raises(ModeUnsupported, match="names no attention modules") as info:
            prepare_model(byo.build_model(), byo, TrainingMode(trainable=trainable), "cpu")
        assert "attention_module_names" in info.value.diagnosis
    stray = dataclasses.replace(byo, attention_module_names=("fc1", "blocks.*.qkv"))
    with pytest.raises(ModeUnsupported, match=r"pattern 'blocks\.\*\.qkv' matches no module"):
        prepare_model(stray.build_model(), stray, TrainingMode(trainable="attention"), "cpu")
    named = dataclasses.replace(byo, attention_module_names=("fc*",))
    model = named.build_model()
    prepare_model(model, named, TrainingMode(trainable="lora:r=2"), "cpu")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fc1.lora_A.default.weight", "fc1.lora_B.default.weight", "fc2.lora_A.default.weight",
        "fc2.lora_B.default.weight",
    ]  # fmt: skip
    unbiased = models.get_workload("dit-tiny-cond")
    model = unbiased.build_model()
    for module in model.modules():
        for pname in [n for n, _ in module.named_parameters(recurse=False) if n == "bias"]:
            setattr(module, pname, None)
    with pytest.raises(ModeUnsupported, match="has no bias parameter"):
        prepare_model(model, unbiased, TrainingMode(trainable="bitfit"), "cpu")


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ModuleNotFoundError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    workload = models.get_workload("gpt-tiny")
    with pytest.raises(ModeUnsupported, match="peft is not installed") as info:
        prepare_model(workload.build_model(), workload, TrainingMode(trainable="lora:r=8"), "cpu")
    assert info.value.diagnosis == "pip install 'dpmem[lora]'"


def test_a_model_prepared_for_another_trainable_mode_is_a_usage_error():
    workload, model = prepared("gpt-tiny-untied", TrainingMode(trainable="bitfit"))
    batch = workload.make_batch(2)
    with pytest.raises(DPConfigError, match="trainable 'full' but the model was prepared for 'bitfit'"):
        clipped_grad_sum("bk", workload, model, batch, 1.0)
    with pytest.raises(DPConfigError, match="already prepared for --trainable bitfit"):
        prepare_model(model, workload, TrainingMode(trainable="lora:r=2"), "cpu")


# ---------------------------------------------------------------------------------------------------------------
# every method right or refused, fp32


GRID = [(n, t, m) for n in TINY_WORKLOADS for t in TRAINABLES for m in METHODS]


@pytest.mark.parametrize("name,trainable,method", GRID, ids=[f"{n}-{t}-{m}" for n, t, m in GRID])
def test_right_over_the_trainable_parameters_only(references, name, trainable, method):
    mode = TrainingMode(trainable=trainable)
    workload, model = prepared(name, mode)
    clip, clipped, plain = references[name, trainable]
    got = clipped_grad_sum(
        method, workload, model, workload.make_batch(BATCH), math.inf if method == "nondp" else clip, mode=mode
    )
    want = plain if method == "nondp" else clipped
    assert list(got) == list(want) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert rel_err(got, want) <= TOL, f"{method}: relative error {rel_err(got, want):.2e}"


# ---------------------------------------------------------------------------------------------------------------
# with the precision and checkpointing modes: everything on dit-tiny-cond, a subset on the others

ALL_MODES = [(p, c) for p in dp.PRECISIONS for c in dp.CHECKPOINTINGS if (p, c) != ("fp32", "none")]
MODE_GRID = [("dit-tiny-cond", t, p, c) for t in TRAINABLES for p, c in ALL_MODES] + [
    ("gpt-tiny-untied", "lora:r=4", "amp-bf16", "blocks"),
    ("gpt-tiny-untied", "bitfit", "bf16", "none"),
    ("gpt-tiny", "lora:r=4", "amp-fp16", "none"),
    ("dit-tiny-plain", "attention", "fp32", "blocks"),
    ("dit-tiny-uncond", "bitfit", "bf16", "blocks"),
]
MODE_CASES = [(*case, m) for case in MODE_GRID for m in METHODS]


def fine_tuning_refusal(method: str, name: str, mode: TrainingMode) -> str | None:
    """The refusals of full training (tests/dp/test_modes.py), as fine-tuning changes them."""
    if method == "opacus-ghost" and name == "gpt-tiny" and not mode.loss_scaling:
        return None  # the tied embedding is frozen in every fine-tuning mode: nothing tied trains
    frozen_head = mode.fine_tuning.kind in ("attention", "lora")
    ew_amp_blocks = method == "opacus-ew" and mode.autocast_dtype is not None and mode.checkpointing == "blocks"
    if ew_amp_blocks and frozen_head and not mode.loss_scaling:
        # the dtype mismatch of full training comes from the first trainable layer the backward meets, the head;
        # frozen, the first trainable layers are inside a checkpointed block, whose recompute fails first
        return "CheckpointError"
    return expected_refusal(method, name, mode)


@pytest.mark.parametrize(
    "name,trainable,precision,checkpointing,method", MODE_CASES, ids=["-".join(c) for c in MODE_CASES]
)
def test_right_or_refused_in_every_training_mode(references, name, trainable, precision, checkpointing, method):
    mode = TrainingMode(precision, checkpointing, trainable)
    workload, model = prepared(name, mode)
    clip, clipped, plain = references[name, trainable]
    batch = workload.make_batch(BATCH)
    refusal = fine_tuning_refusal(method, name, mode)
    if refusal is not None:
        with pytest.raises(dp.MethodUnsupported) as info:
            clipped_grad_sum(method, workload, model, batch, clip, mode=mode)
        assert refusal in info.value.reason and info.value.diagnosis, str(info.value)
        return
    got = clipped_grad_sum(method, workload, model, batch, math.inf if method == "nondp" else clip, mode=mode)
    want = plain if method == "nondp" else clipped
    assert list(got) == list(want)
    err = rel_err(got, want)
    assert err <= max(TOL, EQUIVALENCE_TOLERANCE[precision]), f"{method} {mode.label}: relative error {err:.2e}"
    assert all(g.dtype == mode.param_dtype for g in got.values())


# ---------------------------------------------------------------------------------------------------------------
# the frozen parameters are untouched by a fused step


@pytest.mark.parametrize("trainable", TRAINABLES)
@pytest.mark.parametrize("method", METHODS)
def test_a_fused_step_leaves_the_frozen_parameters_untouched(method, trainable):
    mode = TrainingMode(trainable=trainable)
    name = "dit-tiny-cond"
    workload, model = prepared(name, mode)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    privacy = dp.resolve_privacy(1.0, noise_multiplier=1.0, accountant="rdp")
    step = dp.build_step(method, workload, model, privacy=privacy, batch_size=BATCH, lr=1e-2, mode=mode)
    seen_per_sample: list[str] = []
    try:
        inner = base_optimizer(step.optimizer)
        original = inner.step

        def checking_step(*args, **kwargs):  # between the backward and the update: every per-sample buffer exists
            seen_per_sample.extend(n for n, p in frozen.items() if any(hasattr(p, a) for a in OPACUS_ATTRS))
            seen_per_sample.extend(n for n, p in frozen.items() if p.grad is not None)
            return original(*args, **kwargs)

        inner.step = checking_step
        step(workload.make_batch(BATCH))
        state = inner.state
        assert not seen_per_sample, f"frozen parameters with a gradient or per-sample state: {seen_per_sample}"
        assert all(p not in state for p in frozen.values()), "optimizer state for a frozen parameter"
        assert all(p in state for p in trained.values())
        assert all(id(p) not in {id(q) for g in inner.param_groups for q in g["params"]} for p in frozen.values())
        assert all(torch.equal(p, before[n]) for n, p in frozen.items())
        assert all(not torch.equal(p, before[n]) for n, p in trained.items())
    finally:
        step.close()
    for n, p in frozen.items():
        assert p.grad is None and not any(hasattr(p, a) for a in OPACUS_ATTRS), n
