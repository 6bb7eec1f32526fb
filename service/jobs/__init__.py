"""Pruning jobs on Redis: the queue (queue.py), the job (prune_job.py), the worker that runs it (worker.py)."""
