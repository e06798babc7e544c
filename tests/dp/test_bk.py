"""Book-Keeping (`bk`, `bk-tiled`): per-sample norms and clipped sums against a brute-force per-sample loop.

The reference differentiates each sample's own loss separately with autograd (fp32, norms summed in fp64);
BK must agree to 1e-5 relative on small models covering every layer rule, and to 1e-4 on the tiny workloads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.dp import (
    MethodUnsupported,
    available_methods,
    build_step,
    clipped_grad_sum,
    get_method,
    resolve_privacy,
)
from bench.dp._common import clip_factors, trainable_parameters
from bench.dp.bk import BKMethod, BKTiledMethod, BookKeeping, supported_layers
from bench.trackers.channel import listening
from models import Batch, Workload, get_workload

from .threads import single_thread  # noqa: F401  (an autouse fixture)

# ---------------------------------------------------------------------------------------------------------------
# Reference


class PerSampleReference:
    """Per-sample gradients from one autograd call per sample; norms summed in float64."""

    def __init__(self, workload: Workload, model: nn.Module, batch: Batch):
        params = trainable_parameters(model)
        self.names = list(params)
        self.grads = []
        for i in range(batch.batch_size):
            sub = batch.select(i)
            loss = workload.loss_per_sample(model(*sub.inputs), sub.target).sum()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self.grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params.values())])
        self.norms = torch.stack([torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for gs in self.grads]).float()

    def clipped_sums(self, max_grad_norm: float) -> dict[str, Tensor]:
        factors = clip_factors(self.norms, max_grad_norm)
        return {name: sum(f * gs[k] for f, gs in zip(factors, self.grads)) for k, name in enumerate(self.names)}


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all parameters together (the global norm)."""
    assert set(got) == set(want)
    diff = math.sqrt(sum((got[k].double() - want[k].double()).pow(2).sum().item() for k in want))
    scale = math.sqrt(sum(want[k].double().pow(2).sum().item() for k in want))
    return diff / scale


# ---------------------------------------------------------------------------------------------------------------
# Small models, one per layer rule (and the combinations BK must get right)


class Linear2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3, bias=False)

    def forward(self, x):  # (B, 5)
        return self.fc2(torch.tanh(self.fc1(x)))


class Linear3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 9), nn.Linear(9, 4, bias=False)

    def forward(self, x):  # (B, T, 6)
        return self.fc2(F.gelu(self.fc1(x)))


class ConvPatchify(nn.Module):
    """DiT's patchify: kernel = stride = p, then a per-token Linear."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, kernel_size=2, stride=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # (B, 3, 6, 8)
        return self.head(torch.tanh(self.patch(x)).flatten(2).transpose(1, 2))  # (B, 12, 2)


class ConvGeneral(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1, dilation=2)
        self.conv2 = nn.Conv2d(5, 4, kernel_size=(3, 1), padding="same", bias=False)

    def forward(self, x):  # (B, 3, 9, 7)
        return self.conv2(torch.tanh(self.conv1(x)))  # (B, 4, 4, 3)


class TokenModel(nn.Module):
    """Embedding (tokens repeat: vocab 5, 9 positions), optionally with padding_idx, then a Linear head."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(5, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, idx):  # (B, T)
        return self.head(torch.tanh(self.emb(idx)))


class NormModel(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6, eps=1e-3, bias=bias)
        self.ln2d = nn.LayerNorm((3, 2))  # multi-dim normalized_shape
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # (B, T, 4)
        h = self.ln(self.fc(x))  # (B, T, 6)
        h = self.ln2d(h.unflatten(-1, (3, 2))).flatten(-2)
        return self.head(h)


class TiedLM(nn.Module):
    """GPT-2's tying: one V×D table used by the Embedding and by the Linear head."""

    def __init__(self, vocab=11, dim=8, tie=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):  # (B, T)
        return self.lm_head(torch.tanh(self.mix(self.wte(idx))))  # (B, T, V)


