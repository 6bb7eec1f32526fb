"""Code that runs inside vLLM's worker processes (imported there by name)."""
