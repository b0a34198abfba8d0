"""Reading fields of an HF config.json: typed, range-checked, and named in the error when they are not.

A family's `from_hf` reads its sizes with these, so that a missing, zero or mistyped size is reported by its
key before any array is made (not as a KeyError, a ZeroDivisionError or a failed reshape while tracing).
"""

from __future__ import annotations

import math
import numbers

from bild_jax.errors import InputError

REQUIRED = object()  # `default` of a field that config.json must hold


def config_int(hf: dict, key: str, default=REQUIRED, minimum: int = 1) -> int:
    """hf[key] as an int >= `minimum`; `default` when the key is absent or null."""
    value = hf.get(key)
    if value is None:
        if default is REQUIRED:
            raise InputError(f"config.json has no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"config.json: {key} must be an int >= {minimum}, got {value!r}")
    return int(value)


def config_float(hf: dict, key: str, default: float) -> float:
    """hf[key] as a finite float > 0 (an epsilon, a rope base); `default` when absent or null."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise InputError(f"config.json: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def token_ids(hf: dict, key: str, default=None) -> tuple[int, ...]:
    """A token-id field (absent/null, an int or a list of ints, e.g. `eos_token_id`) as a tuple of ints."""
    value = hf.get(key, default)
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InputError(f"config.json: {key} must be a token id (an int >= 0) or a list of them, got {value!r}")
    return tuple(int(v) for v in values)


def check_divides(part_key: str, part: int, total_key: str, total: int) -> None:
    """An error naming both keys unless `part` divides `total` (e.g. key/value heads into query heads)."""
    if total % part:
        raise InputError(f"config.json: {part_key} ({part}) must divide {total_key} ({total})")