class TiedPooled(TiedLM):
    """Tied table whose Embedding use (T=7, 2T² ≥ V·D) is instantiated and whose head use (T=1) is ghost."""

    def forward(self, idx):  # (B, T)
        return self.lm_head(torch.tanh(self.mix(self.wte(idx))).mean(1))  # (B, V)


class TiedLabel(TiedLM):
    """Tied table whose Embedding use (a (B, 1) label) is ghost and whose head use (T=7) is instantiated."""

    def forward(self, x, y):  # (B, T, D), (B,)
        return self.lm_head(torch.tanh(self.mix(x) + self.wte(y.unsqueeze(1))))  # (B, T, V)


class SharedLinear(nn.Module):
    """One Linear called three times (Linear–Linear cross terms): on T=7, T=3 (both instantiated) and T=1 (ghost)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)

    def forward(self, x):  # (B, T, 4)
        h = self.shared(x)  # (B, T, 4)
        h = self.shared(torch.tanh(h[:, :3]))  # (B, 3, 4)
        return self.shared(torch.tanh(h).mean(1))  # (B, 4)


class MultiInput(nn.Module):
    """DiT-like: forward(x (B,T,d), t (B,) float, y (B,) int), with a frozen layer that must be ignored."""

    def __init__(self):
        super().__init__()
        self.x_proj = nn.Linear(5, 6)
        self.t_proj = nn.Linear(1, 6)
        self.y_emb = nn.Embedding(4, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(6, 5)

    def forward(self, x, t, y):
        c = self.t_proj(t[:, None]) + self.y_emb(y.unsqueeze(1)).squeeze(1)  # (B, 6)
        h = self.frozen(torch.tanh(self.x_proj(x) + c[:, None]))  # (B, T, 6)
        return self.out(input=h)  # (B, T, 5); a keyword input reaches the hook too


def mse_per_sample(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).flatten(1).mean(1)


def ce_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V), target.reshape(B * T), reduction="none").view(B, T).mean(1)


B = 5


def _workload(name, model_fn, inputs_fn, target_shape=None, loss=mse_per_sample, target_fn=None) -> Workload:
    def batch_fn(batch_size, g):
        inputs = inputs_fn(batch_size, g)
        target = target_fn(batch_size, g) if target_fn else torch.randn(batch_size, *target_shape, generator=g)
        return Batch(inputs, target)

    return Workload(name=name, model_fn=model_fn, batch_fn=batch_fn, loss_fn=loss)


CASES = {
    "linear-2d": _workload("linear-2d", Linear2D, lambda b, g: (torch.randn(b, 5, generator=g),), (3,)),
    "linear-3d": _workload("linear-3d", Linear3D, lambda b, g: (torch.randn(b, 7, 6, generator=g),), (7, 4)),
    "conv-patchify": _workload(
        "conv-patchify", ConvPatchify, lambda b, g: (torch.randn(b, 3, 6, 8, generator=g),), (12, 2)
    ),
    "conv-general": _workload(
        "conv-general", ConvGeneral, lambda b, g: (torch.randn(b, 3, 9, 7, generator=g),), (4, 4, 3)
    ),
    "embedding": _workload("embedding", TokenModel, lambda b, g: (torch.randint(0, 5, (b, 9), generator=g),), (9, 3)),
    "embedding-padding": _workload(
        "embedding-padding",
        lambda: TokenModel(padding_idx=1),
        lambda b, g: (torch.randint(0, 5, (b, 9), generator=g),),
        (9, 3),
    ),
    "layernorm": _workload("layernorm", NormModel, lambda b, g: (torch.randn(b, 7, 4, generator=g),), (7, 2)),
    "layernorm-nobias": _workload(
        "layernorm-nobias", lambda: NormModel(bias=False), lambda b, g: (torch.randn(b, 7, 4, generator=g),), (7, 2)
    ),
    "tied-lm": _workload(
        "tied-lm",
        TiedLM,
        lambda b, g: (torch.randint(0, 11, (b, 7), generator=g),),
        loss=ce_per_sample,
        target_fn=lambda b, g: torch.randint(0, 11, (b, 7), generator=g),
    ),
    "tied-pooled": _workload(
        "tied-pooled",
        TiedPooled,
        lambda b, g: (torch.randint(0, 11, (b, 7), generator=g),),
        loss=lambda logits, target: F.cross_entropy(logits, target, reduction="none"),
        target_fn=lambda b, g: torch.randint(0, 11, (b,), generator=g),
    ),
    "tied-label": _workload(
        "tied-label",
        TiedLabel,
        lambda b, g: (torch.randn(b, 7, 8, generator=g), torch.randint(0, 11, (b,), generator=g)),
        loss=ce_per_sample,
        target_fn=lambda b, g: torch.randint(0, 11, (b, 7), generator=g),
    ),
    "shared-linear": _workload("shared-linear", SharedLinear, lambda b, g: (torch.randn(b, 7, 4, generator=g),), (4,)),
    "multi-input": _workload(
        "multi-input",
        MultiInput,
        lambda b, g: (
            torch.randn(b, 7, 5, generator=g),
            torch.rand(b, generator=g),
            torch.randint(0, 4, (b,), generator=g),
        ),
        (7, 5),
    ),
}


def _setup(case: str):
    workload = CASES[case]
    torch.manual_seed(0)
    model = workload.build_model()
    batch = workload.make_batch(B, torch.Generator().manual_seed(1))
    return workload, model, batch


# ---------------------------------------------------------------------------------------------------------------
# Per layer type, every norm mode, whole and tiled Grams


@pytest.mark.parametrize("tile", [None, 3], ids=["whole", "tile3"])
@pytest.mark.parametrize("mode", ["mixed", "ghost", "instantiate"])
@pytest.mark.parametrize("case", list(CASES))
def test_norms_and_clipped_sum_match_per_sample_loop(case, mode, tile):
    workload, model, batch = _setup(case)
    reference = PerSampleReference(workload, model, batch)
    max_grad_norm = reference.norms.median().item()
    want_norms, want_sums = reference.norms, reference.clipped_sums(max_grad_norm)
    with BookKeeping(model, norm_mode=mode, tile_size=tile) as engine:
        result = engine.run(workload, batch, max_grad_norm)
    torch.testing.assert_close(result.per_sample_norms, want_norms, rtol=1e-5, atol=0)
    assert relative_error(result.clipped_sums, want_sums) < 1e-5
    # The median clip norm clips some samples and leaves others: both branches of min(1, C/‖g‖) are used.
    assert (result.clip_factors < 1).any() and (result.clip_factors == 1).any()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.isdisjoint(result.clipped_sums)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.bfloat16, 3e-2)])
def test_other_dtypes(dtype, tol):
    """Float64 and bfloat16 models: sums come back in the parameter's dtype, norms in float32."""
    workload, model, batch = _setup("tied-label")
    reference = PerSampleReference(workload, model.double(), _cast(batch, torch.float64))
    max_grad_norm = reference.norms.median().item()
    want = reference.clipped_sums(max_grad_norm)
    model = model.to(dtype)
    for tile in (None, 3):
        with BookKeeping(model, tile_size=tile) as engine:
            result = engine.run(workload, _cast(batch, dtype), max_grad_norm)
        assert result.per_sample_norms.dtype == torch.float32
        assert all(g.dtype == dtype for g in result.clipped_sums.values())
        torch.testing.assert_close(result.per_sample_norms, reference.norms, rtol=tol, atol=0)
        assert relative_error(result.clipped_sums, want) < tol


