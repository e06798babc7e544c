"""Bring-your-own workloads: loading a module, its one-line errors, specs on BYO workloads, the diffusers recipe."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import Batch, Workload, WorkloadError, get_workload, list_workloads, load_workload_module, register_workload

REPO = Path(__file__).resolve().parents[2]


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


def test_byo_module_calling_sys_exit_is_a_one_line_error_not_an_exit(tmp_path, monkeypatch, isolated_registry):
    name = _write_module(tmp_path, monkeypatch, "byo_exits", "import sys\nsys.exit('no GPU, giving up')\n")
    with pytest.raises(WorkloadError, match=r"byo_exits.*SystemExit: no GPU, giving up"):
        load_workload_module(name)


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
    # a spec works on a registered Workload too
    assert get_workload("diffusers-dit-tiny:seed=1").seed == 1


def test_diffusers_recipe_without_diffusers_is_a_one_line_error(monkeypatch, isolated_registry):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.delitem(sys.modules, "examples.diffusers_dit_workload", raising=False)
    with pytest.raises(WorkloadError, match=r"examples\.diffusers_dit_workload.*diffusers") as info:
        load_workload_module("examples.diffusers_dit_workload")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- specs on BYO


def _linear_workload(name: str) -> Workload:
    return Workload(
        name=name,
        model_fn=lambda: nn.Linear(3, 2),
        batch_fn=lambda b, g: Batch((torch.randn(b, 3, generator=g),), torch.randn(b, 2, generator=g)),
        loss_fn=lambda out, target: (out - target).pow(2).mean(dim=1),
    )


def test_plain_byo_workload_takes_scalar_field_overrides_from_a_spec(isolated_registry):
    register_workload(_linear_workload("byo-linear"))
    workload = get_workload("byo-linear:seed=3:family=toy")
    assert (workload.seed, workload.family) == (3, "toy")
    assert workload.name == "byo-linear:seed=3:family=toy" and workload.base_name == "byo-linear"
    assert workload.overrides == {"seed": 3, "family": "toy"}
    assert get_workload("byo-linear", tokens_per_sample=7).name == "byo-linear:tokens_per_sample=7"
    with pytest.raises(WorkloadError, match=r"seed must be int, got 'x'"):
        get_workload("byo-linear:seed=x")
    # callables, tuples and dicts cannot be written in a spec, and the name is the spec's
    with pytest.raises(WorkloadError, match=r"no override 'model_fn'; valid keys: family, tokens_per_sample, seed$"):
        get_workload("byo-linear", model_fn=lambda: nn.Linear(1, 1))
    with pytest.raises(WorkloadError, match="no override 'name'"):
        get_workload("byo-linear:name=other")


def test_registering_under_a_name_that_is_not_a_spec_name_fails(isolated_registry):
    for bad in ("byo:x", "byo,x", "byo=x", ""):
        with pytest.raises(WorkloadError, match="without ','"):
            register_workload(_linear_workload(bad))


def test_byo_factory_gets_spec_overrides_and_its_own_errors_are_one_line(isolated_registry):
    def factory(width: int = 3) -> Workload:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        return _linear_workload("ignored")  # get_workload names it by the spec

    register_workload(factory, name="byo-factory")
    assert get_workload("byo-factory:width=5").name == "byo-factory:width=5"
    with pytest.raises(WorkloadError, match=r"^workload 'byo-factory': TypeError: .*'depth'") as info:
        get_workload("byo-factory:depth=2")
    assert "\n" not in str(info.value)
    with pytest.raises(WorkloadError, match=r"^workload 'byo-factory': ValueError: width must be >= 1"):
        get_workload("byo-factory:width=0")
