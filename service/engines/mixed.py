"""Mixed engines: one engine per base serves any number of NPCs in the same batches.

NPCs that have a compact form are not swapped: a *mask engine* runs the dense base and
applies each token's NPC channel mask inside down_proj (vllm_ext/masks.py), so requests of
different NPCs share one decode batch. An NPC is "loaded" when its mask adapter is in the
engine (vLLM's LoRA cache); keep_alive, pin and unload act on that adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from service import metrics
from service.engines.launch import compiled
from service.engines.slot import NpcWeights, Slot
from service.errors import ApiError

if TYPE_CHECKING:
    from service.engines.pool import EnginePool

log = logging.getLogger(__name__)


@lru_cache(maxsize=16)
def _base_config(base_dir: str) -> dict:
    return json.loads((Path(base_dir) / "config.json").read_text())


class _MaskedEngine:
    """The engine as the serving code sees it, with every request tagged with the NPC's mask."""

    def __init__(self, engine, lora):
        self._engine, self._lora = engine, lora

    def generate(self, prompt, params, request_id, **kw):
        return self._engine.generate(prompt, params, request_id, lora_request=self._lora, **kw)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@dataclass
class MaskSlot(Slot):
    npcs: dict[str, float] = field(default_factory=dict)  # loaded NPC -> last use
    lora_of: dict[str, int] = field(default_factory=dict)  # loaded NPC -> the adapter id it runs with
    active: dict[str, int] = field(default_factory=dict)  # NPC -> requests in flight
    pinned_masks: set[str] = field(default_factory=set)  # NPCs pinned in vLLM's LoRA cache

    def loaded(self) -> list[str]:
        return list(self.npcs)

    def fail_waiters(self, err: ApiError) -> None:
        pass  # requests run inside vLLM's scheduler: nothing waits here