def _cast(batch: Batch, dtype) -> Batch:
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t
    return Batch(tuple(cast(t) for t in batch.inputs), cast(batch.target))


def test_unclipped_sum_is_the_summed_gradient():
    workload, model, batch = _setup("tied-lm")
    want = PerSampleReference(workload, model, batch).clipped_sums(math.inf)
    got = clipped_grad_sum("bk", workload, model, batch, math.inf)
    assert relative_error(got, want) < 1e-5


def test_mixed_rule_uses_both_branches():
    """Ghost when 2T² < rows·cols: a 2-D Linear (T=1) is ghost; patchify (T=12, 6×12 weight) is instantiated."""
    workload, model, batch = _setup("conv-patchify")
    with BookKeeping(model) as engine:
        kinds = engine.run(workload, batch, 1.0).norm_kinds
    assert kinds == {
        "patch.weight": "instantiated",
        "patch.bias": "instantiated",
        "head.weight": "instantiated",
        "head.bias": "instantiated",
    }
    workload, model, batch = _setup("linear-2d")
    with BookKeeping(model) as engine:
        kinds = engine.run(workload, batch, 1.0).norm_kinds
    assert kinds == {"fc1.weight": "ghost", "fc1.bias": "instantiated", "fc2.weight": "ghost"}
    workload, model, batch = _setup("tied-lm")
    with BookKeeping(model, norm_mode="ghost") as engine:
        kinds = engine.run(workload, batch, 1.0).norm_kinds
    assert kinds["wte.weight"] == "ghost"  # both uses, with their cross term
    with BookKeeping(model, norm_mode="instantiate") as engine:
        kinds = engine.run(workload, batch, 1.0).norm_kinds
    assert set(kinds.values()) == {"instantiated"}
    # Tied uses split between the two forms: the cross term of a materialised and a factored use is needed.
    for case, name in [("tied-pooled", "wte.weight"), ("tied-label", "wte.weight"), ("shared-linear", "shared.weight")]:
        workload, model, batch = _setup(case)
        with BookKeeping(model) as engine:
            assert engine.run(workload, batch, 1.0).norm_kinds[name] == "ghost+instantiated"


