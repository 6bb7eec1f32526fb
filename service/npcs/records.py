"""NPC records in Redis: one JSON document per NPC and a creation-ordered index."""

from __future__ import annotations

import json
import secrets
import time

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import WatchError

REC = "npc:rec:{}"
CARD = "npc:card:{}"  # the character card an NPC was made from: read by its chats, not by listings
INDEX = "npc:index"
TENANT_INDEX = "npc:index:{}"  # the same, per owner: a tenant's pages do not walk other tenants' NPCs
READY = "npc:ready"  # id -> when it became ready (the prewarm loop reads only the new ones)
COUNTS = "npc:status_counts"  # status -> number of records, kept with every write (a /metrics scrape reads it)
TENANT_COUNTS = "npc:tenant_counts:{}"  # the same, per owner: what the per-tenant caps read
ACTIVE = "npc:active"  # id -> when it was queued: NPCs queued or running, what the job reconciler reads
COUNTED = "npc:counted_v4"  # set once the records were counted into all of the above
COUNTS_RECHECK_S = 10.0
PINS = "npc:pins"  # pinned NPC id -> owner: what the pin caps read
STATUSES = ("queued", "running", "ready", "failed", "cancelled")
PROMPT_SERVABLE = ("queued", "running")


@dataclass(frozen=True)
class Caps:
    """What one create may find before it is refused (None: no cap)."""
    npcs: int | None = None     # records of the tenant, any status
    jobs: int | None = None     # the tenant's NPCs queued or running
    queued: int | None = None   # NPCs queued, all tenants


