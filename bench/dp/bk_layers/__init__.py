"""Book-Keeping's per-layer rules, one small file per layer type, behind a decorator registry.

A rule knows, for one module type, which parameters it covers, which module configurations it cannot handle,
and how to turn one call of the module — its input ``A`` and the gradient ``G`` of the loss sum w.r.t. its
output — into per-sample gradient contributions (:class:`~.factors.Factored` or
:class:`~.factors.Instantiated`) for each trainable parameter. The engine (``bench/dp/bk.py``) does the rest:
norms, cross terms of tied parameters, clipping and the clipped sum.
"""

# isort: off
from .factors import Factored, Instantiated, factored_inner, instantiated_inner
from .registry import Contribution, LayerRule, register_layer, rule_for, supported_types
from . import conv, embedding, layernorm, linear  # noqa: F401  (each registers its rule)
# isort: on

__all__ = [
    "Contribution",
    "Factored",
    "Instantiated",
    "LayerRule",
    "factored_inner",
    "instantiated_inner",
    "register_layer",
    "rule_for",
    "supported_types",
]
