"""Workloads: paper parameter counts, shapes, batch randomness, determinism, errors, bring-your-own modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import Batch, Workload, WorkloadError, get_workload, list_workloads, load_workload_module
from models.diffusion import alphas_cumprod, linear_beta_schedule
from models.dit import DIT_CONFIGS, DiT, UnconditionalDiT, build_dit

REPO = Path(__file__).resolve().parents[2]
TINY = ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny")


def n_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def loss_and_grads(workload: Workload, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = workload.loss_per_sample(model(*batch.inputs), batch.target)
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ parameter counts
# Reference figures: /work/shared/reference/ANCHORS.md (DiT reference implementation; nanoGPT GPT-2, tied).


@pytest.mark.parametrize(
    "name, total",
    [
        ("dit-xl-2-cond", 675_129_632),
        ("dit-xl-4-cond", 675_074_432),
        ("dit-xl-8-cond", 675_683_072),
        ("dit-l-2-cond", 458_102_816),
        ("dit-b-2-cond", 130_512_416),
        ("dit-s-2-cond", 32_963_360),
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_paper_parameter_counts(name, total):
    model = get_workload(name).build_model(device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert n_params(model) == total


def test_dit_xl2_trainable_count_excludes_fixed_pos_embed():
    model = get_workload("dit-xl-2-cond").build_model(device="meta")
    assert n_params(model, trainable_only=True) == 674_834_720
    assert not model.pos_embed.requires_grad and tuple(model.pos_embed.shape) == (1, 256, 1152)


def test_dit_named_config_factories():
    assert len(DIT_CONFIGS) == 12
    config = DIT_CONFIGS["DiT-XL/2"]()
    assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (28, 1152, 16, 2)
    assert config.num_tokens == 256 and config.out_channels == 8
    assert DIT_CONFIGS["DiT-S/8"](image_size=512).num_tokens == 64


def test_512px_xl2_has_1024_tokens():
    workload = get_workload("dit-xl-2-cond-512")
    assert workload.tokens_per_sample == 1024 and workload.info["image_size"] == 512
    model = workload.build_model(device="meta")
    assert tuple(model.pos_embed.shape) == (1, 1024, 1152)
    assert workload.info["config"] == "DiT-XL/2"


def test_catalog_names():
    names = set(list_workloads())
    for size in ("s", "b", "l", "xl"):
        for patch in (2, 4, 8):
            for variant in ("cond", "uncond"):
                assert f"dit-{size}-{patch}-{variant}" in names
                assert f"dit-{size}-{patch}-{variant}-512" in names
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", *TINY} <= names


# ------------------------------------------------------------------------------------------------ shapes and variants


def test_tiny_forward_shapes():
    cond, uncond, gpt = (get_workload(n) for n in TINY)
    g = torch.Generator().manual_seed(1)
    batch = cond.make_batch(5, g)
    x_t, t, y = batch.inputs
    assert x_t.shape == (5, 4, 8, 8) and t.shape == (5,) and y.shape == (5,) and batch.target.shape == (5, 4, 8, 8)
    assert cond.build_model()(*batch.inputs).shape == (5, 8, 8, 8)  # learn_sigma: 8 output channels

    batch = uncond.make_batch(5, g)
    assert len(batch.inputs) == 2
    assert uncond.build_model()(*batch.inputs).shape == (5, 8, 8, 8)

    batch = gpt.make_batch(5, g)
    (idx,) = batch.inputs
    assert idx.shape == (5, 16) and batch.target.shape == (5, 16)
    assert gpt.build_model()(idx).shape == (5, 16, 128)
    assert cond.input_names == ("x_t", "t", "y") and uncond.input_names == ("x_t", "t") and gpt.input_names == ("idx",)
    assert (cond.family, uncond.family, gpt.family) == ("dit", "dit", "gpt")
    assert cond.tokens_per_sample == 16 and gpt.tokens_per_sample == 16


def test_unconditional_dit_has_no_labels():
    workload = get_workload("dit-tiny-uncond")
    model = workload.build_model()
    assert isinstance(model, UnconditionalDiT)
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    assert not any("y_embedder" in n for n, _ in model.named_parameters())
    cond = get_workload("dit-tiny-cond").build_model()
    assert n_params(cond) - n_params(model) == 11 * 64  # the (10 + null) × 64 label table, nothing else
    batch = workload.make_batch(3)
    with pytest.raises(TypeError):
        model(*batch.inputs, torch.zeros(3, dtype=torch.long))
    with pytest.raises(WorkloadError, match="num_classes"):
        get_workload("dit-tiny-uncond", num_classes=5)


def test_null_class_label_drop_rate_and_embedding():
    workload = get_workload("dit-tiny-cond")
    num_classes = workload.info["num_classes"]
    assert workload.info["null_class"] == num_classes == 10
    _, _, y = workload.make_batch(20_000, torch.Generator().manual_seed(3)).inputs
    assert int(y.min()) >= 0 and int(y.max()) == num_classes
    drop_rate = (y == num_classes).float().mean().item()
    assert abs(drop_rate - 0.1) < 0.01  # binomial std ≈ 0.002
    # every ordinary class still appears
    assert set(y[y != num_classes].unique().tolist()) == set(range(num_classes))

    model = workload.build_model()
    table = model.y_embedder.embedding_table
    assert table.num_embeddings == num_classes + 1
    null = torch.full((4,), num_classes)
    assert torch.equal(model.y_embedder(null), table.weight[num_classes].expand(4, -1))
    # a batch of only null labels trains only the null row
    batch = workload.make_batch(4)
    batch = Batch((batch.inputs[0], batch.inputs[1], null), batch.target)
    _, grads = loss_and_grads(workload, model, batch)
    row_has_grad = grads["y_embedder.embedding_table.weight"].abs().sum(dim=1) > 0
    assert row_has_grad.tolist() == [False] * num_classes + [True]


def test_no_label_drop_means_no_null_row():
    workload = get_workload("dit-tiny-cond", class_dropout_prob=0.0)
    assert workload.build_model().y_embedder.embedding_table.num_embeddings == 10
    _, _, y = workload.make_batch(2000).inputs
    assert int(y.max()) < 10


# ------------------------------------------------------------------------------------------------ diffusion batch


def test_noise_schedule():
    betas = linear_beta_schedule()
    assert betas.shape == (1000,) and betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    abar = alphas_cumprod()
    assert torch.all(abar[1:] < abar[:-1]) and 0 < abar[-1] < abar[0] < 1


def test_dit_batch_is_ddpm_noising_drawn_from_the_generator():
    workload = get_workload("dit-tiny-cond")
    batch = workload.make_batch(64, torch.Generator().manual_seed(7))
    x_t, t, _ = batch.inputs
    # Redraw in the documented order: x0, t, eps.
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(64, 4, 8, 8, generator=g)
    t_again = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(64, 4, 8, 8, generator=g)
    assert torch.equal(t, t_again) and torch.equal(batch.target, eps)
    abar = alphas_cumprod()[t].float()[:, None, None, None]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999


# ------------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", TINY)
def test_determinism(name):
    workload = get_workload(name)
    m1, m2 = workload.build_model(), workload.build_model()
    state1, state2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)

    b1 = workload.make_batch(6, torch.Generator().manual_seed(11))
    b2 = workload.make_batch(6, torch.Generator().manual_seed(11))
    b3 = workload.make_batch(6, torch.Generator().manual_seed(12))
    assert all(torch.equal(a, b) for a, b in zip((*b1.inputs, b1.target), (*b2.inputs, b2.target)))
    assert not torch.equal(b1.target, b3.target)

    loss1, grads1 = loss_and_grads(workload, m1, b1)
    loss2, grads2 = loss_and_grads(workload, m2, b2)
    assert torch.equal(loss1, loss2)
    assert all(torch.equal(grads1[k], grads2[k]) for k in grads1)
    # the model itself draws nothing: a second forward in training mode gives the same output
    assert m1.training and torch.equal(m1(*b1.inputs), m1(*b1.inputs))


@pytest.mark.parametrize("name", TINY)
def test_loss_is_per_sample(name):
    workload = get_workload(name)
    model = workload.build_model()
    batch = workload.make_batch(4)
    with torch.no_grad():
        loss = workload.loss_per_sample(model(*batch.inputs), batch.target)
        assert loss.shape == (4,) and torch.all(loss > 0)
        # sample i's loss does not depend on the rest of the batch
        for i in range(4):
            one = batch.select(i)
            alone = workload.loss_per_sample(model(*one.inputs), one.target)
            torch.testing.assert_close(alone, loss[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_tiny_workloads_train_every_parameter(name):
    """Tiny configs skip adaLN-Zero init so no trainable parameter has an all-zero gradient on step one."""
    workload = get_workload(name)
    _, grads = loss_and_grads(workload, workload.build_model(), workload.make_batch(16))
    dead = [n for n, g in grads.items() if g is None or not torch.any(g != 0)]
    assert dead == []


def test_adaln_zero_init_zeroes_first_step_gradients():
    # The paper's init (zero_init=True): gates and the final linear start at zero, so the blocks' attention
    # and MLP weights get exactly zero gradient on the first step — why tiny workloads use zero_init=False.
    workload = get_workload("dit-tiny-cond", zero_init=True)
    model = workload.build_model()
    assert not torch.any(model.final_layer.linear.weight != 0)
    assert not torch.any(model.blocks[0].adaLN_modulation[-1].weight != 0)
    _, grads = loss_and_grads(workload, model, workload.make_batch(8))
    assert not torch.any(grads["blocks.0.attn.qkv.weight"] != 0)
    assert torch.any(grads["final_layer.linear.weight"] != 0)
    assert get_workload("dit-xl-2-cond").info["zero_init"] is True


@pytest.mark.parametrize("name", TINY)
def test_tiny_step_is_fast(name):
    workload = get_workload(name)
    model = workload.build_model()
    batch = workload.make_batch(16)
    optimizer = torch.optim.AdamW(model.parameters())
    durations = []
    # CPU time of this process on one thread: other jobs sharing the machine do not count against the step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            start = time.process_time()
            workload.loss_per_sample(model(*batch.inputs), batch.target).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            durations.append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(durations) < 0.1


# ------------------------------------------------------------------------------------------------ GPT specifics


def test_gpt_batch_is_shifted_tokens():
    workload = get_workload("gpt-tiny", seq_len=12)
    batch = workload.make_batch(3)
    (idx,) = batch.inputs
    assert workload.tokens_per_sample == 12 and idx.shape == (3, 12)
    assert torch.equal(idx[:, 1:], batch.target[:, :-1])
    assert int(idx.max()) < 128
    with pytest.raises(WorkloadError, match="seq_len"):
        get_workload("gpt-tiny", seq_len=17)  # longer than block_size 16


def test_gpt_attention_is_causal():
    workload = get_workload("gpt-tiny")
    model = workload.build_model()
    (idx,) = workload.make_batch(2).inputs
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 128
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.equal(a[:, 10:], b[:, 10:])


def test_untied_gpt_adds_one_vocab_by_width_matrix():
    tied = get_workload("gpt2").build_model(device="meta")
    untied_workload = get_workload("gpt2", tie_weights=False)
    untied = untied_workload.build_model(device="meta")
    assert n_params(untied) - n_params(tied) == 50257 * 768
    assert len(list(untied.parameters())) == len(list(tied.parameters())) + 1
    assert tied.lm_head.weight is tied.wte.weight and untied.lm_head.weight is not untied.wte.weight
    assert untied_workload.info["tied"] is False and get_workload("gpt2").info["tied"] is True


# ------------------------------------------------------------------------------------------------ DP-library shaping


def _owners_of_trainable_parameters(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() for p in m.parameters(recurse=False) if p.requires_grad}


@pytest.mark.parametrize("name", TINY)
def test_trainable_parameters_live_in_leaf_modules(name):
    owners = _owners_of_trainable_parameters(get_workload(name).build_model())
    assert owners <= {nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm}


def test_learnable_pos_embed_adds_one_trainable_parameter_on_the_top_module():
    plain = get_workload("dit-tiny-cond").build_model()
    learnable = get_workload("dit-tiny-cond", learnable_pos_embed=True).build_model()
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]
    assert sorted(set(trainable(learnable)) - set(trainable(plain))) == ["pos_embed"]
    assert len(trainable(learnable)) == len(trainable(plain)) + 1
    top_level = [n for n, p in learnable.named_parameters(recurse=False) if p.requires_grad]
    assert top_level == ["pos_embed"] and DiT in _owners_of_trainable_parameters(learnable)
    assert n_params(learnable) == n_params(plain)  # same tensors, one more of them trainable


def test_label_embedder_looks_up_a_2d_index():
    # Opacus' ExpandedWeights mode rejects nn.Embedding on a 1-D tensor: the lookup must see (B, 1).
    model = get_workload("dit-tiny-cond").build_model()
    seen = []
    model.y_embedder.embedding_table.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    batch = get_workload("dit-tiny-cond").make_batch(3)
    model(*batch.inputs)
    assert seen == [torch.Size([3, 1])]


def test_tiny_dits_run_under_opacus_expanded_weights():
    from opacus.grad_sample import wrap_model

    for name in ("dit-tiny-cond", "dit-tiny-uncond"):
        workload = get_workload(name)
        batch = workload.make_batch(3)
        model = wrap_model(workload.build_model(), grad_sample_mode="ew", batch_first=True, loss_reduction="mean")
        workload.loss_per_sample(model(*batch.inputs), batch.target).mean().backward()
        reference = workload.build_model()
        one = batch.select(1)
        workload.loss_per_sample(reference(*one.inputs), one.target).sum().backward()
        torch.testing.assert_close(model._module.x_embedder.weight.grad_sample[1], reference.x_embedder.weight.grad)


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_workload_lists_close_names():
    with pytest.raises(WorkloadError, match="dit-xl-2-cond") as info:
        get_workload("dit-xl-2-cnd")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("size", [0, -1])
def test_bad_batch_size(size):
    with pytest.raises(WorkloadError, match="batch size"):
        get_workload("dit-tiny-cond").make_batch(size)


def test_unknown_override_is_named():
    with pytest.raises(WorkloadError, match="nonsense"):
        get_workload("gpt2", nonsense=1)
    with pytest.raises(WorkloadError, match="hidden_size"):
        get_workload("dit-tiny-cond", hidden_size=30)  # not a multiple of num_heads 4
    assert get_workload("dit-tiny-cond", seed=5).seed == 5


def test_paper_workloads_are_cheap_to_construct():
    start = time.perf_counter()
    for name in list_workloads():
        get_workload(name)
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------------------------------------ bring your own


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the workload registry, so BYO modules register nothing outside the test."""
    list_workloads()  # load the built-ins first
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))