def test_ghost_and_instantiation_agree_on_gpt_tiny():
    workload = get_workload("gpt-tiny")
    model = workload.build_model()
    batch = workload.make_batch(4)
    results = {}
    for mode in ("ghost", "instantiate"):
        with BookKeeping(model, norm_mode=mode) as engine:
            results[mode] = engine.run(workload, batch, 1.0)
    torch.testing.assert_close(
        results["ghost"].per_sample_norms, results["instantiate"].per_sample_norms, rtol=1e-5, atol=0
    )
    assert relative_error(results["ghost"].clipped_sums, results["instantiate"].clipped_sums) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# bk-tiled


def test_methods_registered_with_visible_tile_size():
    assert {"bk", "bk-tiled"} <= set(available_methods())
    assert get_method("bk").tile_size is None
    assert get_method("bk-tiled").tile_size == BKTiledMethod.tile_size == 256
    assert BKTiledMethod(tile_size=16).tile_size == 16
    with pytest.raises(ValueError, match="tile_size"):
        BookKeeping(nn.Linear(2, 2), tile_size=0)
    with pytest.raises(ValueError, match="norm_mode"):
        BookKeeping(nn.Linear(2, 2), norm_mode="fast")


def test_tiled_equals_untiled_with_ragged_tiles():
    """gpt-tiny has T = 16; tile 5 leaves a ragged last tile (16 = 3·5 + 1)."""
    workload = get_workload("gpt-tiny")
    model = workload.build_model()
    batch = workload.make_batch(4)
    whole = BKMethod(norm_mode="ghost").clipped_grad_sum(workload, model, batch, 0.5)
    tiled = BKTiledMethod(tile_size=5, norm_mode="ghost").clipped_grad_sum(workload, model, batch, 0.5)
    assert relative_error(tiled, whole) < 1e-5


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("mode", ["mixed", "ghost"])
def test_tiled_never_allocates_a_batch_token_token_tensor(mode):
    T, tile = 40, 16  # T > tile and not a multiple of it; no other dimension of the model equals 40
    workload = _workload(
        "tied-long",
        lambda: TiedLM(vocab=300, dim=12),
        lambda b, g: (torch.randint(0, 300, (b, T), generator=g),),
        loss=ce_per_sample,
        target_fn=lambda b, g: torch.randint(0, 300, (b, T), generator=g),
    )
    torch.manual_seed(0)
    model = workload.build_model()
    batch = workload.make_batch(3)

    def shapes_seen(tile_size):
        with BookKeeping(model, norm_mode=mode, tile_size=tile_size) as engine, ShapeRecorder() as recorder:
            result = engine.run(workload, batch, 1.0)
        return recorder.shapes, result

    whole_shapes, whole = shapes_seen(None)
    tiled_shapes, tiled = shapes_seen(tile)
    assert any(s.count(T) >= 2 for s in whole_shapes)  # the untiled Grams are B×T×T: the check can fail
    assert not [s for s in tiled_shapes if s.count(T) >= 2]
    assert (3, tile, tile) in tiled_shapes
    assert relative_error(tiled.clipped_sums, whole.clipped_sums) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# What BK's backward does and leaves behind


