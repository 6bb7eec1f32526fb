"""The engine budget: which engines run (NPC_MAX_ENGINES in all, NPC_ENGINE_SLOTS per shape), and
which strategy serves a request.

NPCs with a compact form go to a mixed engine of their base when NPC_MIXED_BATCHES is on
(mixed.py); every other NPC shares swap engines of its own shape (swap.py). Both kinds of
engine count against one budget, are started and stopped here, and are reported together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from service import metrics
from service.engines.hot import HotStrategy
from service.engines.launch import pick_core, start_engine
from service.engines.mixed import MaskSlot, MixedStrategy
from service.engines.residency import Residency
from service.engines.slot import NpcWeights, Slot
from service.engines.swap import SwapStrategy
from service.errors import ApiError

ENGINE_STOP_S = 2  # an engine holds nothing to save: its core process is killed after this

log = logging.getLogger(__name__)


class EnginePool:
    def __init__(self, settings):
        self.settings = settings
        self.slots: dict[tuple, list[Slot]] = {}
        self._starting: dict[tuple, asyncio.Task] = {}
        self._prewarmed: dict[tuple, int] = {}
        self._reaper: asyncio.Task | None = None
        self.residency = Residency(settings.keep_alive)
        self.swap = SwapStrategy(self)
        self.mixed = MixedStrategy(self)
        self.hot = HotStrategy(self)

    def strategy(self, slot: Slot) -> SwapStrategy | MixedStrategy:
        return self.mixed if isinstance(slot, MaskSlot) else self.swap

    def all_slots(self) -> list[Slot]:
        return [s for slots in self.slots.values() for s in slots]

    def n_engines(self) -> int:
        return len(self.all_slots()) + len(self._starting)

    # -- serving ----------------------------------------------------------------

    @asynccontextmanager
    async def serving(self, w: NpcWeights, keep_alive: float | None = None):
        """An async context yielding the engine that serves this NPC until exit: its own engine
        while it is hot, else a mixed engine of its base, else a swap engine of its shape."""
        with self.hot.track(w):
            hot = self.hot.slot_for(w)
            if hot is not None:
                lease = self.hot.serving(hot)
            elif self.mixed.applies(w):
                lease = self.mixed.serving(w, keep_alive)
            else:
                lease = self.swap.serving(w, keep_alive)
            async with lease as engine:
                yield engine

    def prewarm(self, w: NpcWeights) -> bool:
        """Start this shape's engines in the background, one at a time, while there is room; True
        once every slot of the shape has been started (nothing more to do for it)."""
        if self.mixed.applies(w):
            w = self.mixed.base_weights(w)
        key = w.key
        n = self._prewarmed.get(key, 0)
        if n >= self.settings.engine_slots:
            return True  # counted, not re-checked: an explicit unload is not undone behind the user's back
        if key in self._starting:
            return False
        if len(self.slots.get(key, [])) >= self.settings.engine_slots:
            # started by requests already: settled, so a later explicit unload is not undone either
            self._prewarmed[key] = self.settings.engine_slots
            return True
        if self.n_engines() >= self.settings.max_engines:
            return False
        self._prewarmed[key] = n + 1
        # only the first engine of a shape holds the NPC it started with; later ones start free
        task = asyncio.ensure_future(self.new_slot(w, hold=key not in self.slots))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return False

    async def unload(self, npc_id: str) -> bool:
        """Drop this NPC's mask from every mixed engine, else stop the swap engine holding it;
        False if nothing holds it."""
        self.residency.forget(npc_id)  # an explicit unload ends a pin
        found = await self.hot.unload(npc_id)
        for slot in self.all_slots():
            if isinstance(slot, MaskSlot):
                found = await self.mixed.unload(slot, npc_id) or found
        if found:
            return True
        for slot in self.all_slots():
            if not isinstance(slot, MaskSlot) and await self.swap.unload(slot, npc_id):
                return True
        return False

    def describe(self) -> list[dict]:
        return [self.strategy(s).describe(s) for s in self.all_slots()] + [
            self.hot.describe(s) for s in self.hot.slots()] + self.hot.describe_starting()

    # -- residency ----------------------------------------------------------------

    def slot_pinned(self, slot: Slot) -> bool:
        return self.strategy(slot).slot_pinned(slot)

    def start_reaper(self, every: float = 1.0) -> None:
        async def loop():
            while True:
                await asyncio.sleep(every)
                try:
                    now = time.time()
                    self.hot.sample()
                    for slot in self.all_slots():
                        await self.strategy(slot).expire_idle(slot, now)
                except Exception:
                    log.warning("keep_alive pass failed", exc_info=True)

        self._reaper = asyncio.ensure_future(loop())

    def update_loaded(self) -> None:
        metrics.NPCS_LOADED.set(len({n for s in self.all_slots() + self.hot.slots() for n in s.loaded()}))
        self.update_engines()

    def update_engines(self) -> None:
        slots = self.all_slots()
        metrics.ENGINES.labels(mode="mixed").set(sum(isinstance(s, MaskSlot) for s in slots))
        metrics.ENGINES.labels(mode="swap").set(sum(not isinstance(s, MaskSlot) for s in slots))
        metrics.ENGINES.labels(mode="hot").set(len(self.hot.hot))

    # -- engine lifecycle -----------------------------------------------------------

    def _evict_for(self, key: tuple) -> None:
        """Make room for one more engine: stop the least recently used idle, unpinned one."""
        if self.n_engines() < self.settings.max_engines:
            return
        idle = [s for s in self.all_slots() if s.idle() and not self.slot_pinned(s)]
        if not idle:
            raise ApiError(503, f"all {self.settings.max_engines} engines (NPC_MAX_ENGINES) are busy or pinned; "
                           "retry shortly", code="engines_busy", headers={"Retry-After": "5"})
        victim = min(idle, key=lambda s: s.last_used)
        log.info("evicting engine %s/%d (NPCs %s) for shape %s", victim.key, victim.index, victim.loaded(), key)
        self.remove(victim)
        self.stop(victim)

    def remove(self, slot: Slot) -> None:
        slots = self.slots.get(slot.key, [])
        if slot in slots:
            slots.remove(slot)
        if not slots:
            self.slots.pop(slot.key, None)

    def stop(self, slot: Slot) -> None:
        """Stop a slot's engine (already removed); a swap engine's NPC leaves with it."""
        if not isinstance(slot, MaskSlot) and slot.loaded():
            metrics.EVICTIONS.labels(base=slot.base).inc()
        try:
            slot.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
        self.update_loaded()

    async def new_slot(self, w: NpcWeights, hold: bool = True) -> Slot:
        """Start one more engine for this shape, with this NPC's weights; concurrent callers share it."""
        key = w.key
        strategy = self.mixed if w.mask else self.swap
        task = self._starting.get(key)
        if task is None:
            self._evict_for(key)
            core = pick_core(self.settings, [s.core for s in self.all_slots()])

            async def start():
                engine = await asyncio.to_thread(start_engine, self.settings, w.ckpt, w.mask, core,
                                                 compiled=bool(w.mask and self.settings.mixed_compile))
                try:
                    # a pruned export keeps the base's other weights: the first compact swap needs only the FFN
                    await engine.collective_rpc("npc_mark_started", args=(w.compact,))
                except Exception:
                    engine.shutdown()
                    raise
                slots = self.slots.setdefault(key, [])
                index = max([s.index for s in slots], default=-1) + 1
                slot = strategy.make_slot(key, index, engine, core, w, hold)
                slots.append(slot)
                metrics.ENGINE_LOADS.labels(base=w.base_label).inc()
                metrics.EVICTIONS.labels(base=w.base_label)  # expose the series at 0
                self.update_loaded()
                return slot

            task = asyncio.ensure_future(start())
            self._starting[key] = task
            task.add_done_callback(lambda t: self._starting.pop(key, None) if self._starting.get(key) is t else None)
        t0 = time.time()
        try:
            slot = await asyncio.shield(task)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(503, f"engine failed to start: {type(e).__name__}: {e}", code="engine_start_failed") from e
        metrics.LOAD_LATENCY.labels(base=w.base_label).observe(time.time() - t0)
        return slot

    def grow(self, w: NpcWeights) -> None:
        """Start another slot for this shape in the background, when the config allows one."""
        if (len(self.slots.get(w.key, [])) < self.settings.engine_slots and w.key not in self._starting
                and self.n_engines() < self.settings.max_engines):
            task = asyncio.ensure_future(self.new_slot(w, hold=False))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def drop_dead(self, key: tuple) -> None:
        for slot in list(self.slots.get(key, [])):
            if getattr(slot.engine, "errored", False):
                log.error("engine %s/%d died; it will be restarted", key, slot.index)
                self.remove(slot)
                slot.fail_waiters(ApiError(503, "the engine serving this NPC died; retry", code="engine_error",
                                           headers={"Retry-After": "1"}))
                try:
                    slot.engine.shutdown()
                except Exception:  # already dead
                    pass
                asyncio.ensure_future(self._wake(slot))

    @staticmethod
    async def _wake(slot: Slot) -> None:
        async with slot.cond:
            slot.cond.notify_all()

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        engines = self.hot.shutdown() + [slot.engine for slot in self.all_slots()]
        self.slots.clear()
        # all at once, each with a short grace: SIGTERM must end the server within 10 s
        await asyncio.gather(*(asyncio.to_thread(_stop_engine, e) for e in engines))


def _stop_engine(engine) -> None:
    try:
        engine.shutdown(timeout=ENGINE_STOP_S)
    except Exception:
        log.exception("engine shutdown failed")
