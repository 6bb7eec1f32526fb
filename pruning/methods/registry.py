"""The method registry: every method maps (model, tokenizer, ctx) to one importance score per FFN
channel per layer (or, `LayerScores`, one per decoder block); export keeps the top-k of each layer.

The built-in methods register themselves when their modules are imported, which happens the
first time `METHODS` or `get_method` is used (so this module, and `PruneContext`, need no torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pruning import PruneError

# the modules whose methods register on import (pruning.options.METHOD_NAMES names them all)
BUILTIN_MODULES = ("pruning.methods.baselines", "pruning.methods.persona_pruner")
ScoreFn = Callable[..., list]


class _Methods(Mapping):
    """name -> score function; the built-in methods are imported on first use."""

    def __init__(self):
        self._fns: dict[str, ScoreFn] = {}
        self._loaded = False

    def _all(self) -> dict[str, ScoreFn]:
        if not self._loaded:
            self._loaded = True
            try:
                for name in BUILTIN_MODULES:
                    importlib.import_module(name)
            except BaseException:
                self._loaded = False
                raise
        return self._fns

    def __getitem__(self, name: str) -> ScoreFn:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


METHODS = _Methods()


def register(name: str):
    def wrap(fn: ScoreFn) -> ScoreFn:
        METHODS._fns[name] = fn
        return fn

    return wrap


def get_method(name: str) -> ScoreFn:
    try:
        return METHODS[name]
    except KeyError:
        raise PruneError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


@dataclass
class PruneContext:
    persona: str
    calibration: list[str] = field(default_factory=list)
    seed: int = 0
    max_length: int = 256
    progress: Callable[[float], None] = lambda f: None
    # optional, used by methods that need more than calibration prompts (persona-pruner)
    sparsity: float | None = None             # the target sparsity (export keeps keep_count(C, sparsity))
    system_prompt: str | None = None          # the chat-time system prompt; None: the persona text
    options: dict = field(default_factory=dict)  # method options, e.g. {"profile": "fast", "steps": 10}
    cache_dir: Path | None = None             # reusable intermediate data (synthetic sets); None: default
    base_id: str | None = None                # identifies the base weights in cache keys (sha256)
    stage: Callable[[str], None] = lambda name: None  # the method's current stage, for progress reports
    info: dict = field(default_factory=dict)  # what a method reports back (goes into the manifest)
    # what a method may return beside its scores: a multiplier per FFN channel and layer (all C),
    # folded into down_proj's kept columns at export (persona-pruner's `channel_scales`)
    channel_scales: list | None = None        # list[torch.Tensor]
    # (L, C) bool: the channels a method may keep (an NPC within a shared core); None: all
    allowed: object | None = None

    @property
    def chat_system(self) -> str:
        return self.system_prompt if self.system_prompt else self.persona


# -- depth pruning: whole blocks ----------------------------------------------------------


class LayerScores(list):
    """One importance per decoder block (not per channel): the method drops whole blocks."""


def block_param_counts(model) -> tuple[int, int]:
    """(parameters of one decoder block, parameters of its FFN)."""
    layer = model.model.layers[0]
    return sum(p.numel() for p in layer.parameters()), sum(p.numel() for p in layer.mlp.parameters())


def blocks_to_drop(model, sparsity: float) -> int:
    """Whole blocks whose parameters match `sparsity` of every FFN's parameters."""
    n_layers = len(model.model.layers)
    block, ffn = block_param_counts(model)
    n = round(sparsity * n_layers * ffn / block)
    return max(1, min(n_layers - 1, n))


def layers_to_drop(model, scores: LayerScores, sparsity: float) -> list[int]:
    """The least influential blocks, as many as `blocks_to_drop`, in layer order."""
    n = blocks_to_drop(model, sparsity)
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])