class LimitReached(Exception):
    def __init__(self, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


def _owner(rec: dict) -> str:
    return rec.get("owner") or "public"


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _counts(raw: dict) -> dict[str, int]:
    return {_text(k): max(0, int(v)) for k, v in raw.items()}


def new_id() -> str:
    return "npc-" + secrets.token_hex(6)


def serving_of(rec: dict, instant: bool = True) -> str | None:
    """What answers this NPC's chats now: "pruned" (its own checkpoint), "prompt" (the dense base
    with its persona prompt: a prompt-only NPC, or an NPC whose prune is still running when
    instant NPCs are on), or None (nothing: failed or cancelled)."""
    if rec.get("status") == "ready":
        return "pruned" if rec.get("checkpoint") else "prompt"
    if instant and rec.get("status") in PROMPT_SERVABLE:
        return "prompt"
    return None


class NpcStore:
    def __init__(self, redis: Redis):
        self.r = redis
        self._counted_at = float("-inf")  # when the counts were last seen to exist

    async def create(self, rec: dict, card: dict | None = None, caps: Caps | None = None) -> dict:
        """Write a new record; with `caps`, atomically refused (LimitReached) when the counts it
        would join are full."""
        now = time.time()
        rec = {"created": now, "updated": now, "status": "queued", "progress": 0.0, "stage": "queued",
               "error": None, **rec, "has_card": card is not None}
        await self._ensure_counts()
        tenant_key = TENANT_COUNTS.format(_owner(rec))
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    if caps is not None:  # read and write in one transaction: concurrent creates cannot overshoot
                        await p.watch(tenant_key, COUNTS)
                        _check_caps(caps, _counts(await p.hgetall(tenant_key)), _counts(await p.hgetall(COUNTS)),
                                    rec["status"])
                        p.multi()
                    if card is not None:
                        p.set(CARD.format(rec["id"]), json.dumps(card))
                    p.set(REC.format(rec["id"]), json.dumps(rec))
                    p.zadd(INDEX, {rec["id"]: now})
                    p.zadd(TENANT_INDEX.format(_owner(rec)), {rec["id"]: now})
                    p.hincrby(COUNTS, rec["status"], 1)
                    p.hincrby(tenant_key, rec["status"], 1)
                    if rec["status"] == "ready":
                        p.zadd(READY, {rec["id"]: now})
                    elif rec["status"] in PROMPT_SERVABLE:
                        p.zadd(ACTIVE, {rec["id"]: now})
                    await p.execute()
                    return rec
                except WatchError:
                    continue
                except LimitReached:
                    await p.reset()
                    raise

    async def tenant_counts(self, owner: str) -> dict[str, int]:
        await self._ensure_counts()
        return {**dict.fromkeys(STATUSES, 0), **_counts(await self.r.hgetall(TENANT_COUNTS.format(owner)))}

    async def get(self, npc_id: str) -> dict | None:
        raw = await self.r.get(REC.format(npc_id))
        return json.loads(raw) if raw else None

    async def update(self, npc_id: str, _expect: tuple[str, ...] | None = None, _attempt: int | None = None,
                     **fields) -> dict | None:
        """Merge fields into the record atomically (WATCH/MULTI).

        None if the record is gone, or (with `_expect`) its status is not one of those, or (with
        `_attempt`, a job's fencing token) its `attempts` is not that: a later attempt owns the job.
        """
        key = REC.format(npc_id)
        await self._ensure_counts()
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    raw = await p.get(key)
                    old = json.loads(raw) if raw is not None else None
                    if (old is None or (_expect and old["status"] not in _expect)
                            or (_attempt is not None and old.get("attempts", 0) != _attempt)):
                        await p.unwatch()
                        return None
                    rec = {**old, **fields, "updated": time.time()}
                    p.multi()
                    p.set(key, json.dumps(rec))
                    if rec["status"] != old["status"]:
                        p.hincrby(COUNTS, old["status"], -1)
                        p.hincrby(COUNTS, rec["status"], 1)
                        p.hincrby(TENANT_COUNTS.format(_owner(old)), old["status"], -1)
                        p.hincrby(TENANT_COUNTS.format(_owner(old)), rec["status"], 1)
                        if rec["status"] == "ready":
                            p.zadd(READY, {npc_id: rec["updated"]})
                        elif old["status"] == "ready":
                            p.zrem(READY, npc_id)
                        if rec["status"] in PROMPT_SERVABLE:
                            p.zadd(ACTIVE, {npc_id: rec["updated"]}, nx=True)
                        else:
                            p.zrem(ACTIVE, npc_id)
                    await p.execute()
                    return rec
                except WatchError:  # someone wrote in between: read again
                    continue

    async def delete(self, npc_id: str) -> bool:
        key = REC.format(npc_id)
        await self._ensure_counts()
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    raw = await p.get(key)
                    p.multi()
                    p.delete(key, CARD.format(npc_id))
                    p.zrem(INDEX, npc_id)
                    p.zrem(READY, npc_id)
                    p.zrem(ACTIVE, npc_id)
                    p.hdel(PINS, npc_id)
                    if raw is not None:
                        old = json.loads(raw)
                        p.zrem(TENANT_INDEX.format(_owner(old)), npc_id)
                        p.hincrby(COUNTS, old["status"], -1)
                        p.hincrby(TENANT_COUNTS.format(_owner(old)), old["status"], -1)
                    n, *_ = await p.execute()
                    return bool(n)
                except WatchError:
                    continue

    async def card(self, rec: dict) -> dict | None:
        """The card this NPC was made from (its V2/V3 `data` fields), if it was."""
        if not rec.get("has_card"):
            return None
        raw = await self.r.get(CARD.format(rec["id"]))
        return json.loads(raw) if raw else None

    async def records(self, ids) -> list[dict]:
        """The records of these ids that still exist, in order (MGET in batches)."""
        out = []
        for start in range(0, len(ids), 256):
            keys = [REC.format(i.decode() if isinstance(i, bytes) else i) for i in ids[start:start + 256]]
            out += [json.loads(raw) for raw in await self.r.mget(keys) if raw]
        return out

    async def page(self, after: str | None, limit: int, owner: str | None = None,
                   keep=lambda rec: True) -> tuple[list[dict], bool]:
        """Up to `limit` records (of `owner`; None: everyone's) that `keep` accepts, in creation order,
        after the NPC `after`; and whether more follow. KeyError: `after` is no NPC of theirs."""
        await self._ensure_counts()
        index = INDEX if owner is None else TENANT_INDEX.format(owner)
        start = 0
        if after is not None:
            rank = await self.r.zrank(index, after)
            if rank is None:
                raise KeyError(after)
            start = rank + 1
        out: list[dict] = []
        while len(out) <= limit:
            ids = await self.r.zrange(index, start, start + 255)
            if not ids:
                break
            start += len(ids)
            for rec in await self.records(ids):
                if keep(rec):
                    out.append(rec)
                    if len(out) > limit:
                        break
        return out[:limit], len(out) > limit

    async def ready_since(self, t: float) -> list[dict]:
        """The records of NPCs that became ready at or after `t` (0: every ready NPC)."""
        recs = await self.records(await self.r.zrangebyscore(READY, t, "+inf"))
        return [rec for rec in recs if rec["status"] == "ready"]

    async def active_before(self, t: float, limit: int = 1000) -> list[str]:
        """Ids of NPCs queued or running since before `t` (oldest first)."""
        await self._ensure_counts()
        return [_text(x) for x in await self.r.zrangebyscore(ACTIVE, "-inf", t, start=0, num=limit)]

    async def count_by_status(self) -> dict[str, int]:
        """Records per status: one HGETALL, whatever the number of records."""
        await self._ensure_counts()
        return {**dict.fromkeys(STATUSES, 0), **_counts(await self.r.hgetall(COUNTS))}

    async def _ensure_counts(self) -> None:
        """Records written before the counts (the ready index, the pins) were kept: counted once,
        from the records themselves. Checked again at most every COUNTS_RECHECK_S per store: one
        round trip fewer on every write."""
        if time.monotonic() - self._counted_at < COUNTS_RECHECK_S:
            return
        if await self.r.exists(COUNTS, COUNTED) == 2:
            self._counted_at = time.monotonic()
            return
        fresh = not await self.r.exists(COUNTS)
        counts: dict[str, int] = {}
        tenants: dict[str, dict[str, int]] = {}
        owned: dict[str, dict[str, float]] = {}
        ready: dict[str, float] = {}
        active: dict[str, float] = {}
        pins: dict[str, str] = {}
        for rec in await self.records(await self.r.zrange(INDEX, 0, -1)):
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            t = tenants.setdefault(_owner(rec), {})
            t[rec["status"]] = t.get(rec["status"], 0) + 1
            owned.setdefault(_owner(rec), {})[rec["id"]] = rec["created"]
            if rec["status"] == "ready":
                ready[rec["id"]] = rec.get("ready_at") or rec["updated"]
            elif rec["status"] in PROMPT_SERVABLE:
                active[rec["id"]] = rec["updated"]
            if rec.get("keep_alive") == -1:
                pins[rec["id"]] = _owner(rec)
        # HSETNX: a concurrent first writer's increment is not overwritten
        async with self.r.pipeline(transaction=True) as p:
            if fresh:
                for st in STATUSES:
                    p.hsetnx(COUNTS, st, counts.get(st, 0))
            for owner, n in tenants.items():
                for st, k in n.items():
                    p.hsetnx(TENANT_COUNTS.format(owner), st, k)
            if ready:
                p.zadd(READY, ready, nx=True)
            if active:
                p.zadd(ACTIVE, active, nx=True)
            for owner, ids in owned.items():
                p.zadd(TENANT_INDEX.format(owner), ids, nx=True)
            for npc_id, owner in pins.items():
                p.hsetnx(PINS, npc_id, owner)
            p.set(COUNTED, "1")
            await p.execute()
        self._counted_at = time.monotonic()

    # -- pins -----------------------------------------------------------------------

    async def pin(self, npc_id: str, owner: str, per_tenant: int | None, total: int) -> None:
        """Count this NPC as pinned; LimitReached when its tenant (or the server) has no pin left."""
        await self._ensure_counts()
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(PINS)
                    pins = {_text(k): _text(v) for k, v in (await p.hgetall(PINS)).items()}
                    if npc_id in pins:
                        await p.reset()
                        return
                    mine = sum(1 for o in pins.values() if o == owner)
                    if per_tenant is not None and mine >= per_tenant:
                        raise LimitReached(f"this key already pins {mine} NPCs (NPC_TENANT_MAX_PINS={per_tenant}); "
                                           "unpin one (keep_alive in seconds) or unload it", "pin_limit")
                    if len(pins) >= total:
                        raise LimitReached(f"the server already holds {len(pins)} pinned NPCs, the most its engines "
                                           "can pin and still serve others; retry later", "pins_full", 30)
                    p.multi()
                    p.hset(PINS, npc_id, owner)
                    await p.execute()
                    return
                except WatchError:
                    continue
                except LimitReached:
                    await p.reset()
                    raise

    async def unpin(self, npc_id: str) -> None:
        await self.r.hdel(PINS, npc_id)


def _check_caps(caps: Caps, mine: dict[str, int], everyone: dict[str, int], status: str) -> None:
    if caps.npcs is not None and sum(mine.values()) >= caps.npcs:
        raise LimitReached(f"this key already has {sum(mine.values())} NPCs (NPC_TENANT_MAX_NPCS={caps.npcs}); "
                           "delete some first", "npc_limit")
    if status not in PROMPT_SERVABLE:  # ready at once: no job
        return
    busy = mine.get("queued", 0) + mine.get("running", 0)
    if caps.jobs is not None and busy >= caps.jobs:
        raise LimitReached(f"this key already has {busy} NPCs being pruned (NPC_TENANT_MAX_JOBS={caps.jobs}); "
                           "retry when one is ready", "job_limit", 30)
    if caps.queued is not None and everyone.get("queued", 0) >= caps.queued:
        raise LimitReached(f"the pruning queue is full ({everyone.get('queued', 0)} NPCs wait, NPC_MAX_QUEUED_JOBS="
                           f"{caps.queued}); retry later", "queue_full", 60)
