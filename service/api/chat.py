"""/v1/chat/completions (OpenAI-compatible) and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.api import deps
from service.errors import ApiError
from service.protocol import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, who=Depends(deps.require_key), chat=Depends(deps.chat)):
    if not req.stream:
        return await chat.complete(req, who)
    events, release = await chat.stream(req, who)
    return EventSourceResponse(events, background=BackgroundTask(release), ping=15)


def _model(rec: dict) -> dict:
    return {"id": rec["id"], "object": "model", "created": int(rec["created"]), "owned_by": "npc"}


@router.get("/models")
async def list_models(who=Depends(deps.require_key), store=Depends(deps.store)) -> dict:
    return {"object": "list",
            "data": [_model(r) for r in await store.list() if r["status"] == "ready" and who.owns(r)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, who=Depends(deps.require_key), store=Depends(deps.store)) -> dict:
    rec = await store.get(model_id)
    if rec is None or rec["status"] != "ready" or not who.owns(rec):
        raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model(rec)


@router.get("/engines", dependencies=[Depends(deps.require_admin)])
async def list_engines(engines=Depends(deps.engines)) -> dict:
    return {"object": "list", "data": engines.describe()}
