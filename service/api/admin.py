"""Admin routes: /v1/engines (engine slots and the NPCs in them), /v1/workers (live pruning workers)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api import deps
from service.jobs.queue import live_workers

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(deps.require_admin)])


@router.get("/engines")
async def list_engines(engines=Depends(deps.engines)) -> dict:
    return {"object": "list", "data": engines.describe()}


@router.get("/workers")
async def workers(store=Depends(deps.store)) -> dict:
    return {"object": "list", "data": await live_workers(store.r)}
