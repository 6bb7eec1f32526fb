"""NPC serving microservice: control plane, workers and vLLM engines."""
