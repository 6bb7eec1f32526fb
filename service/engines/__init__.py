"""vLLM engines that serve NPCs: one budget (pool.py), two ways to share an engine (swap.py, mixed.py)."""
