"""/v1/npcs/{id}/sessions: conversations the server keeps, with a rolling memory."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.api import deps
from service.api.npcs import owned
from service.errors import ApiError
from service.npcs.prompt import greeting
from service.protocol import SessionCreate, SessionMessage
from service.serving.fair import shared

router = APIRouter(prefix="/v1/npcs/{npc_id}/sessions", tags=["sessions"])


def _view(doc: dict, messages: list[dict] | None = None) -> dict:
    out = {k: doc.get(k) for k in ("id", "npc", "user", "greeting_index", "context_tokens", "created", "updated")}
    out.update(object="npc.session",
               memory={"summary": doc.get("summary"), "folded_messages": doc.get("folded", 0),
                       "folds": doc.get("folds", 0)})
    if messages is not None:
        out["messages"] = [{"role": m["role"], "content": m["content"], "created": m.get("created"),
                            "in_memory_only": i < doc.get("folded", 0)} for i, m in enumerate(messages)]
    return out


async def _session(npc_id: str, sid: str, who, store, sessions) -> dict:
    await owned(store, npc_id, who)
    doc = await sessions.get(sid)
    if doc is None or doc["npc"] != npc_id or not who.owns(doc):
        raise ApiError(404, f"NPC '{npc_id}' has no session '{sid}'", param="session_id", code="session_not_found")
    return doc


@router.post("", status_code=201)
async def create_session(npc_id: str, body: SessionCreate | None = None, who=Depends(deps.require_key),
                         store=Depends(deps.store), sessions=Depends(deps.sessions)) -> dict:
    """A new conversation with this NPC; it opens with the card's greeting (`greeting_index`)."""
    body = body or SessionCreate()
    rec = await owned(store, npc_id, who)
    user = body.user or "User"
    opening = greeting(rec, await store.card(rec), body.greeting_index, user)
    doc = await sessions.create(npc_id, who.tenant, user, body.greeting_index, body.context_tokens, opening)
    return _view(doc, await sessions.messages(doc["id"]))


@router.get("")
async def list_sessions(npc_id: str, who=Depends(deps.require_key), store=Depends(deps.store),
                        sessions=Depends(deps.sessions)) -> dict:
    await owned(store, npc_id, who)
    docs = [d for d in [await sessions.get(s) for s in await sessions.of_npc(npc_id)] if d and who.owns(d)]
    return {"object": "list", "data": [_view(d) for d in docs]}


@router.get("/{session_id}")
async def get_session(npc_id: str, session_id: str, who=Depends(deps.require_key), store=Depends(deps.store),
                      sessions=Depends(deps.sessions)) -> dict:
    """The session's messages (those folded into its memory are marked) and its memory."""
    doc = await _session(npc_id, session_id, who, store, sessions)
    return _view(doc, await sessions.messages(session_id))


@router.post("/{session_id}/messages")
async def send_message(npc_id: str, session_id: str, body: SessionMessage,
                       who=Depends(deps.require_key), store=Depends(deps.store), sessions=Depends(deps.sessions),
                       serving=Depends(deps.session_serving), streams=Depends(deps.streams)):
    """The player's message; the NPC's reply (streamed as chat.completion.chunk events with
    `stream`). Both are kept on the session."""
    doc = await _session(npc_id, session_id, who, store, sessions)
    if not body.stream:
        return JSONResponse(await shared(streams, who, False, lambda: serving.reply(doc, who, body)))
    events, release = await shared(streams, who, True, lambda: serving.stream(doc, who, body))
    return EventSourceResponse(events, background=BackgroundTask(release), ping=15)


@router.delete("/{session_id}")
async def delete_session(npc_id: str, session_id: str, who=Depends(deps.require_key), store=Depends(deps.store),
                         sessions=Depends(deps.sessions)) -> dict:
    await _session(npc_id, session_id, who, store, sessions)
    await sessions.delete(session_id, npc_id)
    return {"id": session_id, "object": "npc.session", "deleted": True}
