"""A scene's turns: NPCs speak in rounds; within a round every speaker answers the scene as it stood
when the round began, so their requests decode together (NPCs of one base in one mixed batch), and
the next round hears them all. Each NPC sees the others' lines as the scene's history, in its own
persona (its own prompt, card and lore)."""

from __future__ import annotations

import asyncio
import json
import re

from service.errors import ApiError
from service.protocol import ChatCompletionRequest
from service.npcs.threads import release_lock
from service.serving.chat import ChatServing

PLAYER = "player"


def plan(npcs: list[str], names: dict[str, str], start: int, n: int, first: str | None) -> list[list[str]]:
    """Who speaks in the next `n` turns, in rounds of distinct speakers: `first` (the addressed
    NPC) opens, then round-robin from `start`."""
    order = [npcs[(start + k) % len(npcs)] for k in range(len(npcs))]
    if first in order:
        order.remove(first)
        order.insert(0, first)
    turns = [order[k % len(order)] for k in range(n)]
    return [turns[k:k + len(npcs)] for k in range(0, len(turns), len(npcs))]


def addressed(text: str, names: dict[str, str]) -> str | None:
    """The NPC a player's line names first (by its name or first name), if any."""
    best = None
    for npc, name in names.items():
        for candidate in {name, name.split()[0]}:
            m = re.search(r"\b" + re.escape(candidate) + r"\b", text, re.IGNORECASE)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), npc)
    return best[1] if best else None


class SceneServing:
    def __init__(self, chat: ChatServing, scenes, store):
        self.chat, self.scenes, self.store = chat, scenes, store

    def request(self, doc: dict, npc: str, names: dict[str, str], lines: list[dict], body) -> ChatCompletionRequest:
        me = names[npc]
        others = ", ".join(n for k, n in names.items() if k != npc)
        user = doc.get("user") or "the player"
        setting = (f"This is a scene. Setting: {doc['setting']}\nPresent: {others} and {user}. "
                   f"Speak only as {me}: give {me}'s next line, short, and never write the others' lines.")
        msgs = [{"role": "system", "content": setting}]
        for line in lines:
            if line["speaker"] == npc:
                msgs.append({"role": "assistant", "content": line["content"]})
            else:
                who = user if line["speaker"] == PLAYER else names.get(line["speaker"], "someone")
                said = f"{who}: {line['content']}"
                if msgs[-1]["role"] == "user":  # consecutive lines of others are one turn
                    msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + "\n" + said}
                else:
                    msgs.append({"role": "user", "content": said})
        if msgs[-1]["role"] != "user":
            msgs.append({"role": "user", "content": f"(The scene goes on. What does {me} say?)"})
        return ChatCompletionRequest(model=npc, messages=msgs, max_tokens=body.max_tokens,
                                     temperature=body.temperature, seed=body.seed, stream=True,
                                     stream_options={"include_usage": True})

    async def names(self, doc: dict, who) -> dict[str, str]:
        out = {}
        for npc in doc["npcs"]:
            rec = await self.store.get(npc)
            if rec is None or not who.owns(rec):
                raise ApiError(409, f"NPC '{npc}' of this scene no longer exists", param="npcs",
                               code="npc_not_found")
            out[npc] = rec["name"]
        return out

    async def run(self, doc: dict, who, body):
        """The turn's events, {"event", "data"} dicts: `line` deltas, `line_done` per line, `done`."""
        lock = self.scenes.lock(doc["id"])
        await lock.acquire()
        try:
            doc = await self.scenes.get(doc["id"])
            names = await self.names(doc, who)
            lines = await self.scenes.lines(doc["id"])
            first, n = None, body.auto
            if body.speaker == PLAYER:
                line = {"speaker": PLAYER, "content": body.content}
                doc = await self.scenes.add(doc["id"], [line])
                lines.append(line)
                first = addressed(body.content, names)
                yield {"event": "line_done", "data": {"index": len(lines) - 1, **line, "name": doc.get("user")}}
            elif body.speaker is not None:
                if body.speaker not in names:
                    raise ApiError(400, f"`speaker` '{body.speaker}' is not in this scene: give one of its NPCs "
                                   "or 'player'", param="speaker")
                if body.content:  # a scripted line of an NPC: kept, not generated
                    line = {"speaker": body.speaker, "content": body.content}
                    doc = await self.scenes.add(doc["id"], [line])
                    lines.append(line)
                    yield {"event": "line_done", "data": {"index": len(lines) - 1, **line,
                                                          "name": names[body.speaker]}}
                else:
                    first, n = body.speaker, max(n, 1)
            start = doc.get("next", 0)
            for rnd in plan(doc["npcs"], names, start, n, first):
                said: dict[str, str] = {}
                async for ev in self._round(doc, rnd, names, lines, body, said):
                    yield ev
                new = [{"speaker": npc, "content": said.get(npc, "")} for npc in rnd]
                start = (doc["npcs"].index(rnd[-1]) + 1) % len(doc["npcs"])
                doc = await self.scenes.add(doc["id"], new, next=start)
                lines += new
            yield {"event": "done", "data": {"id": doc["id"], "lines": len(lines)}}
        finally:
            await release_lock(lock)

    async def _round(self, doc, rnd: list[str], names, lines, body, said: dict):
        """One round: every speaker's stream at once, their deltas as they come; fills `said`. Each
        stream takes its engine lease in its own task: where NPCs cannot share an engine (swap
        engines), they take turns instead of waiting on each other."""
        base = len(lines)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, npc: str):
            release = None
            try:
                events, release = await self.chat.stream(self.request(doc, npc, names, lines, body), None)
                async for data in events:
                    await queue.put((k, npc, data))
            except ApiError as e:
                await queue.put((k, npc, e))
            finally:
                if release is not None:
                    await release()
                await queue.put((k, npc, None))

        tasks = [asyncio.ensure_future(pump(k, npc)) for k, npc in enumerate(rnd)]
        live, parts, finish, used = len(tasks), {npc: [] for npc in rnd}, {}, {}
        try:
            while live:
                k, npc, data = await queue.get()
                if isinstance(data, ApiError):
                    raise data
                if data is None:
                    live -= 1
                    said[npc] = "".join(parts[npc]).strip()
                    yield {"event": "line_done", "data": {"index": base + k, "speaker": npc, "name": names[npc],
                                                          "content": said[npc], "finish_reason": finish.get(npc),
                                                          "completion_tokens": used.get(npc, 0)}}
                    continue
                if data == "[DONE]":
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    raise ApiError(503, obj["error"]["message"], code="engine_error")
                if obj.get("usage"):
                    used[npc] = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    finish[npc] = c.get("finish_reason") or finish.get(npc)
                    if piece:
                        parts[npc].append(piece)
                        yield {"event": "line", "data": {"index": base + k, "speaker": npc,
                                                         "name": names[npc], "delta": piece}}
        finally:
            for t in tasks:
                t.cancel()
