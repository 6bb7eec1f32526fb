"""NPC records in Redis: one JSON document per NPC and a creation-ordered index."""

from __future__ import annotations

import json
import secrets
import time

from redis.asyncio import Redis
from redis.exceptions import WatchError

REC = "npc:rec:{}"
CARD = "npc:card:{}"  # the character card an NPC was made from: read by its chats, not by listings
INDEX = "npc:index"
READY = "npc:ready"  # id -> when it became ready (the prewarm loop reads only the new ones)
COUNTS = "npc:status_counts"  # status -> number of records, kept with every write (a /metrics scrape reads it)
STATUSES = ("queued", "running", "ready", "failed", "cancelled")
PROMPT_SERVABLE = ("queued", "running")


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

    async def create(self, rec: dict, card: dict | None = None) -> dict:
        now = time.time()
        rec = {"created": now, "updated": now, "status": "queued", "progress": 0.0, "stage": "queued",
               "error": None, **rec, "has_card": card is not None}
        await self._ensure_counts()
        async with self.r.pipeline(transaction=True) as p:
            if card is not None:
                p.set(CARD.format(rec["id"]), json.dumps(card))
            p.set(REC.format(rec["id"]), json.dumps(rec))
            p.zadd(INDEX, {rec["id"]: now})
            p.hincrby(COUNTS, rec["status"], 1)
            if rec["status"] == "ready":
                p.zadd(READY, {rec["id"]: now})
            await p.execute()
        return rec

    async def get(self, npc_id: str) -> dict | None:
        raw = await self.r.get(REC.format(npc_id))
        return json.loads(raw) if raw else None

    async def update(self, npc_id: str, _expect: tuple[str, ...] | None = None, **fields) -> dict | None:
        """Merge fields into the record atomically (WATCH/MULTI).

        None if the record is gone, or (with `_expect`) its status is not one of those.
        """
        key = REC.format(npc_id)
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    raw = await p.get(key)
                    old = json.loads(raw) if raw is not None else None
                    if old is None or (_expect and old["status"] not in _expect):
                        await p.unwatch()
                        return None
                    rec = {**old, **fields, "updated": time.time()}
                    p.multi()
                    p.set(key, json.dumps(rec))
                    if rec["status"] != old["status"]:
                        p.hincrby(COUNTS, old["status"], -1)
                        p.hincrby(COUNTS, rec["status"], 1)
                        if rec["status"] == "ready":
                            p.zadd(READY, {npc_id: rec["updated"]})
                        elif old["status"] == "ready":
                            p.zrem(READY, npc_id)
                    await p.execute()
                    return rec
                except WatchError:  # someone wrote in between: read again
                    continue

    async def delete(self, npc_id: str) -> bool:
        key = REC.format(npc_id)
        async with self.r.pipeline(transaction=True) as p:
            while True:
                try:
                    await p.watch(key)
                    raw = await p.get(key)
                    p.multi()
                    p.delete(key, CARD.format(npc_id))
                    p.zrem(INDEX, npc_id)
                    p.zrem(READY, npc_id)
                    if raw is not None:
                        p.hincrby(COUNTS, json.loads(raw)["status"], -1)
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

    async def _records(self, ids) -> list[dict]:
        """The records of these ids that still exist, in order (MGET in batches)."""
        out = []
        for start in range(0, len(ids), 256):
            keys = [REC.format(i.decode() if isinstance(i, bytes) else i) for i in ids[start:start + 256]]
            out += [json.loads(raw) for raw in await self.r.mget(keys) if raw]
        return out

    async def list(self, limit: int = 1000) -> list[dict]:
        return await self._records(await self.r.zrange(INDEX, 0, limit - 1))

    async def page(self, after: str | None, limit: int, keep=lambda rec: True) -> tuple[list[dict], bool]:
        """Up to `limit` records that `keep` accepts, in creation order, after the NPC `after`; and
        whether more follow. KeyError: `after` is no NPC."""
        start = 0
        if after is not None:
            rank = await self.r.zrank(INDEX, after)
            if rank is None:
                raise KeyError(after)
            start = rank + 1
        out: list[dict] = []
        while len(out) <= limit:
            ids = await self.r.zrange(INDEX, start, start + 255)
            if not ids:
                break
            start += len(ids)
            for rec in await self._records(ids):
                if keep(rec):
                    out.append(rec)
                    if len(out) > limit:
                        break
        return out[:limit], len(out) > limit

    async def ready_since(self, t: float) -> list[dict]:
        """The records of NPCs that became ready at or after `t` (0: every ready NPC)."""
        recs = await self._records(await self.r.zrangebyscore(READY, t, "+inf"))
        return [rec for rec in recs if rec["status"] == "ready"]

    async def count_by_status(self) -> dict[str, int]:
        """Records per status: one HGETALL, whatever the number of records."""
        await self._ensure_counts()
        counts = dict.fromkeys(STATUSES, 0)
        for k, v in (await self.r.hgetall(COUNTS)).items():
            counts[k.decode() if isinstance(k, bytes) else k] = max(0, int(v))
        return counts

    async def _ensure_counts(self) -> None:
        """Records written before the counts (and the ready index) were kept: counted once, from the
        records themselves."""
        if await self.r.exists(COUNTS):
            return
        counts: dict[str, int] = {}
        ready: dict[str, float] = {}
        for rec in await self._records(await self.r.zrange(INDEX, 0, -1)):
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
            if rec["status"] == "ready":
                ready[rec["id"]] = rec.get("ready_at") or rec["updated"]
        # HSETNX per status: a concurrent first writer's increment is not overwritten
        async with self.r.pipeline(transaction=True) as p:
            for st in STATUSES:
                p.hsetnx(COUNTS, st, counts.get(st, 0))
            if ready:
                p.zadd(READY, ready, nx=True)
            await p.execute()
