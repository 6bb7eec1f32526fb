"""/v1/scenes: several NPCs and the player in one setting, speaking in turns."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.api import deps
from service.api.npcs import owned
from service.errors import ApiError
from service.protocol import SceneCreate, SceneTurn

router = APIRouter(prefix="/v1/scenes", tags=["scenes"])


def _view(doc: dict, lines: list[dict]) -> dict:
    return {"id": doc["id"], "object": "scene", "npcs": doc["npcs"], "setting": doc["setting"], "user": doc["user"],
            "created": doc["created"], "updated": doc["updated"],
            "lines": [{"speaker": x["speaker"], "content": x["content"]} for x in lines]}


async def _scene(sid: str, who, scenes) -> dict:
    doc = await scenes.get(sid)
    if doc is None or not who.owns(doc):
        raise ApiError(404, f"no scene with id '{sid}'", param="scene_id", code="scene_not_found")
    return doc


@router.post("", status_code=201)
async def create_scene(body: SceneCreate, who=Depends(deps.require_key), store=Depends(deps.store),
                       scenes=Depends(deps.scenes)) -> dict:
    for npc in body.npcs:
        rec = await owned(store, npc, who)
        if rec["status"] in ("failed", "cancelled"):
            raise ApiError(409, f"NPC '{npc}' cannot speak (status: {rec['status']})", param="npcs",
                           code="npc_not_ready")
    doc = await scenes.create(body.npcs, body.setting, who.tenant, body.user or "the player")
    return _view(doc, [])


@router.get("/{scene_id}")
async def get_scene(scene_id: str, who=Depends(deps.require_key), scenes=Depends(deps.scenes)) -> dict:
    doc = await _scene(scene_id, who, scenes)
    return _view(doc, await scenes.lines(scene_id))


@router.post("/{scene_id}/turns")
async def scene_turns(scene_id: str, body: SceneTurn, who=Depends(deps.require_key), scenes=Depends(deps.scenes),
                      serving=Depends(deps.scene_serving), streams=Depends(deps.streams)):
    """The next turns: a player's line and the replies, or N NPC turns. Streamed as SSE (`line`
    deltas, `line_done` per line, `done`), or with `stream: false` one JSON of the new lines."""
    doc = await _scene(scene_id, who, scenes)
    events = serving.run(doc, who, body)
    mine = streams.take(who)  # this key's share of the engines, held until the last line (429 past it)
    if not body.stream:
        try:
            done = [ev["data"] async for ev in events if ev["event"] == "line_done"]
        finally:
            mine()
        return {"id": scene_id, "object": "scene.turns", "lines": done}
    try:
        first = await anext(events)  # errors before the first line are HTTP statuses
    except BaseException:
        mine()
        raise

    async def release() -> None:
        mine()

    async def sse():
        ev = first
        try:
            while True:
                yield {"event": ev["event"], "data": json.dumps(ev["data"])}
                ev = await anext(events)
        except StopAsyncIteration:
            return
        except ApiError as e:
            yield {"event": "error", "data": json.dumps({"error": {"message": e.message, "code": e.code}})}

    return EventSourceResponse(sse(), background=BackgroundTask(release), ping=15)


@router.delete("/{scene_id}")
async def delete_scene(scene_id: str, who=Depends(deps.require_key), scenes=Depends(deps.scenes)) -> dict:
    await _scene(scene_id, who, scenes)
    await scenes.delete(scene_id)
    return {"id": scene_id, "object": "scene", "deleted": True}
