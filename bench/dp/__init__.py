"""DP-SGD methods behind one registry (``bench.dp.base``), one file per family.

Public API: :func:`available_methods`, :func:`get_method`, :func:`clipped_grad_sum`, :func:`build_step`,
:func:`make_optimizer`, :func:`base_optimizer`, what a method is built from (:class:`DPMethod`,
:class:`StepInputs`, :class:`DataParallel`), the training modes (:class:`TrainingMode`, :func:`prepare_model`;
``bench.dp.modes``), :func:`resolve_privacy` (``bench.dp.privacy``), the phase channel
(``bench.trackers.channel``) and the errors (``bench.dp.errors``). Importing the package registers every method;
the import order below is the display order: the baseline first, the naive reference last.
"""

# isort: off
from .base import (
    OPTIMIZERS,
    ClippedSumMethod,
    ClippedSumStep,
    DataParallel,
    DPMethod,
    DPStep,
    StepInputs,
    available_methods,
    base_optimizer,
    build_step,
    clipped_grad_sum,
    get_method,
    make_optimizer,
    register_method,
)
from bench.trackers.channel import PHASES, PhaseMarker, annotate_dp_buffer, no_mark
from .errors import DPConfigError, MethodUnsupported, ModeUnsupported, is_out_of_memory
from .modes import CHECKPOINTINGS, DEFAULT_MODE, PRECISIONS, TrainingMode, prepare_model
from .trainable import TRAINABLE_KINDS, Trainable, parse_trainable
from .privacy import ACCOUNTANTS, PrivacyParams, resolve_privacy
from . import nondp, opacus, bk, func, jax_methods, microbatch  # noqa: F401  (each registers its methods)
# isort: on

__all__ = [
    "ACCOUNTANTS",
    "CHECKPOINTINGS",
    "DEFAULT_MODE",
    "OPTIMIZERS",
    "PHASES",
    "PRECISIONS",
    "TRAINABLE_KINDS",
    "ClippedSumMethod",
    "ClippedSumStep",
    "DPConfigError",
    "DPMethod",
    "DPStep",
    "DataParallel",
    "MethodUnsupported",
    "ModeUnsupported",
    "PhaseMarker",
    "PrivacyParams",
    "StepInputs",
    "Trainable",
    "TrainingMode",
    "annotate_dp_buffer",
    "available_methods",
    "base_optimizer",
    "build_step",
    "clipped_grad_sum",
    "get_method",
    "is_out_of_memory",
    "make_optimizer",
    "no_mark",
    "parse_trainable",
    "prepare_model",
    "register_method",
    "resolve_privacy",
]
