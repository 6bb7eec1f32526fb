"""Swap engines: one NPC at a time per engine, its weights swapped in place.

Every NPC pruned from one base at one sparsity has the same tensor shapes, so a running
engine takes another NPC's weights in place (~0.2 s from the compact form, see
vllm_ext/swap.py) instead of a new engine start (~20 s). A swap waits for the engine's
in-flight requests to drain (a swap under a running request would mix weights inside it)
and resets the prefix cache (it is keyed by tokens, not weights).

Scheduling is fair but batch-aware: while other NPCs wait, the loaded NPC admits no new
requests; once drained, the NPC of the oldest waiting request is swapped in and *all* its
waiting requests enter together, so they share decode batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service import metrics
from service.engines.slot import NpcWeights, Slot
from service.errors import ApiError

if TYPE_CHECKING:
    from service.engines.pool import EnginePool

log = logging.getLogger(__name__)


@dataclass
class Waiter:
    w: NpcWeights
    admitted: bool = False
    error: ApiError | None = None


@dataclass
class SwapSlot(Slot):
    npc_id: str | None = None
    queue: list[Waiter] = field(default_factory=list)
    swapping: str | None = None
    swaps: int = 0
    last_swap: dict | None = None

    @property
    def waiting(self) -> int:
        return sum(1 for q in self.queue if not q.admitted)

    def loaded(self) -> list[str]:
        return [self.npc_id] if self.npc_id else []

    def idle(self) -> bool:
        return self.inflight == 0 and not self.queue and self.swapping is None

    def fail_waiters(self, err: ApiError) -> None:
        for q in self.queue:
            q.error = err


class SwapStrategy:
    def __init__(self, pool: "EnginePool"):
        self.pool = pool
        self.residency = pool.residency

    def make_slot(self, key, index, engine, core, w: NpcWeights, hold: bool) -> SwapSlot:
        return SwapSlot(key=key, index=index, engine=engine, core=core, base=w.base_label,
                        npc_id=w.npc_id if hold else None)

    def slot_pinned(self, slot: SwapSlot) -> bool:
        return self.residency.pinned(slot.npc_id)

    def expires(self, slot: SwapSlot) -> float | None:
        ka = self.residency.of(slot.npc_id)
        if slot.npc_id is None or ka < 0 or not slot.idle():
            return None
        return slot.last_used + ka

    async def expire_idle(self, slot: SwapSlot, now: float) -> None:
        """The NPC leaves its slot after its keep_alive; the engine stays warm for the next NPC."""
        exp = self.expires(slot)
        if exp is not None and exp <= now:
            async with slot.cond:
                if slot.idle() and slot.npc_id and self.expires(slot) is not None:
                    log.info("NPC %s idle past its keep_alive: released from slot %s", slot.npc_id, slot.index)
                    metrics.EVICTIONS.labels(base=slot.base).inc()
                    slot.npc_id = None
                    self.pool.update_loaded()

    async def route(self, w: NpcWeights) -> SwapSlot:
        """The slot this request queues on."""
        pool = self.pool
        pool.drop_dead(w.key)
        slots = pool.slots.get(w.key, [])
        # where this NPC is, or is about to be: its requests batch together there
        for s in slots:
            if s.npc_id == w.npc_id or s.swapping == w.npc_id or any(q.w.npc_id == w.npc_id for q in s.queue):
                return s
        if not slots:
            return await pool.new_slot(w)
        takeable = [s for s in slots if not self.residency.pinned(s.npc_id)]
        free = [s for s in takeable if s.idle()]
        pool.grow(w)
        if free:  # an empty slot first, else the least recently used idle one
            return min(free, key=lambda s: (s.npc_id is not None, s.last_used))
        if takeable:  # every slot busy: queue where the fewest requests are ahead
            return min(takeable, key=lambda s: (s.inflight + s.waiting, s.last_used))
        if pool.n_engines() < pool.settings.max_engines:
            return await pool.new_slot(w)
        raise ApiError(503, "every engine slot for this NPC's shape holds a pinned NPC (keep_alive -1); "
                       "unload one or unpin it", code="slots_pinned", headers={"Retry-After": "5"})

    def _schedule(self, slot: SwapSlot) -> None:
        """Decide who runs next (caller holds slot.cond)."""
        if slot.swapping is not None:
            return
        pending = [q for q in slot.queue if not q.admitted]
        if not pending:
            return
        if all(q.w.npc_id == slot.npc_id for q in pending):
            self._admit(slot, slot.npc_id)
            return
        if slot.inflight or any(q.admitted for q in slot.queue):
            return  # drain (admitted ones count: they are about to run): nothing new for the loaded NPC
        nxt = pending[0].w  # the oldest waiter's NPC goes next: nobody starves
        if nxt.npc_id == slot.npc_id:
            self._admit(slot, nxt.npc_id)
            return
        if self.residency.pinned(slot.npc_id):
            for q in pending:
                if q.w.npc_id != slot.npc_id:
                    q.error = ApiError(503, f"engine slot holds pinned NPC '{slot.npc_id}'; retry",
                                       code="slots_pinned", headers={"Retry-After": "2"})
            slot.cond.notify_all()
            return
        slot.swapping = nxt.npc_id
        asyncio.ensure_future(self._swap(slot, nxt))

    @staticmethod
    def _admit(slot: SwapSlot, npc_id: str) -> None:
        for q in slot.queue:
            if q.w.npc_id == npc_id:
                q.admitted = True
        slot.cond.notify_all()

    async def _swap(self, slot: SwapSlot, w: NpcWeights) -> None:
        t0 = time.time()
        eng = slot.engine
        err = None
        try:
            await eng.pause_generation(mode="wait", clear_cache=True)
            try:
                if w.compact:
                    scales = None if w.scales is None else [list(x) for x in w.scales]
                    await eng.collective_rpc("npc_swap_compact", args=(w.base_dir, [list(k) for k in w.kept], scales))
                else:
                    await eng.collective_rpc("npc_swap_dir", args=(str(w.ckpt),))
                await eng.reset_prefix_cache()
            finally:
                await eng.resume_generation()
        except Exception as e:
            log.exception("swap of %s failed", w.npc_id)
            err = ApiError(503, f"loading NPC '{w.npc_id}' into an engine failed: {type(e).__name__}: {e}",
                           code="engine_error", headers={"Retry-After": "1"})
        dt = time.time() - t0
        async with slot.cond:
            slot.swapping = None
            if err is None:
                if slot.npc_id:  # the outgoing NPC leaves its slot
                    metrics.EVICTIONS.labels(base=slot.base).inc()
                slot.npc_id = w.npc_id
                slot.swaps += 1
                slot.last_swap = {"npc": w.npc_id, "seconds": round(dt, 3),
                                  "mode": "compact" if w.compact else "checkpoint"}
                metrics.WEIGHT_SWAPS.labels(base=slot.base).inc()
                metrics.LOAD_LATENCY.labels(base=slot.base).observe(dt)
                log.info("swapped %s into slot %d in %.2fs (%s)", w.npc_id, slot.index, dt,
                         "compact" if w.compact else "checkpoint dir")
                self._admit(slot, w.npc_id)
            else:
                slot.npc_id = None  # weights in an unknown state: the next NPC reloads
                for q in slot.queue:
                    if q.w.npc_id == w.npc_id and not q.admitted:
                        q.error = err
            self.pool.update_loaded()
            self._schedule(slot)
            slot.cond.notify_all()

    @asynccontextmanager
    async def serving(self, w: NpcWeights, keep_alive: float | None = None):
        self.residency.set(w.npc_id, keep_alive)
        slot = await self.route(w)
        me = Waiter(w)
        async with slot.cond:
            if slot.waiting >= self.pool.settings.max_waiting:
                raise ApiError(429, f"{slot.waiting} requests already wait for this engine slot "
                               f"(NPC_MAX_WAITING); retry shortly",
                               type="rate_limit_exceeded", headers={"Retry-After": "2"})
            slot.queue.append(me)
            gauge = metrics.REQUESTS_WAITING.labels(npc=metrics.npc_label(w.npc_id))
            gauge.inc()
            try:
                self._schedule(slot)
                while not me.admitted and me.error is None:
                    await slot.cond.wait()
                if me.error is not None:
                    raise me.error
                slot.inflight += 1
            finally:
                slot.queue.remove(me)
                gauge.dec()
                self._schedule(slot)  # a waiter that leaves may unblock others
        slot.last_used = time.time()
        try:
            yield slot.engine
        finally:
            async with slot.cond:
                slot.inflight -= 1
                slot.last_used = time.time()
                if slot.inflight == 0 and self.residency.of(w.npc_id) == 0 and slot.npc_id == w.npc_id \
                        and not slot.queue:
                    slot.npc_id = None  # keep_alive 0: leave the slot right after the request
                    self.pool.update_loaded()
                self._schedule(slot)
                slot.cond.notify_all()

    async def unload(self, slot: SwapSlot, npc_id: str) -> bool:
        """Stop the engine holding this NPC (frees its memory)."""
        if slot.npc_id != npc_id:
            return False
        async with slot.cond:
            if not slot.idle():
                raise ApiError(409, f"NPC '{npc_id}' is serving requests; unload it when idle",
                               code="npc_busy", headers={"Retry-After": "2"})
            self.pool.remove(slot)
        self.pool.stop(slot)
        return True

    def describe(self, s: SwapSlot) -> dict:
        return {
            "shape": s.shape(), "slot": s.index,
            "mode": "swap", "core": s.core, "npc": s.npc_id, "in_flight": s.inflight, "waiting": s.waiting,
            "waiting_npcs": sorted({q.w.npc_id for q in s.queue if not q.admitted}),
            "swapping_to": s.swapping, "swaps": s.swaps, "last_swap": s.last_swap, "last_used": s.last_used,
            "keep_alive": self.residency.of(s.npc_id) if s.npc_id else None,
            "pinned": self.residency.pinned(s.npc_id), "expires_at": self.expires(s),
        }
