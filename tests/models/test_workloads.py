"""Built-in workloads: paper parameter counts, shapes, batch randomness, determinism, DP-library shaping."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from models import Batch, Workload, WorkloadError, get_workload, list_workloads
from models.catalog import TINY_WORKLOADS
from models.diffusion import alphas_cumprod, linear_beta_schedule
from models.dit import DiT, PlainDiT, UnconditionalDiT, build_dit, dit_config

TINY = TINY_WORKLOADS


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


def test_dit_paper_configs():
    config = dit_config("XL", 2)
    assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (28, 1152, 16, 2)
    assert config.num_tokens == 256 and config.out_channels == 8
    assert dit_config("S", 8, image_size=512).num_tokens == 64


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
            for variant in ("cond", "uncond", "plain"):
                assert f"dit-{size}-{patch}-{variant}" in names
                assert f"dit-{size}-{patch}-{variant}-512" in names
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", *TINY} <= names
    assert len(names) == 4 * 3 * 3 * 2 + len(TINY) + 4 * 2  # paper DiTs, the tiny ones, GPT-2s tied and untied


# ------------------------------------------------------------------------------------------------ shapes and variants


def test_tiny_forward_shapes():
    cond, uncond, gpt = (get_workload(n) for n in ("dit-tiny-cond", "dit-tiny-uncond", "gpt-tiny"))
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


@pytest.mark.parametrize("size", [0, -1])
def test_bad_batch_size(size):
    with pytest.raises(WorkloadError, match="batch size"):
        get_workload("dit-tiny-cond").make_batch(size)


def test_paper_workloads_are_cheap_to_construct():
    start = time.perf_counter()
    for name in list_workloads():
        get_workload(name)
    assert time.perf_counter() - start < 1.0


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


def test_build_dit_picks_the_variant():
    with torch.device("meta"):
        assert isinstance(build_dit(dit_config("S", 8, class_conditional=False)), UnconditionalDiT)
        assert isinstance(build_dit(dit_config("S", 8)), DiT)
        assert isinstance(build_dit(dit_config("S", 8, class_conditional=False, plain=True)), PlainDiT)
    with pytest.raises(ValueError, match="plain"):
        dit_config("S", 8, plain=True)  # a plain DiT takes no labels


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
