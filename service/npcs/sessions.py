"""Conversations kept by the server, in Redis: one document per session (its NPC, owner, memory)
and one list of its messages. They outlive restarts, as NPC records do."""

from __future__ import annotations

import json
import secrets
import time

from service.npcs.threads import ThreadStore

SESSION = "npc:session:{}"
MESSAGES = "npc:session:{}:messages"
LOCK = "npc:session:{}:lock"
OF_NPC = "npc:sessions:{}"  # the sessions of an NPC, by creation time (removed with the NPC)


def new_session_id() -> str:
    return "sess-" + secrets.token_hex(8)


class SessionStore(ThreadStore):
    DOC, LINES, LOCK = SESSION, MESSAGES, LOCK

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

    async def messages(self, sid: str) -> list[dict]:
        return await self._lines(sid)

    async def append(self, sid: str, *msgs: dict, **fields) -> dict:
        return await self._add(sid, msgs, **fields)

    async def update(self, sid: str, **fields) -> dict:
        return await self._add(sid, (), **fields)

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
