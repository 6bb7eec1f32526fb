"""The NPC resource: create, show, list, load; residency (`keep_alive`).

Importable without torch: options are checked by `pruning.options`, which needs none.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pruning import PruneError
from pruning.options import METHOD_NAMES, validate_request_options

MAX_PERSONA_CHARS = 4000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.'\-]{0,63}$"


class NpcCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="display name, 1-64 chars (taken from the card when omitted)")
    persona: str | None = Field(None, min_length=1, max_length=MAX_PERSONA_CHARS,
                                description="persona description (or give `card`)")
    card: dict[str, Any] | None = Field(None, description="a Tavern V1/V2/V3 character card object")
    sparsity: float = Field(0.25, ge=0, le=0.9, description="share of FFN channels to remove, in [0, 0.9]; 0: a "
                            "prompt-only NPC (the dense base with the persona prompt), ready at once, no job")
    method: str | None = Field(None, description="pruning method (default: persona-pruner, NPC_DEFAULT_METHOD)")
    options: dict[str, Any] | None = Field(None, description='method options, e.g. {"profile": "fast"}, '
                                           '{"steps": 80}, {"recover": true}')
    evaluate: bool | None = Field(None, description="score the NPC against the dense base when it is ready "
                                  "(default: NPC_EVALUATE)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    keep_alive: float | str | None = Field(
        None, description="residency once ready, kept across restarts: seconds or '5m' idle before the NPC "
                          "leaves its engine, -1 or 'pin' (loaded when ready and never evicted), 0 (released "
                          "after each request); default NPC_KEEP_ALIVE")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v):
        return parse_keep_alive(v)

    @field_validator("persona")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("persona must not be blank")
        return v.strip() if v else v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None) -> str | None:
        if v is not None and v not in METHOD_NAMES:
            raise ValueError(f"unknown method {v!r}; choose one of: {', '.join(sorted(METHOD_NAMES))}")
        return v

    @field_validator("options")
    @classmethod
    def _known_options(cls, v: dict | None) -> dict | None:
        if not v:
            return v
        try:  # keys and values (types, ranges): a bad one is a 400 now, not a failed job later
            validate_request_options(v)
        except PruneError as e:
            raise ValueError(str(e)) from None
        return v


class Npc(BaseModel):
    id: str
    object: Literal["npc"] = "npc"
    name: str
    persona: str
    sparsity: float
    method: str
    base: str
    status: Literal["queued", "running", "ready", "failed", "cancelled"]
    stage: str | None = None
    progress: float = 0.0
    error: str | None = None
    created: float
    updated: float
    ready_at: float | None = None
    eta_s: float | None = None
    timings: dict[str, float] | None = None
    attempts: int = 0
    kept_per_layer: int | None = None
    options: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = Field(None, description="evaluation against the dense base, once known")
    greeting: str | None = None
    persona_truncated: bool = False
    keep_alive: float | None = Field(None, description="the NPC's residency (seconds; -1 pinned); null: the default")
    serving: Literal["prompt", "pruned"] | None = Field(
        None, description="what answers its chats now: the dense base with its persona prompt (a prompt-only NPC, "
                          "or while its prune runs), or its pruned model; null: nothing (failed, cancelled)")


class NpcList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Npc]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = Field(None, description="pass as `after` for the next page")



_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_keep_alive(v: Any) -> float | None:
    """Ollama-style residency: seconds, "5m"/"1h"/"30s", -1 or "pin" (never evict), 0 (leave after)."""
    if v is None:
        return None
    if isinstance(v, str):
        t = v.strip().lower()
        if t in ("pin", "forever", "-1"):
            return -1.0
        try:
            v = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
        except ValueError:
            raise ValueError("keep_alive: seconds, a duration like '5m', or -1/'pin'") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("keep_alive: seconds, a duration like '5m', or -1/'pin'")
    if v < 0:
        return -1.0
    return float(v)


class KeepAliveMixin(BaseModel):
    keep_alive: float | str | None = Field(
        None, description="how long the NPC stays in its engine slot after this request: seconds, "
                          "'5m', -1 or 'pin' (never evicted), 0 (released right after)")

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v):
        return parse_keep_alive(v)


class NpcLoad(KeepAliveMixin):
    model_config = ConfigDict(extra="forbid")
    wait_s: float | None = Field(
        None, ge=0, le=3600, description="how long to wait for the load before answering 202 while it goes on "
                                         "(an engine start takes a minute on a CPU); default NPC_LOAD_WAIT_S")
