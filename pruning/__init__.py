"""Persona-Pruner: structured FFN pruning of a base LLM for one persona.

Importable without the service: data, methods, export and evaluation live here.
"""

__all__ = ["PruneError"]


class PruneError(Exception):
    """A user-facing error: bad input or a base model we cannot prune."""


class PruneCancelled(Exception):
    """Raised from a progress callback to stop a prune; nothing is left in --out."""
