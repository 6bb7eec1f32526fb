"""Prometheus metrics; `npc` labels are capped so a world of NPCs cannot explode cardinality."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram

OTHER = "_other"
_max_labels = 500
_seen: set[str] = set()
_lock = threading.Lock()


def set_max_npc_labels(n: int) -> None:
    global _max_labels
    _max_labels = n


def npc_label(npc_id: str) -> str:
    """The NPC's own label for the first `max_npc_labels` NPCs seen, `_other` past that.

    Every NPC series costs Prometheus memory; past the cap, further NPCs are
    counted together under npc="_other" (totals stay right, per-NPC detail is lost).
    """
    with _lock:
        if npc_id in _seen:
            return npc_id
        if len(_seen) < _max_labels:
            _seen.add(npc_id)
            return npc_id
    return OTHER


def labelled_npcs() -> set[str]:
    """The NPC ids that have their own label (what /metrics filters by tenant)."""
    with _lock:
        return set(_seen)


_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter("npc_requests", "Chat requests by outcome", ["npc", "status"])
PROMPT_TOKENS = Counter("npc_prompt_tokens", "Prompt tokens processed", ["npc"])
COMPLETION_TOKENS = Counter("npc_completion_tokens", "Completion tokens generated", ["npc"])
TTFT = Histogram("npc_time_to_first_token_seconds", "Time to first token", ["npc"], buckets=_LAT)
ITL = Histogram("npc_inter_token_latency_seconds", "Time between output chunks", ["npc"], buckets=_ITL)
E2E = Histogram("npc_e2e_request_latency_seconds", "Request latency end to end", ["npc"], buckets=_LAT)
REQUESTS_RUNNING = Gauge("npc_requests_running", "Requests generating", ["npc"])
REQUESTS_WAITING = Gauge("npc_requests_waiting", "Requests waiting for an engine", ["npc"])
ENGINE_LOADS = Counter("npc_engine_loads", "Engines started", ["base"])
WEIGHT_SWAPS = Counter("npc_weight_swaps", "NPC weights swapped into a running engine", ["base"])
EVICTIONS = Counter("npc_engine_evictions", "NPCs evicted from an engine slot", ["base"])
LOAD_LATENCY = Histogram("npc_load_latency_seconds", "Time to load an NPC into an engine", ["base"], buckets=_LAT)
NPCS_LOADED = Gauge("npc_npcs_loaded", "NPCs currently loaded in engines")
JOBS = Gauge("npc_jobs", "NPC records by state", ["state"])
STAGE_DURATION = Histogram("npc_job_stage_duration_seconds", "Pruning job stage durations", ["stage"],
                           buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
QUEUE_DEPTH = Gauge("npc_queue_depth", "Jobs waiting in the Redis queue")
WORKERS_LIVE = Gauge("npc_workers_live", "Workers with a fresh heartbeat")
HOT = Gauge("npc_hot", "1 while the NPC serves from an engine of its own (hot), else 0", ["npc"])
ENGINES = Gauge("npc_engines", "Engines running, by mode (mixed, swap, hot: one hot NPC's own)", ["mode"])
HOT_SWITCHES = Counter("npc_hot_switches", "Hot NPCs moved to their own engine (promote) or back (demote)",
                       ["direction"])
for _mode in ("mixed", "swap", "hot"):
    ENGINES.labels(mode=_mode)
for _direction in ("promote", "demote"):
    HOT_SWITCHES.labels(direction=_direction)
