"""Scenes in Redis: several NPCs and the player in one setting, and the lines they have spoken."""

from __future__ import annotations

import json
import secrets
import time

from service.npcs.threads import ThreadStore


class SceneStore(ThreadStore):
    DOC, LINES, LOCK = "npc:scene:{}", "npc:scene:{}:lines", "npc:scene:{}:lock"

    async def create(self, npcs: list[str], setting: str, owner: str, user: str) -> dict:
        now = time.time()
        doc = {"id": "scene-" + secrets.token_hex(8), "npcs": npcs, "setting": setting, "owner": owner,
               "user": user, "created": now, "updated": now, "next": 0}
        await self.r.set(self.DOC.format(doc["id"]), json.dumps(doc))
        return doc

    async def lines(self, sid: str) -> list[dict]:
        return await self._lines(sid)

    async def add(self, sid: str, lines: list[dict], **fields) -> dict:
        return await self._add(sid, lines, **fields)

    async def delete(self, sid: str) -> None:
        await self.r.delete(self.DOC.format(sid), self.LINES.format(sid))
