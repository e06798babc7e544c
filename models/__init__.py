"""Workloads: a model factory, a batch factory and a per-sample loss, registered by name.

A :class:`Workload` is everything a DP method needs to run one training step:

* ``build_model()`` returns a fresh model, seeded, so two calls give identical weights;
* ``make_batch(batch_size, generator)`` draws *all* the randomness of a step (diffusion timesteps, noise,
  label drop, tokens), so a step is a deterministic function of (weights, batch);
* ``loss_per_sample(output, target)`` returns a loss of shape ``[B]`` (DP clipping is per sample).

Every input in ``Batch.inputs`` is batched on dim 0 and passed positionally: ``model(*batch.inputs)``.

A *workload spec* names a registered workload with overrides: ``"gpt2-large:seq_len=128"``,
``"dit-xl-2-cond:num_classes=10:learnable_pos_embed=True"``. :func:`get_workload` takes a spec wherever it
takes a name, and the Workload it returns is named by its canonical spec (``name``), with the registered name
(``base_name``) and the overrides (``overrides``) alongside, so results can record all three.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .catalog import TINY_WORKLOADS, builtin_workloads
from .workload import MAX_SEED, Batch, Workload, WorkloadError, check_overrides, override_types

__all__ = [
    "MAX_SEED",
    "Batch",
    "Workload",
    "WorkloadError",
    "check_overrides",
    "format_workload_spec",
    "get_workload",
    "list_workloads",
    "load_workload_module",
    "override_types",
    "parameter_counts",
    "parse_workload_spec",
    "register_workload",
]


# name -> factory(**overrides) -> Workload. Built-ins register factories so overrides such as
# get_workload("gpt2", tie_weights=False) reach the model config.
WorkloadFactory = Callable[..., Workload]
_REGISTRY: dict[str, WorkloadFactory] = {}
_MODULE_WORKLOADS: dict[str, list[str]] = {}  # bring-your-own module -> names it registered


def register_workload(workload: Workload | WorkloadFactory, name: str | None = None, *, replace: bool = False) -> str:
    """Register a workload (or a factory ``f(**overrides) -> Workload``) under its name; returns the name.

    A plain :class:`Workload` accepts overrides of its scalar fields (``seed``, ``family``,
    ``tokens_per_sample``) in :func:`get_workload`, type-checked. A factory gets the overrides as keyword
    arguments and should check them (:func:`check_overrides` does it against a dataclass's field types).
    """
    if isinstance(workload, Workload):
        instance = workload
        key = name or instance.name

        def factory(**overrides: Any) -> Workload:
            check_overrides(key, overrides, _WORKLOAD_OVERRIDE_TYPES)
            return dataclasses.replace(instance, **overrides)

    elif callable(workload):
        if not name:
            raise WorkloadError("register_workload(factory) needs name=")
        key, factory = name, workload
    else:
        raise WorkloadError(f"register_workload expects a Workload or a factory, got {type(workload).__name__}")
    if not isinstance(key, str) or not key or any(c in key for c in _SPEC_SEPARATORS):
        raise WorkloadError(f"a workload needs a non-empty string name without ',', ':' or '=', got {key!r}")
    if key in _REGISTRY and not replace:
        raise WorkloadError(f"workload {key!r} is already registered (pass replace=True to override)")
    _REGISTRY[key] = factory
    return key


def list_workloads() -> list[str]:
    """Every registered workload name, sorted."""
    return sorted(_REGISTRY)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) element counts; a shared (tied) parameter counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def get_workload(spec: str, **overrides: Any) -> Workload:
    """The workload a spec names: ``get_workload("gpt2-large:seq_len=128")``, or a registered name with keyword
    overrides, ``get_workload("gpt2-large", seq_len=128)`` — the same workload, named ``"gpt2-large:seq_len=128"``.

    Keyword overrides follow the spec's; a key may not come from both. Every override must be writable in a spec
    (:func:`format_workload_spec`), so ``name`` always says how to get the workload again."""
    base, spec_overrides = parse_workload_spec(spec)
    twice = [key for key in overrides if key in spec_overrides]
    if twice:
        raise WorkloadError(f"workload {spec!r}: override(s) {twice} given both in the spec and as keywords")
    merged = {**spec_overrides, **overrides}
    if base not in _REGISTRY:
        raise WorkloadError(_unknown_workload_message(base))
    try:
        workload = _REGISTRY[base](**merged)
    except WorkloadError:
        raise
    except (TypeError, ValueError) as exc:  # a bring-your-own factory's own complaint, e.g. an unexpected keyword
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise WorkloadError(f"workload {base!r}: {type(exc).__name__}: {first_line}") from exc
    if not isinstance(workload, Workload):
        raise WorkloadError(f"workload factory {base!r} returned {type(workload).__name__}, not Workload")
    seed = workload.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise WorkloadError(
            f"workload {base!r}: seed must be an integer in [0, 2**64 - 1] (torch's generators take 64-bit "
            f"unsigned seeds), got {seed!r}"
        )
    return dataclasses.replace(workload, name=format_workload_spec(base, merged), overrides=merged)


def _unknown_workload_message(name: str) -> str:
    """One line: the closest registered names (spelling variants such as 'DiT-XL/2' normalised first), and
    where to see them all, including the CPU-sized ones."""
    names = list(_REGISTRY)
    query = name.lower().replace("_", "-").replace("/", "-").replace(" ", "-")
    # Names that contain the query ("tiny" -> every tiny one), then spelling neighbours, best first.
    containing = sorted((n for n in names if query in n), key=len) if len(query) >= 3 else []
    close = list(dict.fromkeys([*containing, *difflib.get_close_matches(query, names, n=6, cutoff=0.5)]))[:6]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown workload {name!r}{hint} (`python -m models` lists all {len(names)}; "
        f"the CPU-sized ones are {', '.join(TINY_WORKLOADS)})"
    )


# ---------------------------------------------------------------------------------------------------------------
# Workload specs: "name:key=value:key=value"

# ',' separates workloads in command-line lists, ':' separates a spec's parts, '=' a key from its value.
_SPEC_SEPARATORS = (",", ":", "=")


def _literal(text: str) -> Any:
    """A Python literal if ``text`` is one (ast.literal_eval: nothing is executed), else ``text`` itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError):
        return text


