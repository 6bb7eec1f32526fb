"""/v1/npcs: create (queue a pruning job), inspect, follow, list, cancel/delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from pruning import PruneError
from pruning.model_io import resolve_base
from pruning.options import DATA_METHODS, job_tokens
from service.api import deps
from service.basemodels import npc_base
from service.errors import ApiError, limit_error
from service.jobs.queue import enqueue_prune
from service.npcs.cards import card_png, card_to_npc, npc_to_card, parse_card
from service.npcs.persona import system_prompt
from service.npcs.records import Caps, LimitReached, new_id, serving_of
from service.protocol import NAME_PATTERN, ChatCompletionRequest, Npc, NpcCreate, NpcList, NpcLoad

router = APIRouter(prefix="/v1/npcs", tags=["npcs"])
TERMINAL = ("ready", "failed", "cancelled")
IDEMPOTENCY = "npc:idem:{}:{}"
IDEMPOTENCY_TTL = 24 * 3600
MAX_CARD_BYTES = 8 << 20


def public(rec: dict, instant: bool = True) -> Npc:
    fields = {k: v for k, v in rec.items() if k in Npc.model_fields}
    # the base's name, never a path on this server
    return Npc.model_validate({**fields, "base": Path(rec["base"]).name, "serving": serving_of(rec, instant)})


async def owned(store, npc_id: str, who: deps.Principal) -> dict:
    rec = await store.get(npc_id)
    if rec is None or not who.owns(rec):  # another tenant's NPC does not exist for you
        raise ApiError(404, f"no NPC with id '{npc_id}'", param="npc_id", code="npc_not_found")
    return rec


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9 _.'\-]", "", name).strip()[:64]
    return name if re.match(NAME_PATTERN, name) else "NPC"


def _is_json(ctype: str) -> bool:
    media = ctype.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_body(request: Request) -> tuple[NpcCreate, dict | None]:
    """JSON body, or multipart with the card file (PNG or JSON) plus form fields."""
    ctype = request.headers.get("content-type", "")
    card = None
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("card") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart upload needs a 'card' file (PNG or JSON character card)",
                           param="card")
        raw = await upload.read(MAX_CARD_BYTES + 1)
        if len(raw) > MAX_CARD_BYTES:
            raise ApiError(413, f"card file over {MAX_CARD_BYTES} bytes", param="card")
        card = parse_card(raw)
        fields["card"] = card
        body = fields
    elif not _is_json(ctype):
        raise ApiError(415, f"content-type {ctype.split(';')[0] or '(none)'} is not accepted: send "
                       "application/json, or multipart/form-data with a card file", code="unsupported_media_type")
    else:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        req = NpcCreate.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    if req.card is not None and card is None:
        card = parse_card(req.card)
    if (req.persona is None) == (card is None):
        raise ApiError(400, "give exactly one of `persona` or `card`", param="persona")
    if card is None and req.name is None:
        raise ApiError(400, "`name` is required with `persona`", param="name")
    return req, card


_CREATE_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": NpcCreate.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {"schema": {"type": "object", "required": ["card"], "properties": {
                "card": {"type": "string", "format": "binary", "description": "PNG or JSON character card"},
                "name": {"type": "string"}, "sparsity": {"type": "number"}, "method": {"type": "string"}}}},
        },
    },
    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}],
}


@router.post("", status_code=202, response_model=Npc, openapi_extra=_CREATE_DOC)
async def create_npc(request: Request, who=Depends(deps.require_key), settings=Depends(deps.settings),
                     store=Depends(deps.store), queue=Depends(deps.queue)) -> Npc:
    req, card = await _read_body(request)
    fields = {"name": req.name, "persona": req.persona}
    if card is not None:
        from_card = card_to_npc(card, settings.max_persona_chars)
        fields = {**from_card, "name": req.name or _safe_name(from_card["name"])}
    try:
        base = resolve_base(settings.base_model, settings.models)
    except PruneError as e:
        raise ApiError(503, str(e), code="base_model_missing") from None

    method = req.method or settings.default_method
    options = dict(req.options or {})
    if method in DATA_METHODS or options.get("recover"):
        options.setdefault("profile", settings.default_profile)
    if req.sparsity != 0 and (work := job_tokens(options)) > settings.max_job_tokens:
        raise ApiError(400, f"these options ask for about {work:,} tokens of pruning work, more than this server "
                       f"takes for one NPC (NPC_MAX_JOB_TOKENS={settings.max_job_tokens:,}); use fewer steps, a "
                       "smaller batch_size or max_length", param="options", code="job_too_large")
    evaluate = settings.evaluate if req.evaluate is None else req.evaluate
    idem_key = request.headers.get("idempotency-key")
    npc_id = new_id()
    if idem_key:
        if len(idem_key) > 255:
            raise ApiError(400, "Idempotency-Key longer than 255 characters", param="Idempotency-Key")
        digest = hashlib.sha256(json.dumps([fields, req.sparsity, method, options, req.seed], sort_keys=True,
                                           default=str).encode()).hexdigest()
        slot = IDEMPOTENCY.format(who.tenant, hashlib.sha256(idem_key.encode()).hexdigest())
        # SET NX: of concurrent requests with one key, exactly one creates the NPC
        won = await store.r.set(slot, json.dumps({"id": npc_id, "digest": digest}), nx=True, ex=IDEMPOTENCY_TTL)
        if not won:
            prior = json.loads(await store.r.get(slot) or "{}")
            if prior.get("digest") != digest:
                raise ApiError(409, "Idempotency-Key was already used with a different request",
                               param="Idempotency-Key", code="idempotency_key_reused")
            for _ in range(50):  # the winner may still be writing its record
                rec = await store.get(prior["id"])
                if rec is not None:
                    return public(rec, settings.instant_npcs)
                await asyncio.sleep(0.1)
            raise ApiError(409, "a request with this Idempotency-Key is still being processed",
                           param="Idempotency-Key", headers={"Retry-After": "1"})

    system = system_prompt(fields["name"], fields["persona"], fields.get("card_system_prompt"))
    base, prompt_only = npc_base(base, settings.models, settings.core_sparsity, req.sparsity, method, options)
    if not base.is_dir():
        raise ApiError(503, f"this server's core ({base.name}) is not built; start the server again, or run "
                       f"`npc models core --sparsity {settings.core_sparsity}`", code="base_model_missing",
                       headers={"Retry-After": "30"})
    rec = {"id": npc_id, **fields, "system_prompt": system, "sparsity": req.sparsity, "method": method,
           "options": options, "evaluate": evaluate, "seed": req.seed, "base": str(base), "owner": who.tenant,
           "keep_alive": req.keep_alive}
    if prompt_only:  # the base (dense, or the core at its own sparsity) with the persona prompt: nothing to prune
        rec = {**rec, "method": "prompt", "options": {}, "status": "ready", "stage": "ready", "progress": 1.0,
               "ready_at": time.time()}
    caps = Caps(None if who.admin else settings.tenant_max_npcs, None if who.admin else settings.tenant_max_jobs,
                settings.max_queued_jobs)
    try:
        if req.keep_alive == -1:  # a pin is claimed before the record exists: a refused one leaves nothing
            await store.pin(npc_id, who.tenant, None if who.admin else settings.tenant_max_pins, settings.max_pins)
        rec = await store.create(rec, card=card, caps=caps)
    except LimitReached as e:
        await store.unpin(npc_id)
        if idem_key:  # the same request may be retried after the wait and must then be made
            await store.r.delete(slot)
        raise limit_error(e) from None
    if rec["status"] == "queued":
        await enqueue_prune(queue, npc_id)
    return public(rec, settings.instant_npcs)


@router.get("", response_model=NpcList)
async def list_npcs(who=Depends(deps.require_key), store=Depends(deps.store), settings=Depends(deps.settings),
                    limit: int = Query(100, ge=1, le=1000, description="NPCs per page"),
                    after: str | None = Query(None, description="the last id of the previous page")) -> NpcList:
    """Your NPCs, oldest first, a page at a time (`has_more`, then `after=last_id`)."""
    try:
        recs, more = await store.page(after, limit, None if who.admin else who.tenant)
    except KeyError:
        raise ApiError(400, f"`after`: no NPC with id '{after}'", param="after") from None
    data = [public(r, settings.instant_npcs) for r in recs]
    return NpcList(data=data, has_more=more, first_id=data[0].id if data else None,
                   last_id=data[-1].id if data else None)


@router.get("/{npc_id}", response_model=Npc)
async def get_npc(npc_id: str, who=Depends(deps.require_key), store=Depends(deps.store),
                  settings=Depends(deps.settings)) -> Npc:
    return public(await owned(store, npc_id, who), settings.instant_npcs)


@router.get("/{npc_id}/events")
async def npc_events(npc_id: str, request: Request, who=Depends(deps.require_key), store=Depends(deps.store),
                     settings=Depends(deps.settings)):
    """Server-Sent Events: the NPC record each time it changes, until the job ends."""
    await owned(store, npc_id, who)

    async def events():
        last = None
        while True:
            rec = await store.get(npc_id)
            if rec is None:
                yield {"event": "deleted", "data": json.dumps({"id": npc_id})}
                return
            body = public(rec, settings.instant_npcs).model_dump_json()
            if body != last:
                last = body
                yield {"event": "npc", "data": body}
            if rec["status"] in TERMINAL:
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return EventSourceResponse(events(), ping=15)


@router.get("/{npc_id}/card", responses={200: {"content": {"image/png": {}}}})
async def export_card(npc_id: str, request: Request, who=Depends(deps.require_key), store=Depends(deps.store)):
    """The NPC as a Character Card V2: JSON, or a PNG card with `Accept: image/png`."""
    rec = await owned(store, npc_id, who)
    card = npc_to_card(rec, await store.card(rec))
    if "image/png" in request.headers.get("accept", ""):
        return Response(await asyncio.to_thread(card_png, card), media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{npc_id}.png"'})
    return card


@router.get("/{npc_id}/prompt")
async def preview_prompt(npc_id: str, who=Depends(deps.require_key), chat=Depends(deps.chat),
                         messages: str = Query("[]", description='the chat so far, a JSON array of '
                                               '{"role", "content"} (as in a chat completion)'),
                         greeting_index: int | None = Query(None, ge=0)) -> dict:
    """The prompt a chat completion with these messages would run: its text, its token count and the
    lorebook entries it brings in. Nothing is generated."""
    try:
        msgs = json.loads(messages)
        req = ChatCompletionRequest(model=npc_id, messages=msgs or [{"role": "user", "content": ""}],
                                    greeting_index=greeting_index)
    except json.JSONDecodeError:
        raise ApiError(400, "`messages` must be a JSON array of chat messages", param="messages") from None
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False)) from None
    if not msgs:
        req.messages = []
    return await chat.preview(req, who)


@router.post("/{npc_id}/load")
async def load_npc(npc_id: str, response: Response, body: NpcLoad | None = None, who=Depends(deps.require_key),
                   chat=Depends(deps.chat)) -> dict:
    """Preload: start or swap an engine to this NPC now; `keep_alive` sets its residency (-1: pin).
    Answers 202 with `loaded: false` when the load outlasts `wait_s`; it goes on, and asking again waits
    for the same load."""
    out = await chat.load(npc_id, who, body.keep_alive if body else None, body.wait_s if body else None)
    if not out["loaded"]:
        response.status_code = 202
    return out


@router.post("/{npc_id}/unload")
async def unload_npc(npc_id: str, who=Depends(deps.require_key), store=Depends(deps.store),
                     engines=Depends(deps.engines)) -> dict:
    """Stop the engine that holds this NPC, freeing its memory."""
    rec = await owned(store, npc_id, who)
    unloaded = await engines.unload(npc_id)
    if rec.get("keep_alive") is not None:  # an explicit unload ends a pin, also across restarts
        await store.update(npc_id, keep_alive=None)
        await store.unpin(npc_id)
    return {"id": npc_id, "object": "npc.unload", "unloaded": unloaded}


@router.delete("/{npc_id}")
async def delete_npc(npc_id: str, request: Request, who=Depends(deps.require_key), settings=Depends(deps.settings),
                     store=Depends(deps.store)) -> dict:
    """A queued or running job is cancelled (the record stays, status `cancelled`); else removed."""
    rec = await owned(store, npc_id, who)
    if rec["status"] in ("queued", "running"):
        stage = "cancelled" if rec["status"] == "queued" else "cancelling"  # a running job confirms
        cancelled = await store.update(npc_id, _expect=("queued", "running"), status="cancelled",
                                       stage=stage, eta_s=None)
        if cancelled is not None:
            return {"id": npc_id, "object": "npc", "deleted": False, "status": "cancelled"}
    await store.delete(npc_id)
    await request.app.state.sessions.delete_of_npc(npc_id)
    shutil.rmtree(Path(settings.npcs_dir) / npc_id, ignore_errors=True)
    if rec.get("checkpoint"):
        await asyncio.to_thread(request.app.state.ckpts.delete, rec["checkpoint"])
    return {"id": npc_id, "object": "npc", "deleted": True}
