"""/v1/npcs: create (queue a pruning job), inspect, list, delete."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter, Depends

from pruning import PruneError
from pruning.model_io import resolve_base
from service.api import deps
from service.errors import ApiError
from service.protocol import Npc, NpcCreate, NpcList
from service.store import new_id
from service.worker import QUEUE

router = APIRouter(prefix="/v1/npcs", tags=["npcs"], dependencies=[Depends(deps.require_key)])


def _public(rec: dict) -> Npc:
    return Npc.model_validate({k: v for k, v in rec.items() if k in Npc.model_fields})


@router.post("", status_code=202, response_model=Npc)
async def create_npc(body: NpcCreate, settings=Depends(deps.settings), store=Depends(deps.store),
                     queue=Depends(deps.queue)) -> Npc:
    try:
        base = resolve_base(settings.base_model, settings.models)
    except PruneError as e:
        raise ApiError(503, str(e), code="base_model_missing")
    npc_id = new_id()
    rec = await store.create({"id": npc_id, "name": body.name, "persona": body.persona,
                              "sparsity": body.sparsity, "method": body.method, "seed": body.seed,
                              "base": str(base)})
    job = await queue.enqueue_job("prune_npc", npc_id, _job_id=f"prune:{npc_id}", _queue_name=QUEUE)
    if job is None:  # arq refuses a duplicate job id: the job already exists
        pass
    return _public(rec)


@router.get("", response_model=NpcList)
async def list_npcs(store=Depends(deps.store)) -> NpcList:
    return NpcList(data=[_public(r) for r in await store.list()])


@router.get("/{npc_id}", response_model=Npc)
async def get_npc(npc_id: str, store=Depends(deps.store)) -> Npc:
    rec = await store.get(npc_id)
    if rec is None:
        raise ApiError(404, f"no NPC with id '{npc_id}'", param="npc_id", code="npc_not_found")
    return _public(rec)


@router.delete("/{npc_id}")
async def delete_npc(npc_id: str, settings=Depends(deps.settings), store=Depends(deps.store)) -> dict:
    rec = await store.get(npc_id)
    if rec is None:
        raise ApiError(404, f"no NPC with id '{npc_id}'", param="npc_id", code="npc_not_found")
    await store.delete(npc_id)
    # a running job sees the record gone when it finishes and removes its own output
    shutil.rmtree(Path(settings.npcs_dir) / npc_id, ignore_errors=True)
    return {"id": npc_id, "object": "npc", "deleted": True}
