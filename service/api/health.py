"""/healthz and /metrics (both open without an API key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.api import deps
from service.jobs.queue import live_workers, queue_depth

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(store=Depends(deps.store)) -> dict:
    await store.r.ping()
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus_metrics(store=Depends(deps.store)) -> Response:
    for state, n in (await store.count_by_status()).items():
        metrics.JOBS.labels(state=state).set(n)
    metrics.QUEUE_DEPTH.set(await queue_depth(store.r))
    metrics.WORKERS_LIVE.set(len(await live_workers(store.r)))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