def _write_module(tmp_path: Path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_byo_module_import_error_is_one_line(tmp_path, monkeypatch, isolated_registry):
    name = _write_module(tmp_path, monkeypatch, "byo_broken_import", "import a_package_that_is_not_there_xyz\n")
    with pytest.raises(WorkloadError, match="byo_broken_import") as info:
        load_workload_module(name)
    assert "\n" not in str(info.value) and "a_package_that_is_not_there_xyz" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        "models.register_workload(42)\n",  # not a Workload at all
        "models.register_workload(lambda **kw: 'not a workload', name='byo-bad')\n",  # factory returns junk
    ],
)
def test_byo_module_registering_a_non_workload(tmp_path, monkeypatch, isolated_registry, body):
    name = _write_module(tmp_path, monkeypatch, "byo_non_workload", "import models\n" + body)
    with pytest.raises(WorkloadError, match="byo_non_workload") as info:
        load_workload_module(name)
    assert "\n" not in str(info.value)


class _FakeLabelEmbedding(nn.Module):
    """Like diffusers' LabelEmbedding: drops labels to the null row at random in training mode (0.1 there;
    0.5 here, so a recipe that leaves it on is caught)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float = 0.5):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0]) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class _FakeDiTTransformer2DModel(nn.Module):
    """A small stand-in with diffusers' DiT interface: keyword config, forward(...) -> object with .sample."""

    def __init__(
        self,
        num_attention_heads,
        attention_head_dim,
        in_channels=4,
        out_channels=None,
        num_layers=28,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        **unused,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.patch, self.out_channels = patch_size, out_channels or in_channels
        self.patchify = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.time = nn.Linear(1, dim)
        self.label = _FakeLabelEmbedding(num_embeds_ada_norm, dim)
        self.out = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        B, _, H, W = hidden_states.shape
        c = self.time(timestep.float()[:, None] / 1000) + self.label(class_labels)  # (B, D)
        tokens = self.patchify(hidden_states).flatten(2).transpose(1, 2) + c[:, None]  # (B, T, D)
        g, p = H // self.patch, self.patch
        out = self.out(tokens).reshape(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return types.SimpleNamespace(sample=out.reshape(B, self.out_channels, H, W))


def test_diffusers_recipe(monkeypatch, isolated_registry):
    try:
        import diffusers  # noqa: F401  (the real one, when installed)
    except ImportError:
        fake = types.SimpleNamespace(DiTTransformer2DModel=_FakeDiTTransformer2DModel)
        monkeypatch.setitem(sys.modules, "diffusers", fake)
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delitem(sys.modules, "examples.diffusers_dit_workload", raising=False)
    added = load_workload_module("examples.diffusers_dit_workload")
    assert set(added) == {"diffusers-dit-tiny", "diffusers-dit-xl-2"}

    workload = get_workload("diffusers-dit-tiny")
    assert workload.tokens_per_sample == 16 and workload.input_names == ("x_t", "t", "y")
    model = workload.build_model()
    batch = workload.make_batch(32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the fake's label dropout would draw from here if the recipe left it on
    out = model(*batch.inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (32, 8, 8, 8)
    assert torch.equal(out, model(*batch.inputs))  # in-model label dropout is off: all randomness is in the batch
    loss = workload.loss_per_sample(out, batch.target)
    assert loss.shape == (32,)
    loss.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the paper-size entry is only constructed, never built, unless asked
    assert get_workload("diffusers-dit-xl-2").tokens_per_sample == 256


def test_diffusers_recipe_without_diffusers_is_a_one_line_error(monkeypatch, isolated_registry):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delitem(sys.modules, "examples.diffusers_dit_workload", raising=False)
    with pytest.raises(WorkloadError, match=r"examples\.diffusers_dit_workload.*diffusers") as info:
        load_workload_module("examples.diffusers_dit_workload")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_lists_workloads_with_counts():
    result = subprocess.run(
        [sys.executable, "-m", "models"], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    line = next(text for text in result.stdout.splitlines() if text.startswith("dit-xl-2-cond "))
    assert "675,129,632" in line and "674,834,720" in line and "x_t, t, y" in line
    assert len(result.stdout.splitlines()) == 2 + len(list_workloads())


def test_cli_filter(capsys):
    from models.__main__ import main

    assert main(["--filter", "gpt2-x"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["gpt2-xl", "gpt2-xl-untied"]
    assert "1,557,611,200" in rows[0]
    # untied: one more vocab × width matrix (50257 × 1600) than tied
    assert f"{1_557_611_200 + 50257 * 1600:,}" in rows[1]
    assert main(["--workload-module", "no_such_module_xyz"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_build_dit_picks_the_variant():
    config = DIT_CONFIGS["DiT-S/8"](class_conditional=False)
    with torch.device("meta"):
        assert isinstance(build_dit(config), UnconditionalDiT)
        assert isinstance(build_dit(DIT_CONFIGS["DiT-S/8"]()), DiT)


def test_pos_embed_in_submodule_is_the_777_fix_shape():
    """The fix variant owns no parameter on the top-level module: the table is an nn.Embedding(T, D)."""
    fixed = get_workload("dit-tiny-cond", learnable_pos_embed=True, pos_embed_in_submodule=True).build_model()
    direct = [n for n, p in fixed.named_parameters(recurse=False)]
    assert direct == []
    assert isinstance(fixed.pos_embedder, torch.nn.Embedding) and fixed.pos_embedder.weight.requires_grad
    assert fixed.pos_embedder.weight.shape == (16, 64)
    plain = get_workload("dit-tiny-cond").build_model()
    batch = get_workload("dit-tiny-cond").make_batch(3)
    with torch.no_grad():  # starts from the same sin-cos table, so the same function
        assert torch.equal(fixed(*batch.inputs), plain(*batch.inputs))