class MixedStrategy:
    def __init__(self, pool: "EnginePool"):
        self.pool = pool
        self.residency = pool.residency
        self._lora_ids: dict[tuple, int] = {}
        self._adapters: dict[tuple, str] = {}

    def applies(self, w: NpcWeights) -> bool:
        return self.pool.settings.mixed_batches and w.compact and not w.mask

    def make_slot(self, key, index, engine, core, w: NpcWeights, hold: bool) -> MaskSlot:
        return MaskSlot(key=key, index=index, engine=engine, core=core, base=w.base_label)

    def slot_pinned(self, slot: MaskSlot) -> bool:
        return any(self.residency.pinned(n) for n in slot.npcs)

    @staticmethod
    def base_weights(w: NpcWeights) -> NpcWeights:
        """The engine an NPC's mask runs on: its dense base."""
        cfg = _base_config(w.base_dir)
        key = (w.key[0], cfg.get("intermediate_size"), cfg.get("num_hidden_layers"), "mixed")
        return NpcWeights(npc_id=w.npc_id, ckpt=Path(w.base_dir), key=key, base_label=w.base_label, mask=True)

    async def expire_idle(self, slot: MaskSlot, now: float) -> None:
        for npc, last in list(slot.npcs.items()):
            ka = self.residency.of(npc)
            if ka >= 0 and not slot.active.get(npc) and last + ka <= now:
                log.info("NPC %s idle past its keep_alive: mask adapter removed", npc)
                await self._drop_adapter(slot, npc)

    async def _route(self, bw: NpcWeights) -> MaskSlot:
        pool = self.pool
        pool.drop_dead(bw.key)
        slots = pool.slots.get(bw.key, [])
        if not slots:
            return await pool.new_slot(bw, hold=False)
        pool.grow(bw)
        # the least loaded engine; on a tie, one that already holds this NPC's mask
        return min(slots, key=lambda s: (s.inflight, bw.npc_id not in s.npcs, s.index))

    def _lora_id(self, k: tuple) -> int:
        """One adapter id per (NPC, checkpoint): an NPC served by its prompt (the base, every channel)
        gets a new id when its pruned mask takes over, so vLLM's adapter cache never answers with the
        old one, and requests still running on the old id finish on it."""
        if k not in self._lora_ids:
            self._lora_ids[k] = len(self._lora_ids) + 1
        return self._lora_ids[k]

    async def _adapter(self, w: NpcWeights):
        """The NPC's mask as a vLLM LoRA request (the adapter directory is written once)."""
        from vllm.lora.request import LoRARequest

        from service.engines.vllm_ext.masks import write_mask_adapter

        k = (w.npc_id, str(w.ckpt))
        path = self._adapters.get(k)
        if path is None:
            cfg = _base_config(w.base_dir)
            digest = hashlib.sha1(str(w.ckpt).encode()).hexdigest()[:10]
            out = self.pool.settings.data / "masks" / f"{w.npc_id}-{digest}"
            await asyncio.to_thread(write_mask_adapter, out, w.kept, cfg["intermediate_size"],
                                    cfg["hidden_size"], w.base_dir, w.scales)
            path = self._adapters[k] = str(out)
        lora_id = self._lora_id(k)
        return LoRARequest(f"{w.npc_id}-{lora_id}", lora_id, path)

    async def _drop_adapter(self, slot: MaskSlot, npc_id: str) -> None:
        slot.npcs.pop(npc_id, None)
        slot.pinned_masks.discard(npc_id)
        lora_id = slot.lora_of.pop(npc_id, None)
        metrics.EVICTIONS.labels(base=slot.base).inc()
        self.pool.update_loaded()
        if lora_id is None:
            return
        try:
            await slot.engine.remove_lora(lora_id)
        except Exception:
            log.warning("removing %s's mask adapter failed", npc_id, exc_info=True)

    @asynccontextmanager
    async def serving(self, w: NpcWeights, keep_alive: float | None = None):
        settings = self.pool.settings
        self.residency.set(w.npc_id, keep_alive)
        slot = await self._route(self.base_weights(w))
        limit = settings.mixed_batch_npcs + settings.max_waiting
        if slot.inflight >= limit:
            raise ApiError(429, f"{slot.inflight} requests already run or wait on this engine "
                           f"(NPC_MIXED_BATCH_NPCS + NPC_MAX_WAITING = {limit}); retry shortly",
                           type="rate_limit_exceeded", headers={"Retry-After": "2"})
        npc = w.npc_id
        slot.inflight += 1
        slot.active[npc] = slot.active.get(npc, 0) + 1
        try:
            lora = await self._adapter(w)
            if slot.lora_of.get(npc) != lora.lora_int_id:
                # first use here, or its mask changed (prompt -> pruned): the old adapter is left to
                # vLLM's LRU cache, since requests may still run on it
                t0 = time.time()
                try:
                    await slot.engine.add_lora(lora)
                except Exception as e:
                    raise ApiError(503, f"loading NPC '{npc}' into an engine failed: {type(e).__name__}: {e}",
                                   code="engine_error", headers={"Retry-After": "1"}) from e
                slot.npcs[npc] = time.time()
                if slot.lora_of.get(npc) is not None:
                    slot.pinned_masks.discard(npc)
                slot.lora_of[npc] = lora.lora_int_id
                metrics.LOAD_LATENCY.labels(base=slot.base).observe(time.time() - t0)
                self.pool.update_loaded()
            if self.residency.pinned(npc) and npc not in slot.pinned_masks:  # one RPC per pin, not per request
                await slot.engine.pin_lora(lora.lora_int_id)
                slot.pinned_masks.add(npc)
            slot.npcs[npc] = slot.last_used = time.time()
            yield _MaskedEngine(slot.engine, lora)
        finally:
            slot.inflight -= 1
            slot.active[npc] -= 1
            if not slot.active[npc]:
                del slot.active[npc]
            slot.last_used = time.time()
            if npc in slot.npcs:
                slot.npcs[npc] = slot.last_used
                if self.residency.of(npc) == 0 and npc not in slot.active:
                    await self._drop_adapter(slot, npc)

    async def unload(self, slot: MaskSlot, npc_id: str) -> bool:
        """Drop the NPC's mask adapter from this engine."""
        if npc_id not in slot.npcs:
            return False
        if slot.active.get(npc_id):
            raise ApiError(409, f"NPC '{npc_id}' is serving requests; unload it when idle",
                           code="npc_busy", headers={"Retry-After": "2"})
        await self._drop_adapter(slot, npc_id)
        return True

    def describe(self, s: MaskSlot) -> dict:
        now = time.time()
        npcs = []
        for n, last in sorted(s.npcs.items()):
            kn = self.residency.of(n)
            npcs.append({"npc": n, "in_flight": s.active.get(n, 0), "last_used": last, "keep_alive": kn,
                         "pinned": kn < 0,
                         "expires_at": None if kn < 0 or s.active.get(n) else max(now, last + kn)})
        return {
            "shape": s.shape(), "slot": s.index,
            "mode": "mixed", "core": s.core, "npc": None, "npcs": npcs, "in_flight": s.inflight,
            "compiled": compiled(s.engine),
            "waiting": max(0, s.inflight - self.pool.settings.mixed_batch_npcs), "waiting_npcs": [],
            "swapping_to": None, "swaps": 0, "last_swap": None, "last_used": s.last_used,
            "keep_alive": None, "pinned": self.slot_pinned(s), "expires_at": None,
        }