def parse_workload_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value:key=value"`` -> ``(name, {key: value, ...})``, keys in the order given.

    A value is the Python literal it spells (``128``, ``False``, ``0.5``, ``None``, ``'128'``), else the plain
    string (``bfloat16``). A spec holds no ',': commas separate workloads in command-line lists."""
    if not isinstance(spec, str) or not spec:
        raise WorkloadError(f"a workload spec is a non-empty string like 'gpt2-large:seq_len=128', got {spec!r}")
    if "," in spec:
        raise WorkloadError(f"workload spec {spec!r} contains ','; commas separate workloads in lists")
    name, *pairs = spec.split(":")
    if not name:
        raise WorkloadError(f"workload spec {spec!r} has no name before ':'")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier() or not text:
            raise WorkloadError(
                f"bad override {pair!r} in workload spec {spec!r}; expected key=value, e.g. seq_len=128"
            )
        if key in overrides:
            raise WorkloadError(f"override {key!r} appears twice in workload spec {spec!r}")
        overrides[key] = _literal(text)
    return name, overrides


def format_workload_spec(name: str, overrides: Mapping[str, Any]) -> str:
    """The canonical spec for ``name`` with ``overrides`` (in their order): what :func:`parse_workload_spec`
    reads back to the same values. A string is written bare unless it is empty or would read as another
    literal (``dtype=bfloat16``, but ``tag='128'`` and ``tag=''``); a value with no such spelling (a callable,
    a tuple — it needs a ',' — or text containing ':') is a WorkloadError."""
    parts = [name]
    for key, value in overrides.items():
        text = value if isinstance(value, str) and value and _literal(value) == value else repr(value)
        back = _literal(text)
        if (
            not key.isidentifier()
            or any(c in text for c in (",", ":"))
            or type(back) is not type(value)
            or back != value
        ):
            raise WorkloadError(
                f"workload {name!r}: override {key}={value!r} cannot be written in a workload spec "
                "(values are literals or plain strings without ',' or ':')"
            )
        parts.append(f"{key}={text}")
    return ":".join(parts)


# A plain Workload's overridable fields: its scalar ones except the name (get_workload sets it from the spec).
_WORKLOAD_OVERRIDE_TYPES = {k: v for k, v in override_types(Workload).items() if k != "name"}


def load_workload_module(module_name: str) -> list[str]:
    """Import a bring-your-own module that calls :func:`register_workload`; returns the names it added.

    Any failure (import error, nothing registered, a non-Workload registered) is a :class:`WorkloadError`
    whose one-line message names the module."""
    cached = _MODULE_WORKLOADS.get(module_name)
    if cached and module_name in sys.modules and all(name in _REGISTRY for name in cached):
        return list(cached)  # a second load is a no-op: the import is cached, nothing new would register
    before = dict(_REGISTRY)
    try:
        importlib.import_module(module_name)
    except WorkloadError as exc:
        raise WorkloadError(f"workload module {module_name!r}: {exc}") from exc
    except (Exception, SystemExit) as exc:  # any import-time failure of user code, sys.exit() included
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise WorkloadError(
            f"workload module {module_name!r} failed to import: {type(exc).__name__}: {first_line}"
        ) from exc
    added = [k for k in _REGISTRY if k not in before or _REGISTRY[k] is not before[k]]
    if not added:
        raise WorkloadError(f"workload module {module_name!r} registered no workload (call models.register_workload)")
    for key in added:
        try:
            get_workload(key)
        except WorkloadError as exc:
            # A factory that needs arguments cannot be checked without them; a broken one is reported here.
            raise WorkloadError(f"workload module {module_name!r}: {exc}") from exc
    _MODULE_WORKLOADS[module_name] = added
    return added


# The built-in workloads (models/catalog.py), registered once, when the package is imported: every lookup and
# every copy of the registry sees them.
for _name, _factory in builtin_workloads().items():
    register_workload(_factory, name=_name)
del _name, _factory
