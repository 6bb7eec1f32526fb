"""Scenes in Redis: several NPCs and the player in one setting, and the lines they have spoken."""

from __future__ import annotations

import json
import secrets
import time

from redis.asyncio import Redis

SCENE = "npc:scene:{}"
LINES = "npc:scene:{}:lines"
LOCK = "npc:scene:{}:lock"


class SceneStore:
    def __init__(self, redis: Redis):
        self.r = redis

    async def create(self, npcs: list[str], setting: str, owner: str, user: str) -> dict:
        now = time.time()
        doc = {"id": "scene-" + secrets.token_hex(8), "npcs": npcs, "setting": setting, "owner": owner,
               "user": user, "created": now, "updated": now, "next": 0}
        await self.r.set(SCENE.format(doc["id"]), json.dumps(doc))
        return doc

    async def get(self, sid: str) -> dict | None:
        raw = await self.r.get(SCENE.format(sid))
        return json.loads(raw) if raw else None

    async def lines(self, sid: str) -> list[dict]:
        return [json.loads(x) for x in await self.r.lrange(LINES.format(sid), 0, -1)]

    async def add(self, sid: str, lines: list[dict], **fields) -> dict:
        doc = {**await self.get(sid), **fields, "updated": time.time()}
        async with self.r.pipeline(transaction=True) as p:
            if lines:
                p.rpush(LINES.format(sid), *(json.dumps({**x, "created": doc["updated"]}) for x in lines))
            p.set(SCENE.format(sid), json.dumps(doc))
            await p.execute()
        return doc

    def lock(self, sid: str):
        return self.r.lock(LOCK.format(sid), timeout=900, blocking_timeout=900)

    async def delete(self, sid: str) -> None:
        await self.r.delete(SCENE.format(sid), LINES.format(sid))