def test_backward_goes_to_layer_outputs_only():
    workload, model, batch = _setup("tied-lm")
    seen: list[str] = []

    def mark(phase):
        seen.append(phase)
        if phase == "clip":  # the backward is over
            assert all(p.grad is None for p in model.parameters())

    with BookKeeping(model) as engine:
        engine.run(workload, batch, 1.0, mark)
    assert seen == ["forward", "backward", "clip"]


def test_annotated_buffers_include_output_gradients():
    workload, model, batch = _setup("linear-3d")
    shapes = []

    def listener(t):
        shapes.append(tuple(t.shape))

    with listening(listener):
        clipped_grad_sum("bk", workload, model, batch, 1.0)  # mixed rule: 2·7² ≥ 9·6, fc1 is instantiated
        assert (B, 7, 9) in shapes and (B, 7, 4) in shapes  # G of fc1 and fc2
        assert (B, 9, 6) in shapes and (B, 7, 7) not in shapes  # fc1's per-sample gradients, no Gram
        assert (B,) in shapes  # per-sample norms
        shapes.clear()
        with BookKeeping(model, norm_mode="ghost") as engine:
            engine.run(workload, batch, 1.0)
        assert (B, 7, 7) in shapes and (B, 9, 6) not in shapes  # Grams instead


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", ["bk", "bk-tiled"])
def test_clipped_grad_sum_leaves_model_untouched(method):
    workload, model, batch = _setup("multi-input")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clipped_grad_sum(method, workload, model, batch, 0.1)
    assert _hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    def broken_loss(out, target):
        raise RuntimeError("loss exploded")

    bad = Workload(name="bad", model_fn=MultiInput, batch_fn=workload.batch_fn, loss_fn=broken_loss)
    with pytest.raises(RuntimeError, match="loss exploded"):
        clipped_grad_sum(method, bad, model, batch, 0.1)
    assert _hook_count(model) == 0


# ---------------------------------------------------------------------------------------------------------------
# Unsupported models


class OwnsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x * self.scale)


def test_unsupported_parameter_owner_is_named():
    model = nn.Sequential(nn.Linear(3, 3), OwnsParameter())
    with pytest.raises(MethodUnsupported, match=r"'1' \(OwnsParameter\).*'scale'") as info:
        get_method("bk").check(None, model)
    assert info.value.method == "bk"
    with pytest.raises(MethodUnsupported, match="bk-tiled"):
        clipped_grad_sum("bk-tiled", CASES["linear-2d"], model, CASES["linear-2d"].make_batch(2), 1.0)
    model[1].scale.requires_grad_(False)  # frozen: ignored
    assert [name for name, _, _ in supported_layers(model)] == ["0", "1.fc"]


@pytest.mark.parametrize(
    "module, problem",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(4, 4, (2, 3), padding="same"), "asymmetric"),
        (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
        (nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq"),
        (nn.Conv1d(4, 4, 3), "Conv1d"),
        (nn.MultiheadAttention(4, 2), "in_proj_weight"),
    ],
)
def test_unsupported_layers_raise(module, problem):
    with pytest.raises(MethodUnsupported, match=problem):
        get_method("bk").check(None, nn.Sequential(module))


class FunctionalHead(TiedLM):
    """Ties the head to the table functionally (no module call): invisible to hooks, must be refused."""

    def forward(self, idx):
        return F.linear(torch.tanh(self.mix(self.wte(idx))), self.wte.weight)


