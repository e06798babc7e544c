"""Privacy settings of a run: σ from a target (ε, δ) by Opacus' accountants, or ε from a given σ.

Opacus is imported only when an accountant is needed, so reading a :class:`PrivacyParams` costs nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from ._common import check_max_grad_norm
from .errors import DPConfigError, error_text

__all__ = ["ACCOUNTANTS", "PrivacyParams", "resolve_privacy"]

ACCOUNTANTS = ("prv", "rdp", "gdp")
DEFAULT_SAMPLE_RATE = 0.01
DEFAULT_STEPS = 1000
DEFAULT_DELTA = 1e-5
PRV_MIN_NOISE = 0.5  # below this σ, ε is computed with RDP instead of PRV (see resolve_privacy)


@dataclass(frozen=True)
class PrivacyParams:
    """Resolved privacy settings of a run; all of them go into every result record."""

    max_grad_norm: float
    noise_multiplier: float
    epsilon: float | None
    delta: float | None
    accountant: str
    sample_rate: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_privacy(
    max_grad_norm: float = 1.0,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float = DEFAULT_DELTA,
    sample_rate: float = DEFAULT_SAMPLE_RATE,
    steps: int = DEFAULT_STEPS,
    accountant: str = "prv",
) -> PrivacyParams:
    """Resolve σ from a target (ε, δ) with Opacus' accountant, or ε from a given σ (default σ = 1.0).

    ``sample_rate`` is the Poisson sampling rate q = B / N and ``steps`` the number of optimizer steps the
    privacy guarantee covers; with σ = 0 the step is not private and ε is ``inf``. For σ < 0.5 the PRV
    accountant is impractically slow, so ε is computed with RDP and ``accountant`` says ``"rdp"``."""
    max_grad_norm = check_max_grad_norm(max_grad_norm, allow_inf=False)
    if accountant not in ACCOUNTANTS:
        raise DPConfigError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    if not (0 < sample_rate <= 1):
        raise DPConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DPConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0 < target_delta < 1):
        raise DPConfigError(f"delta must be in (0, 1), got {target_delta!r}")
    if noise_multiplier is not None and target_epsilon is not None:
        raise DPConfigError("give either noise_multiplier or target_epsilon, not both")

    if target_epsilon is not None:
        if not (target_epsilon > 0) or math.isinf(target_epsilon):
            raise DPConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
        sigma = _sigma_for(target_epsilon, target_delta, sample_rate, steps, accountant)
    else:
        sigma = 1.0 if noise_multiplier is None else float(noise_multiplier)
        if math.isnan(sigma) or sigma < 0 or math.isinf(sigma):
            raise DPConfigError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if sigma == 0:
        epsilon = math.inf
    else:
        if accountant == "prv" and sigma < PRV_MIN_NOISE:
            # Opacus' PRV accountant needs minutes and gigabytes for tiny σ (σ=0.1: >10 min, 8 GB), where ε is
            # huge anyway; RDP gives a valid upper bound at once. The record names the accountant used.
            accountant = "rdp"
        try:
            epsilon = _epsilon_of(sigma, target_delta, sample_rate, steps, accountant)
        except _ACCOUNTANT_ERRORS as exc:
            raise DPConfigError(
                f"ε of noise multiplier {sigma:g} (--noise-multiplier) cannot be computed by the {accountant} "
                f"accountant at {_setting(target_delta, sample_rate, steps)} (Opacus: {error_text(exc)}); "
                f"choose another --accountant (valid: {', '.join(ACCOUNTANTS)})"
            ) from None
    return PrivacyParams(max_grad_norm, sigma, epsilon, target_delta, accountant, sample_rate, steps)


# What Opacus' accountants raise on settings they cannot resolve (its own ValueErrors, scipy's root finders,
# overflow in the PRV domain); anything else is a bug and propagates.
_ACCOUNTANT_ERRORS = (ValueError, ArithmeticError, RuntimeError)


@contextmanager
def _quiet_rdp_orders() -> Iterator[None]:
    """Silence RDP's "optimal order is the largest alpha" (the bound could be tighter; ε is still a valid upper
    bound), which Opacus repeats on every step of its σ search and which would bury a one-line error. Its
    other warnings (GDP "can underestimate privacy expenditure") stay."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


def _epsilon_of(sigma: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, sample_rate, steps)]
    with _quiet_rdp_orders():
        return float(acc.get_epsilon(delta=delta))


def _sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ reaching ``target_epsilon`` by Opacus' search; a one-line :class:`DPConfigError` saying why if none does."""
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    try:
        with _quiet_rdp_orders():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
    except _ACCOUNTANT_ERRORS as exc:
        opacus_says = error_text(exc)
    where = f"with the {accountant} accountant at {_setting(delta, sample_rate, steps)}"
    try:
        floor = _epsilon_of(MAX_SIGMA, delta, sample_rate, steps, accountant)
    except _ACCOUNTANT_ERRORS:
        floor = None
    if floor is not None and floor > target_epsilon:
        # Opacus doubles σ up to MAX_SIGMA; each accountant has an ε it never goes below, whatever σ (PRV: its
        # discretisation error, 0.01; RDP: log(1/δ) over its largest order), so fewer steps do not help.
        raise DPConfigError(
            f"target ε {target_epsilon:g} (--target-epsilon) is unreachable {where}: even σ = {MAX_SIGMA:g} "
            f"certifies only ε = {floor:.3g} (Opacus: {opacus_says}); raise --target-epsilon above {floor:.3g} "
            f"or choose another --accountant (valid: {', '.join(ACCOUNTANTS)})"
        )
    raise DPConfigError(
        f"target ε {target_epsilon:g} (--target-epsilon) cannot be resolved to a noise multiplier {where} "
        f"(Opacus: {opacus_says}); choose another --accountant (valid: {', '.join(ACCOUNTANTS)}) or give "
        f"--noise-multiplier"
    )


def _setting(delta: float, sample_rate: float, steps: int) -> str:
    return f"δ {delta:g}, sample rate {sample_rate:g}, {steps} steps"
