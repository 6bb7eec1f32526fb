"""How long an NPC stays loaded: its keep_alive (seconds; -1 pinned; 0 released after each request)."""

from __future__ import annotations

PIN = -1.0


class Residency:
    def __init__(self, default: float):
        self.default = default
        self.keep_alive: dict[str, float] = {}  # per NPC, seconds; PIN never expires

    def of(self, npc_id: str | None) -> float:
        return self.keep_alive.get(npc_id, self.default) if npc_id else 0.0

    def pinned(self, npc_id: str | None) -> bool:
        return npc_id is not None and self.of(npc_id) < 0

    def set(self, npc_id: str, seconds: float | None) -> None:
        if seconds is not None:
            self.keep_alive[npc_id] = seconds

    def remember(self, npc_id: str, seconds: float) -> None:
        """The record's own residency, unless this process was given a newer one."""
        self.keep_alive.setdefault(npc_id, seconds)

    def forget(self, npc_id: str) -> None:
        self.keep_alive.pop(npc_id, None)
