"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from service.api import deps
from service.errors import ApiError
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.serving.fair import shared

router = APIRouter(prefix="/v1", tags=["openai"])


async def _until_disconnect(request: Request, coro):
    """Run a non-streamed generation; a client that goes away cancels it (vLLM aborts the request)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client closed the request", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


SERVING_HEADER = "x-npc-serving"  # "prompt" (the dense base with the persona prompt) or "pruned"


async def _serve(request: Request, req, who, serving):
    meta: dict = {}
    streams = request.app.state.streams  # this key's share of the engines (429 past it)
    if not req.stream:
        body = await shared(streams, who, False, lambda: _until_disconnect(request, serving.complete(req, who, meta)))
        return JSONResponse(body, headers={SERVING_HEADER: meta["serving"]})
    events, release = await shared(streams, who, True, lambda: serving.stream(req, who, meta))
    # sse-starlette cancels `events` when the client disconnects: the generation is aborted with it
    return EventSourceResponse(events, background=BackgroundTask(release), ping=15,
                               headers={SERVING_HEADER: meta["serving"]})


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, who=Depends(deps.require_key),
                           chat=Depends(deps.chat)):
    return await _serve(request, req, who, chat)


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, who=Depends(deps.require_key),
                      serving=Depends(deps.completions)):
    """Raw text completion on the NPC's model: no persona, no chat template (see docs/serving.md)."""
    return await _serve(request, req, who, serving)


def _model(rec: dict) -> dict:
    return {"id": rec["id"], "object": "model", "created": int(rec["created"]), "owned_by": "npc"}


@router.get("/models")
async def list_models(who=Depends(deps.require_key), store=Depends(deps.store)) -> dict:
    recs, _ = await store.page(None, 1000, None if who.admin else who.tenant, keep=lambda r: r["status"] == "ready")
    return {"object": "list", "data": [_model(r) for r in recs]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, who=Depends(deps.require_key), store=Depends(deps.store)) -> dict:
    rec = await store.get(model_id)
    if rec is None or rec["status"] != "ready" or not who.owns(rec):
        raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model(rec)
