"""/healthz and /metrics (both open without an API key).

On a server with API keys, /metrics shows per-NPC series (an `npc` label) only to whom may see
those NPCs: an admin key sees all, a tenant's key its own NPCs, a scrape without a key the series
without NPC ids (jobs, queue, engines, the `_other` bucket)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric

from service import metrics
from service.api import deps
from service.jobs.queue import live_workers, queue_depth

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(store=Depends(deps.store)) -> dict:
    await store.r.ping()
    return {"status": "ok"}


async def scraper(request: Request) -> deps.Principal | None:
    """Who scrapes: the key's principal when one is sent (or the server has none); None without one."""
    if request.app.state.keys and not request.headers.get("authorization"):
        return None
    return await deps.require_key(request)


class _Visible:
    """The default registry with the samples of NPCs `keep(npc)` refuses left out."""

    def __init__(self, keep):
        self.keep = keep

    def collect(self):
        for fam in REGISTRY.collect():
            samples = [s for s in fam.samples if "npc" not in s.labels or self.keep(s.labels["npc"])]
            if fam.samples and not samples:
                continue
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = samples
            yield out


async def _owned(store, who: deps.Principal) -> set[str]:
    """The NPC ids among the metric labels that `who` owns."""
    return {rec["id"] for rec in await store.records(sorted(metrics.labelled_npcs())) if who.owns(rec)}


@router.get("/metrics")
async def prometheus_metrics(store=Depends(deps.store), who=Depends(scraper)) -> Response:
    for state, n in (await store.count_by_status()).items():
        metrics.JOBS.labels(state=state).set(n)
    metrics.QUEUE_DEPTH.set(await queue_depth(store.r))
    metrics.WORKERS_LIVE.set(len(await live_workers(store.r)))
    if who is not None and who.admin:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
    owned = await _owned(store, who) if who is not None else set()
    visible = _Visible(lambda npc: npc == metrics.OTHER or npc in owned)
    return Response(generate_latest(visible), media_type=CONTENT_TYPE_LATEST)
