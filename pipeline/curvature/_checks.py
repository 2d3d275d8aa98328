"""Argument checks shared by the curvature wing, and the one error type they raise.

Every check names the argument and what is allowed, e.g. ``steps: must be an int >= 1, got 0``. The error is a
:class:`ValueError`, so callers outside the wing need not import it.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["CurvatureError", "check_int", "check_positive", "check_nonnegative", "check_k"]


class CurvatureError(ValueError):
    """The operator cannot be built as asked (non-repeatable model, unknown names, empty probe set), or an argument
    of a curvature routine is out of range."""


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int, which must be an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise CurvatureError(f"{name}: must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """``value`` as a float, which must be a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise CurvatureError(f"{name}: must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    """``value`` as a float, which must be a finite real number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise CurvatureError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def check_k(k_largest, k_smallest, dim: int) -> tuple[int, int]:
    """The numbers of largest and smallest eigenpairs asked for: each ``>= 0``, together between 1 and ``dim``."""
    k_largest, k_smallest = check_int("k_largest", k_largest, 0), check_int("k_smallest", k_smallest, 0)
    if not 1 <= k_largest + k_smallest <= dim:
        raise CurvatureError(f"k_largest + k_smallest: must be between 1 and dim={dim}, got {k_largest + k_smallest}")
    return k_largest, k_smallest
