"""The built-in workloads: paper-size DiTs and GPT-2s, plus tiny ones for tests.

Names:

* ``dit-{s,b,l,xl}-{2,4,8}-{cond,uncond,plain}`` — DiT at 256 px (latent 4×32×32); the same with ``-512``
  appended is the 512 px model (latent 4×64×64). ``-plain`` is the proxy with no timestep or adaLN
  conditioning (models/dit.py :class:`PlainDiT`), family ``"dit-plain"`` so reports tell it from the DiTs;
* ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` — sequence length 1024, tied embeddings;
* the tiny ones (:data:`TINY_WORKLOADS`) — a full step takes milliseconds on a CPU;
* every GPT name also with ``-untied`` appended (a separate lm_head weight), e.g. ``gpt2-untied``.

Every factory takes overrides of its config's scalar fields (``get_workload("gpt2", tie_weights=False)``,
``get_workload("dit-tiny-cond:learnable_pos_embed=True")``), GPT ones also ``seq_len``, all of them ``seed``;
keys and value types are checked against the config dataclass, and a config's own check (``hidden_size`` a
multiple of ``num_heads``, ...) comes out as a one-line WorkloadError naming the workload, and so does a size
above its limit (:data:`DIT_LIMITS`, :data:`GPT_LIMITS`: far above every paper-scale model) or a config of more
than :data:`MAX_PARAMETERS` parameters. Building a Workload only builds a config: the model is made on demand by
``build_model``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from .diffusion import epsilon_mse_per_sample, make_dit_batch
from .dit import DIT_SIZES, IMAGE_TO_LATENT, PATCH_SIZES, DiTBlock, DiTConfig, PlainBlock, build_dit, dit_config
from .gpt import GPT, GPT_PRESETS, Block, GPTConfig, gpt_config, make_token_batch, next_token_ce_per_sample
from .workload import Workload, WorkloadError, check_overrides, override_types

__all__ = [
    "DIT_LIMITS",
    "GPT_LIMITS",
    "MAX_PARAMETERS",
    "TINY_DIT",
    "TINY_GPT",
    "TINY_WORKLOADS",
    "builtin_workloads",
    "dit_workload",
    "gpt_workload",
]

# Tiny DiT: 2 blocks, width 64, 4 heads, latent 4×8×8 with patch 2 (16 tokens), 10 classes. No adaLN-Zero
# init so that every trainable parameter gets a non-zero gradient on the first step.
TINY_DIT = DiTConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, zero_init=False)
# Tiny GPT: 2 layers, width 64, 4 heads, vocab 128, 16 tokens.
TINY_GPT = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=4, n_embd=64)
# Every tiny workload (the CPU preset's and the tests'); unknown-name messages list them.
TINY_WORKLOADS = ("dit-tiny-cond", "dit-tiny-uncond", "dit-tiny-plain", "gpt-tiny", "gpt-tiny-untied")

_WORKLOAD_OVERRIDES: dict[str, tuple[type, ...]] = {"seed": (int,)}

# The largest value of each size override: 20× and more the paper's largest configs (DiT-XL: depth 28, width
# 1152, 16 heads, latent 64 at 512 px; GPT-2 XL: 48 layers, width 1600, 25 heads, 1024 tokens; GPT-3 175B has 96
# layers of width 12288), so that a typo (n_layer=1000000000) is refused at once instead of building a billion
# blocks. The lower bounds are the configs' own checks.
DIT_LIMITS: dict[str, int | float] = {
    "input_size": 1024,  # latent side: 8192 px images
    "patch_size": 1024,
    "in_channels": 1024,
    "hidden_size": 65536,
    "depth": 1024,
    "num_heads": 1024,
    "mlp_ratio": 64.0,
    "num_classes": 10**7,
}
GPT_LIMITS: dict[str, int | float] = {
    "vocab_size": 2**24,
    "block_size": 2**20,
    "seq_len": 2**20,
    "n_layer": 1024,
    "n_head": 1024,
    "n_embd": 65536,
}
# Sizes within their limits can still multiply into a model no machine holds: about 10 trillion parameters is
# the most a workload may have (the largest models trained are about 2 trillion), estimated from the config
# (``approx_parameters``) without building anything.
MAX_PARAMETERS = 10**13


def _split_overrides(
    name: str, overrides: dict[str, Any], accepted: dict[str, tuple[type, ...]], limits: dict[str, int | float]
) -> tuple[dict, dict]:
    """(config overrides, workload overrides), after :func:`models.check_overrides` against ``accepted`` (the
    config's keys and types) plus ``seed``, and each size against its limit in ``limits``."""
    check_overrides(name, overrides, {**accepted, **_WORKLOAD_OVERRIDES})
    for key, value in overrides.items():
        if key in limits and value > limits[key]:
            raise WorkloadError(f"workload {name!r}: {key}={value!r} is above the limit for {key}, {limits[key]:,}")
    workload_kw = {k: v for k, v in overrides.items() if k in _WORKLOAD_OVERRIDES}
    config_kw = {k: v for k, v in overrides.items() if k not in _WORKLOAD_OVERRIDES}
    return config_kw, workload_kw


def _replace_config(name: str, config: Any, overrides: dict[str, Any]) -> Any:
    """``config`` with ``overrides``; WorkloadError for a value the config refuses or a model of more than
    :data:`MAX_PARAMETERS` parameters."""
    try:
        config = dataclasses.replace(config, **overrides)
    except ValueError as exc:  # the config's __post_init__ checks (types were checked before)
        raise WorkloadError(f"workload {name!r}: {exc}") from exc
    if config.approx_parameters > MAX_PARAMETERS:
        sizes = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        raise WorkloadError(
            f"workload {name!r}: {sizes} make about {config.approx_parameters:.1e} parameters, above the limit "
            f"{MAX_PARAMETERS:.0e}"
        )
    return config


# ---------------------------------------------------------------------------------------------------------------
# DiT


def dit_workload(name: str, config: DiTConfig, *, config_name: str, image_size: int | None, seed: int = 0) -> Workload:
    """A DiT Workload for ``config``: synthetic latents, DDPM noising, ε-MSE on the first 4 channels.

    A plain config gets the same batches without the timestep input, and family ``"dit-plain"``."""
    conditional = config.class_conditional
    batch_fn = partial(
        make_dit_batch,
        in_channels=config.in_channels,
        input_size=config.input_size,
        num_classes=config.num_classes if conditional else None,
        class_dropout_prob=config.class_dropout_prob if conditional else 0.0,
        timestep_input=not config.plain,
    )
    latent = f"{config.in_channels}x{config.input_size}x{config.input_size}"
    if config.plain:
        input_names, conditioning = ("x_t",), "none (plain pre-LN blocks)"
    elif conditional:
        input_names, conditioning = ("x_t", "t", "y"), "adaLN on t and y"
    else:
        input_names, conditioning = ("x_t", "t"), "adaLN on t"
    info: dict[str, Any] = {
        "config": config_name,
        "image_size": image_size,
        "latent": latent,
        "patch_size": config.patch_size,
        "depth": config.depth,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "conditional": conditional,
        "conditioning": conditioning,
        "learn_sigma": config.learn_sigma,
        "zero_init": config.zero_init,
        "learnable_pos_embed": config.learnable_pos_embed,
        "loss": "epsilon-MSE over the first 4 output channels (no VLB term)",
    }
    if conditional:
        info.update(
            num_classes=config.num_classes, class_dropout_prob=config.class_dropout_prob, null_class=config.null_class
        )
    return Workload(
        name=name,
        model_fn=partial(build_dit, config),
        batch_fn=batch_fn,
        loss_fn=epsilon_mse_per_sample,
        family="dit-plain" if config.plain else "dit",
        tokens_per_sample=config.num_tokens,
        input_names=input_names,
        seed=seed,
        info=info,
        checkpoint_module_types=(PlainBlock,) if config.plain else (DiTBlock,),
        attention_module_names=("blocks.*.attn.qkv", "blocks.*.attn.proj"),
    )


# The variant is the name's (cond, uncond, plain): its switches are not overrides.
_DIT_OVERRIDES = {k: v for k, v in override_types(DiTConfig).items() if k not in ("class_conditional", "plain")}
_DIT_LABEL_FIELDS = ("num_classes", "class_dropout_prob")


def _dit_factory(name: str, base: DiTConfig, config_name: str, image_size: int | None) -> Callable[..., Workload]:
    accepted = {k: v for k, v in _DIT_OVERRIDES.items() if base.class_conditional or k not in _DIT_LABEL_FIELDS}

    def factory(**overrides: Any) -> Workload:
        config_kw, workload_kw = _split_overrides(name, overrides, accepted, DIT_LIMITS)
        config = _replace_config(name, base, config_kw)
        return dit_workload(name, config, config_name=config_name, image_size=image_size, **workload_kw)

    return factory


_DIT_VARIANTS = {
    "cond": dict(class_conditional=True),
    "uncond": dict(class_conditional=False),
    "plain": dict(class_conditional=False, plain=True),
}


def _dit_factories() -> Iterator[tuple[str, Callable[..., Workload]]]:
    for size in DIT_SIZES:
        for patch in PATCH_SIZES:
            for image_size in IMAGE_TO_LATENT:
                suffix = "" if image_size == 256 else f"-{image_size}"
                for variant, switches in _DIT_VARIANTS.items():
                    name = f"dit-{size.lower()}-{patch}-{variant}{suffix}"
                    base = dit_config(size, patch, image_size, **switches)
                    yield name, _dit_factory(name, base, f"DiT-{size}/{patch}", image_size)
    for variant, switches in _DIT_VARIANTS.items():
        name = f"dit-tiny-{variant}"
        base = dataclasses.replace(TINY_DIT, **switches)
        yield name, _dit_factory(name, base, "DiT-tiny", None)


# ---------------------------------------------------------------------------------------------------------------
# GPT


def gpt_workload(
    name: str, config: GPTConfig, *, config_name: str, seq_len: int | None = None, seed: int = 0
) -> Workload:
    """A GPT Workload: uniform random tokens, next-token cross-entropy averaged over the sequence."""
    seq_len = config.block_size if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= config.block_size:
        raise WorkloadError(
            f"workload {name!r}: seq_len must be an integer in [1, {config.block_size}], got {seq_len!r}"
        )
    return Workload(
        name=name,
        model_fn=partial(GPT, config),
        batch_fn=partial(make_token_batch, vocab_size=config.vocab_size, seq_len=seq_len),
        loss_fn=next_token_ce_per_sample,
        family="gpt",
        tokens_per_sample=seq_len,
        input_names=("idx",),
        seed=seed,
        checkpoint_module_types=(Block,),
        attention_module_names=("h.*.attn.c_attn", "h.*.attn.c_proj"),
        info={
            "config": config_name,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "vocab_size": config.vocab_size,
            "block_size": config.block_size,
            "seq_len": seq_len,
            "tied": config.tie_weights,
            "loss": "next-token cross-entropy, mean over tokens",
        },
    )


_GPT_OVERRIDES = {**override_types(GPTConfig), "seq_len": (int,)}


def _gpt_factory(name: str, base: GPTConfig, config_name: str) -> Callable[..., Workload]:
    def factory(**overrides: Any) -> Workload:
        config_kw, workload_kw = _split_overrides(name, overrides, _GPT_OVERRIDES, GPT_LIMITS)
        seq_len = config_kw.pop("seq_len", None)
        config = _replace_config(name, base, config_kw)
        return gpt_workload(name, config, config_name=config_name, seq_len=seq_len, **workload_kw)

    return factory


def _gpt_factories() -> Iterator[tuple[str, Callable[..., Workload]]]:
    # Each GPT also as `<name>-untied` (a separate lm_head weight): DP libraries treat tied weights
    # differently (Opacus ghost clipping refuses them), and the bench's matrix takes names, not overrides.
    bases = {preset: gpt_config(preset) for preset in GPT_PRESETS} | {"gpt-tiny": TINY_GPT}
    for name, config in bases.items():
        yield name, _gpt_factory(name, config, name)
        untied = dataclasses.replace(config, tie_weights=False)
        yield f"{name}-untied", _gpt_factory(f"{name}-untied", untied, name)


def builtin_workloads() -> dict[str, Callable[..., Workload]]:
    """Every built-in workload's name -> its factory ``f(**overrides) -> Workload``, DiTs first; the registry
    (``models``) registers them when it is imported."""
    return dict((*_dit_factories(), *_gpt_factories()))
