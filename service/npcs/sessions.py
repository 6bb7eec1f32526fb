"""Conversations kept by the server, in Redis: one document per session (its NPC, owner, memory)
and one list of its messages. They outlive restarts, as NPC records do."""

from __future__ import annotations

import json
import secrets
import time

from redis.asyncio import Redis

SESSION = "npc:session:{}"
MESSAGES = "npc:session:{}:messages"
LOCK = "npc:session:{}:lock"
OF_NPC = "npc:sessions:{}"  # the sessions of an NPC, by creation time (removed with the NPC)


def new_session_id() -> str:
    return "sess-" + secrets.token_hex(8)


class SessionStore:
    def __init__(self, redis: Redis):
        self.r = redis

    async def create(self, npc_id: str, owner: str, user: str, greeting_index: int | None,
                     context_tokens: int | None, opening: str | None) -> dict:
        now = time.time()
        doc = {"id": new_session_id(), "npc": npc_id, "owner": owner, "user": user, "greeting_index": greeting_index,
               "context_tokens": context_tokens, "created": now, "updated": now, "summary": None, "folded": 0,
               "folds": 0}
        async with self.r.pipeline(transaction=True) as p:
            p.set(SESSION.format(doc["id"]), json.dumps(doc))
            if opening:
                p.rpush(MESSAGES.format(doc["id"]), json.dumps({"role": "assistant", "content": opening,
                                                                "created": now}))
            p.zadd(OF_NPC.format(npc_id), {doc["id"]: now})
            await p.execute()
        return doc

    async def get(self, sid: str) -> dict | None:
        raw = await self.r.get(SESSION.format(sid))
        return json.loads(raw) if raw else None

    async def messages(self, sid: str) -> list[dict]:
        return [json.loads(m) for m in await self.r.lrange(MESSAGES.format(sid), 0, -1)]

    async def append(self, sid: str, *msgs: dict, **fields) -> dict:
        """Add messages and update the document in one transaction."""
        doc = await self.get(sid)
        doc = {**doc, **fields, "updated": time.time()}
        async with self.r.pipeline(transaction=True) as p:
            if msgs:
                p.rpush(MESSAGES.format(sid), *(json.dumps({**m, "created": doc["updated"]}) for m in msgs))
            p.set(SESSION.format(sid), json.dumps(doc))
            await p.execute()
        return doc

    async def update(self, sid: str, **fields) -> dict:
        return await self.append(sid, **fields)

    def lock(self, sid: str):
        """One turn at a time per session, across API replicas; a crashed holder's lock expires."""
        return self.r.lock(LOCK.format(sid), timeout=900, blocking_timeout=900)

    async def of_npc(self, npc_id: str) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in await self.r.zrange(OF_NPC.format(npc_id), 0, -1)]

    async def delete(self, sid: str, npc_id: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(SESSION.format(sid), MESSAGES.format(sid))
            p.zrem(OF_NPC.format(npc_id), sid)
            await p.execute()

    async def delete_of_npc(self, npc_id: str) -> None:
        for sid in await self.of_npc(npc_id):
            await self.delete(sid, npc_id)
        await self.r.delete(OF_NPC.format(npc_id))
