"""Benchmarks, run from the project root as modules: `python -m benchmarks.quality`,
`python -m benchmarks.serving`, `python -m benchmarks.first_npc`; one-off experiments behind
docs/quality_experiments.md in `benchmarks.experiments` (see its README.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_base() -> Path:
    """The default base model as installed by `npc models pull` (NPC_MODELS_DIR / NPC_DATA_DIR honoured)."""
    from service.devserver import DEFAULT_BASE, default_models_dir

    return default_models_dir() / DEFAULT_BASE
