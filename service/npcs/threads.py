"""What sessions and scenes share in Redis: a JSON document, the list of its lines, both written in
one transaction, and a lock that lets one turn run at a time across API replicas."""

from __future__ import annotations

import json
import time

from redis.asyncio import Redis
from redis.exceptions import LockError


class ThreadStore:
    DOC = LINES = LOCK = ""  # key templates, "{}" for the id

    def __init__(self, redis: Redis):
        self.r = redis

    async def get(self, tid: str) -> dict | None:
        raw = await self.r.get(self.DOC.format(tid))
        return json.loads(raw) if raw else None

    async def _lines(self, tid: str) -> list[dict]:
        return [json.loads(x) for x in await self.r.lrange(self.LINES.format(tid), 0, -1)]

    async def _add(self, tid: str, lines, **fields) -> dict:
        """Append lines and update the document in one transaction."""
        doc = {**await self.get(tid), **fields, "updated": time.time()}
        async with self.r.pipeline(transaction=True) as p:
            if lines:
                p.rpush(self.LINES.format(tid), *(json.dumps({**x, "created": doc["updated"]}) for x in lines))
            p.set(self.DOC.format(tid), json.dumps(doc))
            await p.execute()
        return doc

    def lock(self, tid: str):
        """One turn at a time; a crashed holder's lock expires."""
        return self.r.lock(self.LOCK.format(tid), timeout=900, blocking_timeout=900)


async def release_lock(lock) -> None:
    try:
        await lock.release()
    except LockError:  # it expired: a turn outlived the lock's timeout
        pass
