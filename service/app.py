"""The FastAPI control plane: routers, error handlers, and the shared resources."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from arq import create_pool
from fastapi import FastAPI
from redis.asyncio import Redis

from service import errors, metrics, redis_embedded
from service.api import admin, health, npcs, openai, page, scenes, sessions
from service.engines.pool import EnginePool
from service.jobs.queue import SERIALIZERS, redis_retry, redis_settings
from service.npcs.checkpoints import from_settings as checkpoint_store
from service.npcs.records import NpcStore
from service.npcs.scenes import SceneStore
from service.npcs.sessions import SessionStore
from service.serving.chat import ChatServing
from service.serving.completions import CompletionServing
from service.serving.fair import TenantStreams
from service.serving.scene import SceneServing
from service.serving.session import SessionServing
from service.settings import Settings, get_settings

MAX_BODY_BYTES = 1 << 20
log = logging.getLogger(__name__)


def _import_engine_libs() -> None:
    """Import vLLM and transformers once, up front: their lazy modules are not safe to import from the
    engine-start thread and a request at the same time ("cannot import name 'AutoTokenizer'")."""
    from transformers import AutoTokenizer  # noqa: F401
    from vllm import AsyncEngineArgs, SamplingParams  # noqa: F401
    from vllm.sampling_params import RequestOutputKind  # noqa: F401
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401


async def _prewarm_loop(app: FastAPI, every: float = 2.0) -> None:
    """Start engines as soon as an NPC of a new shape is ready: its first chat need not wait ~30 s.
    Each pass takes the NPCs that became ready since the last one (every ready NPC on the first:
    pins are loaded again after a restart) and keeps those whose shape still waits for an engine
    (one starts at a time, or there is no room yet), so a pass costs nothing like the number of NPCs."""
    since, pending = 0.0, {}
    while True:
        await asyncio.sleep(every)
        try:
            now = time.time()
            for rec in await app.state.store.ready_since(since - 5 * every):  # a margin for clock skew
                pending[rec["id"]] = rec
            since = now
            for npc_id, rec in list(pending.items()):
                if await app.state.chat.prewarm(rec):
                    del pending[npc_id]
        except Exception:
            log.warning("prewarm pass failed", exc_info=True)


def body_limit(scope) -> int:
    """A card upload (multipart POST /v1/npcs) may carry a card file up to its own limit; every
    other body stays under MAX_BODY_BYTES."""
    ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
    if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/npcs" \
            and ctype.startswith(b"multipart/form-data"):
        return npcs.MAX_CARD_BYTES + (64 << 10)  # the card plus its form fields
    return MAX_BODY_BYTES


class LimitBody:
    """413 for a body over its limit, declared (Content-Length) or counted while it is read: a
    chunked body declares none. The body is read here (every route takes a small JSON or a card)
    and handed on whole. Plain ASGI, not @app.middleware("http"): that wrapper hides the client's
    disconnect from handlers, so generations could not be aborted."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = body_limit(scope)
        too_large = errors.error_response(413, f"request body over {limit} bytes")
        size = dict(scope.get("headers") or []).get(b"content-length", b"")
        if size.isdigit() and int(size) > limit:
            return await too_large(scope, receive, send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await too_large(scope, receive, send)
            if not msg.get("more_body"):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            # the body once, then the client's own messages (its disconnect aborts a generation)
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        embedded = None
        url = settings.redis_url
        if not url:
            embedded, url = redis_embedded.start(settings.data)
            log.info("embedded Redis at %s", url)
        app.state.redis = Redis.from_url(url, **redis_retry())
        app.state.store = NpcStore(app.state.redis)
        app.state.queue = await create_pool(redis_settings(url), **SERIALIZERS)
        await asyncio.to_thread(_import_engine_libs)
        app.state.engines = EnginePool(settings)
        app.state.ckpts = checkpoint_store(settings)
        app.state.chat = ChatServing(app.state.store, app.state.engines, settings, app.state.ckpts)
        app.state.completions = CompletionServing(app.state.store, app.state.engines, settings, app.state.ckpts)
        app.state.sessions = SessionStore(app.state.redis)
        app.state.session_serving = SessionServing(app.state.chat, app.state.sessions)
        app.state.scenes = SceneStore(app.state.redis)
        app.state.scene_serving = SceneServing(app.state.chat, app.state.scenes, app.state.store)
        app.state.engines.start_reaper()
        warm = asyncio.create_task(_prewarm_loop(app)) if settings.prewarm else None
        try:
            yield
        finally:
            if warm:
                warm.cancel()
            await app.state.engines.shutdown()
            await app.state.queue.aclose()
            await app.state.redis.aclose()
            if embedded:
                redis_embedded.stop(embedded)

    app = FastAPI(title="NPC server", version="0.1.0", lifespan=lifespan,
                  description="Persona-pruned NPC models behind an OpenAI-compatible API")
    app.state.settings = settings
    app.state.keys = settings.keys()
    app.state.streams = TenantStreams(settings.tenant_max_streams)
    metrics.set_max_npc_labels(settings.max_npc_labels)
    errors.install(app)

    app.add_middleware(LimitBody)

    app.include_router(health.router)
    app.include_router(npcs.router)
    app.include_router(sessions.router)
    app.include_router(scenes.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    page.mount(app)
    return app
