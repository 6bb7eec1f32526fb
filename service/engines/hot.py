"""Hot NPCs: an NPC that keeps many requests in flight gets an engine of its own.

A mixed engine pays for every NPC it batches: it runs the dense (or the core's) FFN for every
token, masks through vLLM's LoRA path, and vLLM-CPU runs LoRA only in eager mode. One NPC that
keeps several requests in flight is cheaper on a plain engine of its own pruned checkpoint: the
smaller GEMMs, no mask, optionally torch.compile. So the load of every NPC on a mixed engine is
sampled each second; an NPC whose mean in-flight requests over the last NPC_HOT_AFTER_S seconds
reach NPC_HOT_PROMOTE_AT is promoted (its engine starts in the background, the mixed engine
serving it meanwhile), and it returns to the mixed engine when its mean over NPC_HOT_IDLE_S drops
below NPC_HOT_DEMOTE_AT. Each request picks its engine once, at its start, so a switch never moves
a running request; a demoted engine stops when its last request ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service import metrics
from service.engines.launch import start_engine
from service.engines.slot import NpcWeights, Slot

if TYPE_CHECKING:
    from service.engines.pool import EnginePool

log = logging.getLogger(__name__)


@dataclass
class HotSlot(Slot):
    npc_id: str = ""
    ckpt: str = ""  # the checkpoint it runs: a request of the NPC on another one (prompt -> pruned) goes mixed
    since: float = field(default_factory=time.time)
    retiring: bool = False

    def loaded(self) -> list[str]:
        return [self.npc_id]

    def fail_waiters(self, err) -> None:
        pass  # requests run inside vLLM's scheduler: nothing waits here


class HotStrategy:
    def __init__(self, pool: "EnginePool"):
        self.pool = pool
        self.settings = pool.settings
        self.inflight: dict[str, int] = {}  # NPC -> its requests in flight, on any engine
        self.samples: dict[str, deque] = {}  # NPC -> in-flight counts, one per second
        self.hot: dict[str, HotSlot] = {}  # NPC -> its own engine, serving
        self.weights: dict[str, NpcWeights] = {}  # how to load each sampled NPC, its latest request's
        self._starting: dict[str, asyncio.Task] = {}
        self.retiring: list[HotSlot] = []  # demoted, finishing their last requests
        self._retired: set[asyncio.Task] = set()

    def applies(self, w: NpcWeights) -> bool:
        """Only NPCs a mixed engine would serve: a swap engine already runs one NPC's own weights."""
        return self.settings.hot_npcs > 0 and self.pool.mixed.applies(w)

    @contextmanager
    def track(self, w: NpcWeights):
        """Count this request in its NPC's load, whichever engine serves it."""
        label = metrics.npc_label(w.npc_id)
        if w.npc_id not in self.hot:
            metrics.HOT.labels(npc=label).set(0)  # every served NPC has the series
        if not self.applies(w):
            yield
            return
        self.inflight[w.npc_id] = self.inflight.get(w.npc_id, 0) + 1
        self.weights[w.npc_id] = w
        try:
            yield
        finally:
            self.inflight[w.npc_id] -= 1

    def slot_for(self, w: NpcWeights) -> HotSlot | None:
        slot = self.hot.get(w.npc_id)
        if slot is None:
            return None
        if getattr(slot.engine, "errored", False):
            log.error("hot engine of NPC %s died: back to the mixed engine", w.npc_id)
            self._retire(w.npc_id, "died")
            return None
        if slot.ckpt != str(w.ckpt):  # its pruned model took over from its prompt (or was recreated)
            self._retire(w.npc_id, "replaced")
            return None
        return slot

    @asynccontextmanager
    async def serving(self, slot: HotSlot):
        slot.inflight += 1
        slot.last_used = time.time()
        try:
            yield slot.engine
        finally:
            slot.inflight -= 1
            slot.last_used = time.time()

    # -- promotion and demotion -------------------------------------------------------

    def mean(self, npc: str, seconds: float) -> float | None:
        """Mean in-flight requests over the last `seconds`; None until that much has been sampled."""
        s = self.samples.get(npc)
        n = max(1, round(seconds))
        if s is None or len(s) < n:
            return None
        recent = list(s)[-n:]
        return sum(recent) / n

    def sample(self) -> None:
        """One sample per second of every NPC's load, then promote and demote by it."""
        st = self.settings
        keep = max(1, round(max(st.hot_after_s, st.hot_idle_s)))
        for npc in set(self.inflight) | set(self.samples):
            s = self.samples.setdefault(npc, deque(maxlen=keep))
            s.append(self.inflight.get(npc, 0))
            if not any(s) and npc not in self.hot and npc not in self._starting:
                del self.samples[npc]  # idle for the whole window: nothing to remember
                self.inflight.pop(npc, None)
                self.weights.pop(npc, None)
        for npc in list(self.hot):
            m = self.mean(npc, st.hot_idle_s)
            if m is not None and m < st.hot_demote_at:
                self._retire(npc, "idle")
        for npc in list(self.samples):
            if npc in self.hot or npc in self._starting:
                continue
            m = self.mean(npc, st.hot_after_s)
            if m is None or m < st.hot_promote_at:
                continue
            if len(self.hot) + len(self._starting) >= st.hot_npcs:
                break  # NPC_HOT_NPCS engines already: the hottest keep theirs
            w = self.weights.get(npc)
            if w is not None and self.applies(w):
                self._promote(w, m)

    def _promote(self, w: NpcWeights, load: float) -> None:
        log.info("NPC %s is hot (%.1f requests in flight over %.0fs): starting its own engine",
                 w.npc_id, load, self.settings.hot_after_s)

        async def start():
            cores = hot_cores(self.settings)
            engine = await asyncio.to_thread(start_engine, self.settings, w.ckpt, False, cores,
                                             compiled=self.settings.hot_compile)
            slot = HotSlot(key=w.key, index=0, engine=engine, core=cores, base=w.base_label,
                           npc_id=w.npc_id, ckpt=str(w.ckpt))
            still = self.mean(w.npc_id, self.settings.hot_idle_s)
            if still is not None and still < self.settings.hot_demote_at:
                log.info("NPC %s cooled down while its engine started: not promoted", w.npc_id)
                await self._stop(slot)
                return
            self.hot[w.npc_id] = slot
            metrics.HOT.labels(npc=metrics.npc_label(w.npc_id)).set(1)
            metrics.HOT_SWITCHES.labels(direction="promote").inc()
            metrics.ENGINE_LOADS.labels(base=w.base_label).inc()
            self.pool.update_loaded()
            log.info("NPC %s serves from its own engine", w.npc_id)

        task = asyncio.ensure_future(start())
        self._starting[w.npc_id] = task

        def done(t: asyncio.Task):
            self._starting.pop(w.npc_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.warning("hot engine for NPC %s did not start: %s", w.npc_id, t.exception())

        task.add_done_callback(done)

    def _retire(self, npc: str, why: str) -> None:
        """New requests go back to the mixed engine now; the engine stops after its last request."""
        slot = self.hot.pop(npc, None)
        if slot is None:
            return
        log.info("NPC %s back to the mixed engine (%s)", npc, why)
        slot.retiring = True
        metrics.HOT.labels(npc=metrics.npc_label(npc)).set(0)
        self.retiring.append(slot)
        metrics.HOT_SWITCHES.labels(direction="demote").inc()
        task = asyncio.ensure_future(self._stop(slot))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        self.pool.update_loaded()

    async def _stop(self, slot: HotSlot) -> None:
        while slot.inflight and not getattr(slot.engine, "errored", False):
            await asyncio.sleep(0.2)
        try:
            await asyncio.to_thread(slot.engine.shutdown)
        except Exception:
            log.exception("hot engine shutdown failed")
        if slot in self.retiring:
            self.retiring.remove(slot)
        self.pool.update_loaded()

    async def unload(self, npc: str) -> bool:
        if npc not in self.hot:
            return False
        self._retire(npc, "unloaded")
        return True

    def slots(self) -> list[HotSlot]:
        """Hot engines serving or finishing their last requests."""
        return list(self.hot.values()) + [s for s in self.retiring]

    def describe(self, s: HotSlot) -> dict:
        return {
            "shape": s.shape(), "slot": s.index, "mode": "hot", "core": s.core, "npc": s.npc_id,
            "in_flight": s.inflight, "waiting": 0, "waiting_npcs": [], "swapping_to": None, "swaps": 0,
            "last_swap": None, "last_used": s.last_used, "keep_alive": None, "pinned": False, "expires_at": None,
            "state": "retiring" if s.retiring else "serving", "hot_since": s.since,
            "load": self.mean(s.npc_id, self.settings.hot_after_s),
        }

    def describe_starting(self) -> list[dict]:
        """Engines of NPCs promoted a moment ago, still starting (their NPCs still served mixed)."""
        return [{"shape": None, "slot": 0, "mode": "hot", "core": hot_cores(self.settings), "npc": npc,
                 "in_flight": 0, "waiting": 0, "waiting_npcs": [], "swapping_to": None, "swaps": 0,
                 "last_swap": None, "last_used": None, "keep_alive": None, "pinned": False, "expires_at": None,
                 "state": "starting", "hot_since": None, "load": self.mean(npc, self.settings.hot_after_s)}
                for npc in self._starting]

    def shutdown(self) -> list:
        """Forget every hot engine and hand them to the pool, which stops all engines at once."""
        for task in list(self._starting.values()):
            task.cancel()
        engines = [slot.engine for slot in self.slots()]
        self.hot.clear()
        self.retiring.clear()
        return engines


def hot_cores(settings) -> str | None:
    """A hot engine computes on every core of this process: its NPC's load has left the mixed
    engines, each bound to one core."""
    if not settings.cpu_bind:
        return None
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))
