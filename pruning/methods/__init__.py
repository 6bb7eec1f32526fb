"""Channel-importance methods: one registry (`registry.py`), the baselines (`baselines.py`) and
Persona-Pruner (`persona_pruner/`). Importing this package imports no method and no torch; the
built-in methods load on first use of `METHODS` / `get_method`."""

from pruning.methods.registry import (METHODS, LayerScores, PruneContext, block_param_counts,  # noqa: F401
                                      blocks_to_drop, get_method, layers_to_drop, register)
