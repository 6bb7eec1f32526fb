"""What the engine strategies share: how to load one NPC, and one running engine."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


def shape_key(base_sha256: str, config: dict) -> tuple:
    return (base_sha256, config.get("intermediate_size"), config.get("num_hidden_layers"))


@dataclass
class NpcWeights:
    """How to load one NPC: its checkpoint dir, plus the compact form when it has one."""
    npc_id: str
    ckpt: Path
    key: tuple
    base_label: str = ""
    base_dir: str | None = None  # compact form: the base checkpoint and the kept FFN channels
    # per layer, shared with the verified-checkpoint cache (int arrays): lists only at a swap
    kept: Sequence[Sequence[int]] | None = None
    scales: Sequence[Sequence[float]] | None = None  # per kept channel, folded into down_proj
    mask: bool = False  # the base, for a mask engine

    @property
    def compact(self) -> bool:
        return self.base_dir is not None and self.kept is not None


@dataclass
class Slot:
    """One running engine of a shape; the strategy that owns it adds its own state."""
    key: tuple
    index: int
    engine: object
    core: str | None
    base: str = ""
    inflight: int = 0
    last_used: float = field(default_factory=time.time)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    def loaded(self) -> list[str]:
        """The NPCs this engine holds now."""
        raise NotImplementedError

    def idle(self) -> bool:
        return self.inflight == 0

    def shape(self) -> dict:
        return {"base_sha256": self.key[0][:12], "intermediate_size": self.key[1]}
