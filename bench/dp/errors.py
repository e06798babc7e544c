"""The two ways a DP method can refuse: bad settings (a usage error) or a model it cannot run (a result)."""

from __future__ import annotations

__all__ = ["DPConfigError", "MethodUnsupported"]


class DPConfigError(ValueError):
    """Invalid DP settings (clip norm, noise, epsilon, method name); the message is one line."""


class MethodUnsupported(RuntimeError):
    """A method cannot run on a model. ``reason`` is the library's real error, ``diagnosis`` one line of why."""

    def __init__(self, method: str, reason: str, diagnosis: str = ""):
        self.method, self.reason, self.diagnosis = method, reason, diagnosis
        super().__init__(f"{method}: {reason}" + (f" — {diagnosis}" if diagnosis else ""))
