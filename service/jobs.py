"""Pruning jobs: plain importable coroutines that arq runs; the queue knows nothing of the work."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path

from pruning import PruneError
from service import metrics
from service.store import NpcStore

log = logging.getLogger(__name__)


async def prune_npc(ctx: dict, npc_id: str) -> str:
    from pruning.model_io import resolve_base
    from pruning.prune import prune

    settings = ctx["settings"]
    store = NpcStore(ctx["redis"])
    rec = await store.get(npc_id)
    if rec is None or rec["status"] in ("ready", "cancelled"):
        return "skipped"
    loop = asyncio.get_running_loop()
    started = time.time()
    await store.update(npc_id, status="running", stage="loading", progress=0.0, started=started,
                       attempts=rec.get("attempts", 0) + 1)
    last = [0.0]
    stages: dict[str, float] = {}
    current = ["loading", started]

    def progress(frac: float, stage: str) -> None:
        now = time.time()
        if stage != current[0]:
            stages[current[0]] = round(now - current[1], 3)
            metrics.STAGE_DURATION.labels(stage=current[0]).observe(now - current[1])
            current[:] = [stage, now]
        if now - last[0] > 0.5 or frac >= 1.0:  # no need to write Redis for every prompt
            last[0] = now
            asyncio.run_coroutine_threadsafe(
                store.update(npc_id, progress=round(min(frac, 0.99), 3), stage=stage), loop)

    out = settings.npcs_dir / npc_id
    try:
        base = resolve_base(rec["base"], settings.models)
        summary = await asyncio.to_thread(
            prune, base, rec["persona"], rec["sparsity"], rec["method"], out,
            seed=rec.get("seed", 0), n_calibration=settings.calibration_prompts, progress=progress,
        )
    except PruneError as e:
        await store.update(npc_id, status="failed", stage="failed", error=str(e))
        return "failed"
    except Exception as e:
        log.exception("job for %s failed", npc_id)
        await store.update(npc_id, status="failed", stage="failed", error=f"{type(e).__name__}: {e}")
        return "failed"
    stages["total"] = round(time.time() - started, 3)
    done = await store.update(npc_id, status="ready", stage="ready", progress=1.0, checkpoint=str(out),
                              ready_at=time.time(), timings=stages,
                              kept_per_layer=summary["kept_per_layer"])
    if done is None:  # deleted while we worked: leave nothing behind
        shutil.rmtree(Path(out), ignore_errors=True)
        return "deleted"
    return "ready"