def test_functional_use_of_a_parameter_is_refused():
    workload = _workload(
        "functional-head",
        FunctionalHead,
        lambda b, g: (torch.randint(0, 11, (b, 7), generator=g),),
        loss=ce_per_sample,
        target_fn=lambda b, g: torch.randint(0, 11, (b, 7), generator=g),
    )
    model = workload.build_model()
    with pytest.raises(MethodUnsupported, match=r"'wte\.weight' reach the loss outside"):
        clipped_grad_sum("bk", workload, model, workload.make_batch(2), 1.0)
    assert _hook_count(model) == 0


def test_learnable_pos_embed_dit_is_unsupported():
    workload = get_workload("dit-tiny-cond", learnable_pos_embed=True)
    with pytest.raises(MethodUnsupported, match=r"'<root>' \(DiT\).*'pos_embed'"):
        get_method("bk").check(workload, workload.build_model())


# ---------------------------------------------------------------------------------------------------------------
# The fused step


def test_fused_step_without_noise_is_sgd_on_clipped_mean():
    workload, model, batch = _setup("multi-input")
    reference = PerSampleReference(workload, model, batch)
    max_grad_norm = reference.norms.median().item()
    sums = clipped_grad_sum("bk", workload, model, batch, max_grad_norm)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    privacy = resolve_privacy(max_grad_norm, noise_multiplier=0.0)
    step = build_step("bk", workload, model, privacy=privacy, batch_size=B, optimizer="sgd", lr=1.0)
    marks = []
    loss = step(batch, marks.append)
    step.close()
    assert marks == ["forward", "backward", "clip", "noise", "optimizer", "end"]
    assert loss.shape == () and not loss.requires_grad
    for name, p in trainable_parameters(model).items():
        assert torch.equal(p.detach(), before[name] - sums[name] / B), name  # bit for bit: same pass, same ops
    assert _hook_count(model) == 0


def test_fused_step_adds_noise_of_the_right_scale():
    workload = _workload("wide", lambda: nn.Linear(64, 64), lambda b, g: (torch.randn(b, 64, generator=g),), (64,))
    model = workload.build_model()
    batch = workload.make_batch(B)
    sums = clipped_grad_sum("bk-tiled", workload, model, batch, 1.0)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    privacy = resolve_privacy(1.0, noise_multiplier=2.0)
    step = build_step(
        "bk-tiled",
        workload,
        model,
        privacy=privacy,
        batch_size=B,
        optimizer="sgd",
        lr=1.0,
        noise_generator=torch.Generator().manual_seed(3),
    )
    step(batch)
    step.close()
    noise = before["weight"] - model.weight.detach() - sums["weight"] / B  # N(0, σ²C²) / B
    assert abs(noise.std().item() - 2.0 / B) < 0.05 * 2.0 / B


# ---------------------------------------------------------------------------------------------------------------
# The tiny workloads


@pytest.mark.parametrize(
    "name, overrides",
    [("dit-tiny-cond", {}), ("dit-tiny-uncond", {}), ("gpt-tiny", {}), ("gpt-tiny", {"tie_weights": False})],
    ids=["dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny-tied", "gpt-tiny-untied"],
)
def test_tiny_workloads_match_per_sample_loop(name, overrides):
    workload = get_workload(name, **overrides)
    model = workload.build_model()
    batch = workload.make_batch(6)
    if name == "gpt-tiny":
        assert (model.lm_head.weight is model.wte.weight) == overrides.get("tie_weights", True)
    reference = PerSampleReference(workload, model, batch)
    max_grad_norm = reference.norms.median().item()  # some samples clip, some do not
    want = reference.clipped_sums(max_grad_norm)
    # bk, bk-tiled as registered (tile 256 > T: one tile), and bk-tiled with tiles below T (16 or 32 tokens)
    for impl in (get_method("bk"), get_method("bk-tiled"), BKTiledMethod(tile_size=5)):
        got = impl.clipped_grad_sum(workload, model, batch, max_grad_norm)
        assert relative_error(got, want) <= 1e-4, (impl.name, impl.tile_size)
