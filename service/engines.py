"""vLLM engines shared by NPCs of one shape; an NPC is swapped in, not started.

Every NPC pruned from one base at one sparsity has the same tensor shapes, so a
running engine can take another NPC's weights in place (~0.4 s) instead of a new
engine start (~20 s). A swap waits for the engine's in-flight requests to drain
(a swap under a running request would mix weights inside it) and resets the
prefix cache (it is keyed by tokens, not weights).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from service import metrics
from service.errors import ApiError

log = logging.getLogger(__name__)


def shape_key(manifest: dict, config: dict) -> tuple:
    return (manifest.get("base_sha256", ""), config.get("intermediate_size"), config.get("num_hidden_layers"))


@dataclass
class Slot:
    key: tuple
    engine: object
    tokenizer: object
    npc_id: str | None = None
    base: str = ""
    inflight: int = 0
    waiting: int = 0
    wanting: dict = field(default_factory=dict)
    last_used: float = field(default_factory=time.time)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)


class EnginePool:
    def __init__(self, settings):
        self.settings = settings
        self.slots: dict[tuple, Slot] = {}
        self._starting: dict[tuple, asyncio.Task] = {}
        self._prewarmed: set[tuple] = set()

    # -- engine lifecycle -----------------------------------------------------

    def _engine_args(self, ckpt: Path):
        from vllm import AsyncEngineArgs

        kw = dict(
            model=str(ckpt), tokenizer=str(ckpt), enforce_eager=True, dtype="bfloat16",
            max_model_len=self.settings.max_model_len, seed=0, enable_prefix_caching=True,
            disable_log_stats=True,
        )
        if self.settings.kv_cache_bytes:
            kw["kv_cache_memory_bytes"] = self.settings.kv_cache_bytes
        else:
            kw["gpu_memory_utilization"] = self.settings.engine_memory_fraction
        return AsyncEngineArgs(**kw)

    def _start_engine(self, ckpt: Path, npc_id: str):
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.time()
        engine = AsyncLLM.from_engine_args(self._engine_args(ckpt))
        tok = AutoTokenizer.from_pretrained(ckpt)
        log.info("engine for %s started in %.1fs", ckpt, time.time() - t0)
        return engine, tok, npc_id

    def _evict_for(self, key: tuple) -> None:
        """Make room for one more engine: stop the least recently used idle one."""
        busy = len(self.slots) + len([k for k in self._starting if k not in self.slots])
        if busy < self.settings.max_engines:
            return
        idle = [sl for sl in self.slots.values() if sl.inflight == 0 and sl.waiting == 0]
        if not idle:
            raise ApiError(503, "every engine is busy serving other NPC shapes; retry shortly",
                           code="engines_busy", headers={"Retry-After": "5"})
        victim = min(idle, key=lambda sl: sl.last_used)
        log.info("evicting engine %s (NPC %s) for shape %s", victim.key, victim.npc_id, key)
        self.slots.pop(victim.key)
        self._stop(victim)

    def _stop(self, slot: Slot) -> None:
        """Stop a slot's engine (already out of `slots`); its NPC leaves."""
        metrics.EVICTIONS.labels(base=slot.base).inc()
        try:
            slot.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
        self._update_loaded()

    def _update_loaded(self) -> None:
        metrics.NPCS_LOADED.set(sum(1 for sl in self.slots.values() if sl.npc_id))

    async def _slot_for(self, key: tuple, npc_id: str, ckpt: Path, base: str) -> Slot:
        slot = self.slots.get(key)
        if slot is not None and not getattr(slot.engine, "errored", False):
            return slot
        if slot is not None:  # the engine died: replace it
            log.error("engine %s died; restarting", key)
            self.slots.pop(key, None)
            try:
                slot.engine.shutdown()
            except Exception:  # already dead
                pass
        task = self._starting.get(key)
        if task is None:
            self._evict_for(key)
            task = asyncio.ensure_future(asyncio.to_thread(self._start_engine, ckpt, npc_id))
            self._starting[key] = task
        t0 = time.time()
        try:
            engine, tok, started_with = await asyncio.shield(task)
        except Exception as e:
            raise ApiError(503, f"engine failed to start: {type(e).__name__}: {e}", code="engine_start_failed")
        finally:
            if task.done():
                self._starting.pop(key, None)
        if key not in self.slots:
            # the engine starts with this checkpoint's weights already loaded
            self.slots[key] = Slot(key=key, engine=engine, tokenizer=tok, npc_id=started_with, base=base)
            metrics.ENGINE_LOADS.labels(base=base).inc()
            metrics.EVICTIONS.labels(base=base)  # expose the series at 0
            metrics.LOAD_LATENCY.labels(base=base).observe(time.time() - t0)
            self._update_loaded()
        return self.slots[key]

    def prewarm(self, key: tuple, npc_id: str, ckpt: Path, base: str) -> None:
        """Start an engine for a new shape in the background, if there is room for one."""
        if key in self.slots or key in self._starting or key in self._prewarmed:
            return  # once per shape: an explicit unload is not undone behind the user's back
        if len(self.slots) + len(self._starting) >= self.settings.max_engines:
            return
        self._prewarmed.add(key)
        task = asyncio.ensure_future(self._slot_for(key, npc_id, Path(ckpt), base))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "never retrieved"

    async def shutdown(self) -> None:
        for slot in self.slots.values():
            try:
                slot.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")
        self.slots.clear()

    # -- serving --------------------------------------------------------------

    async def _swap(self, slot: Slot, ckpt: Path) -> None:
        t0 = time.time()
        eng = slot.engine
        await eng.pause_generation(mode="wait", clear_cache=True)
        try:
            await eng.collective_rpc("reload_weights", kwargs={"weights_path": str(ckpt)})
            await eng.reset_prefix_cache()
        finally:
            await eng.resume_generation()
        dt = time.time() - t0
        if slot.npc_id:  # the outgoing NPC leaves its slot
            metrics.EVICTIONS.labels(base=slot.base).inc()
        metrics.WEIGHT_SWAPS.labels(base=slot.base).inc()
        metrics.LOAD_LATENCY.labels(base=slot.base).observe(dt)
        log.info("swapped %s into engine in %.2fs", ckpt.name, dt)

    @asynccontextmanager
    async def serving(self, npc_id: str, ckpt: Path, key: tuple, base: str):
        """Yield (engine, tokenizer) with this NPC's weights; hold them until exit."""
        ckpt = Path(ckpt)
        slot = await self._slot_for(key, npc_id, ckpt, base)
        async with slot.cond:
            if slot.waiting >= self.settings.max_waiting:
                raise ApiError(429, "too many requests waiting for this engine; retry shortly",
                               type="rate_limit_exceeded", headers={"Retry-After": "2"})
            slot.waiting += 1
            slot.wanting[npc_id] = slot.wanting.get(npc_id, 0) + 1
            gauge = metrics.REQUESTS_WAITING.labels(npc=metrics.npc_label(npc_id))
            gauge.inc()
            try:
                while True:
                    others = any(n != npc_id and c for n, c in slot.wanting.items())
                    if slot.npc_id == npc_id and not others:
                        break
                    if slot.npc_id != npc_id and slot.inflight == 0:
                        await self._swap(slot, ckpt)
                        slot.npc_id = npc_id
                        break
                    # ours is loaded but another NPC waits: let the engine drain for it
                    if slot.inflight == 0:
                        slot.cond.notify_all()
                    await slot.cond.wait()
            finally:
                slot.waiting -= 1
                slot.wanting[npc_id] -= 1
                if not slot.wanting[npc_id]:
                    del slot.wanting[npc_id]
                gauge.dec()
                slot.cond.notify_all()
            slot.inflight += 1
        slot.last_used = time.time()
        try:
            yield slot.engine, slot.tokenizer
        finally:
            async with slot.cond:
                slot.inflight -= 1
                slot.last_used = time.time()
                slot.cond.notify_all()

    async def unload(self, npc_id: str) -> bool:
        """Stop the engine holding this NPC (frees its memory); False if none holds it."""
        for key, slot in list(self.slots.items()):
            if slot.npc_id == npc_id:
                async with slot.cond:
                    if slot.inflight or slot.waiting:
                        raise ApiError(409, f"NPC '{npc_id}' is serving requests; unload it when idle",
                                       code="npc_busy", headers={"Retry-After": "2"})
                    self.slots.pop(key, None)
                self._stop(slot)
                return True
        return False

    def describe(self) -> list[dict]:
        return [
            {"shape": {"base_sha256": k[0][:12], "intermediate_size": k[1]}, "npc": s.npc_id,
             "in_flight": s.inflight, "waiting": s.waiting, "last_used": s.last_used}
            for k, s in self.slots.items()
        ]
