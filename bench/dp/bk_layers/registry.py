"""The registry of Book-Keeping layer rules: one rule per module type, added by :func:`register_layer`.

A subclass of a registered type is accepted only if it keeps the registered type's ``forward`` (a subclass that
computes something else would give silently wrong gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor, nn

from .factors import Factored, Instantiated

__all__ = ["Contribution", "LayerRule", "register_layer", "rule_for", "supported_types"]

Contribution = Factored | Instantiated


class LayerRule(Protocol):
    """What a layer rule offers; a rule that accepts every configuration of its layer subclasses it for ``check``."""

    #: names of the parameters (module attributes) the rule produces contributions for
    params: tuple[str, ...]

    def check(self, module: nn.Module) -> str | None:
        """One line saying why this module's configuration is unsupported, or None."""
        return None

    def contributions(self, module: nn.Module, inp: Tensor, grad_out: Tensor) -> dict[str, Contribution]:
        """Per-sample gradient contributions of one call, keyed by parameter attribute (trainable ones only)."""


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer(module_type: type[nn.Module]) -> Callable[[type], type]:
    """Class decorator: register (an instance of) the rule class for ``module_type``."""

    def decorate(rule_cls: type) -> type:
        if module_type in _RULES:
            raise ValueError(f"a Book-Keeping rule for {module_type.__name__} is registered twice")
        _RULES[module_type] = rule_cls()
        return rule_cls

    return decorate


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s type (or a base type whose ``forward`` it does not override), else None."""
    for base in type(module).__mro__:
        if base in _RULES:
            return _RULES[base] if type(module).forward is base.forward else None
    return None


def supported_types() -> list[str]:
    return [t.__name__ for t in _RULES]
