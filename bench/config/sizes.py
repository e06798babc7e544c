"""Byte sizes as people write them (``8GiB``, ``512MB``, ``1e9B``) turned into byte counts, and back for a reader.

Torch-free and below the command line: the size options (bench/config/options.py) and the overhead model's fixed part
(bench/plan/overhead.py) parse with the same :func:`parse_byte_size`.
"""

from __future__ import annotations

import fractions
import math
import re

__all__ = ["BINARY_UNITS", "BYTE_UNITS", "MAX_BYTES", "SIZE_EXAMPLES", "parse_byte_size", "size_text"]

# Binary units, smallest first: what :func:`size_text` writes, and (up to TiB) what the parser reads.
BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
# Byte units, case-insensitive: decimal (k, kb = 10**3 ...) and binary (kib = 2**10 ...). A size needs one: a
# bare "80" used to mean 80 bytes to the parser and 80 GiB to whoever typed it.
BYTE_UNITS = {
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    **{unit.lower(): 2 ** (10 * power) for power, unit in enumerate(BINARY_UNITS[:5]) if power},
}
MAX_BYTES = 2**63 - 1  # byte counts are int64 in torch and in every record
_SIZE = re.compile(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")
SIZE_EXAMPLES = "e.g. 8GiB, 512MB, 1e9B"


def parse_byte_size(text: str, *, allow_zero: bool = False) -> int:
    """``"8GiB"``, ``"512 MB"``, ``"1.5KiB"``, ``"1E9B"`` → bytes (a fraction of a byte rounds down); ValueError
    (one line) for text that is not a size, a size without a unit (``0`` needs none), one that is not finite or
    above :data:`MAX_BYTES`, or one below 1 byte unless ``allow_zero``. ``--memory-budget`` and the other size
    options parse with it (:func:`bench.config.options.byte_size`), as does ``--budget-overhead``'s fixed part."""
    match = _SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in (*BYTE_UNITS, ""):
        raise ValueError(f"{text!r} is not a size ({SIZE_EXAMPLES})")
    number, unit = match.group(1), match.group(2).lower()
    # Bounds on the float first: an exact 1e400 would be a 400-digit integer (1e999999999, a long wait).
    approx = float(number) * BYTE_UNITS.get(unit, 1)
    at_least = "0 or >= 1 byte" if allow_zero else ">= 1 byte"
    if approx == 0:
        if allow_zero:
            return 0
        raise ValueError(f"size must be {at_least}, got {text!r}")
    if not unit:
        raise ValueError(f"{text!r} has no unit: write {number}GiB, {number}GB or {number}B ({SIZE_EXAMPLES})")
    value = math.floor(fractions.Fraction(number) * BYTE_UNITS[unit]) if approx <= 2 * MAX_BYTES else None
    if value is None or value > MAX_BYTES:
        raise ValueError(f"{text!r} is too large: sizes go up to 2**63 - 1 bytes (8 EiB)")
    if value < 1:
        raise ValueError(f"size must be {at_least}, got {text!r}")
    return value


def size_text(size_bytes: float) -> str:
    """Bytes for a reader: "1 KiB", "2.52 MiB", "141 GiB" (the largest binary unit below the size, 3 significant
    digits, an exact multiple without decimals)."""
    value, unit = float(size_bytes), 0
    while abs(value) >= 1024 and unit < len(BINARY_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    number = f"{value:.0f}" if value == int(value) or abs(value) >= 999.5 else f"{value:.3g}"
    return f"{number} {BINARY_UNITS[unit]}"
