"""Persona-Pruner: structured FFN pruning of a base LLM for one persona.

Importable without the service: data, methods, export and evaluation live here.
"""

import math

__all__ = ["PruneError", "check_number"]


class PruneError(Exception):
    """A user-facing error: bad input or a base model we cannot prune."""


class PruneCancelled(Exception):
    """Raised from a progress callback to stop a prune; nothing is left in --out."""


def check_number(name: str, value, lo: float, hi: float, *, integer: bool = False) -> None:
    """A user option must be a (whole) number in [lo, hi]; bools and NaN are not numbers here."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not lo <= value <= hi:
        kind = "a whole number" if integer else "a number"
        raise PruneError(f"option {name} must be {kind} in [{lo}, {hi}], got {value!r}")
