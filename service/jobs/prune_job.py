"""Pruning jobs: plain importable coroutines that arq runs; the queue knows nothing of the work."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

from pruning import PruneCancelled, PruneError
from service import metrics
from service.npcs.checkpoints import from_settings
from service.npcs.persona import system_prompt_of
from service.npcs.records import NpcStore

log = logging.getLogger(__name__)
CANCEL_POLL_S = 1.0


async def _watch_cancel(store: NpcStore, npc_id: str, cancel: threading.Event) -> None:
    while not cancel.is_set():
        rec = await store.get(npc_id)
        if rec is None or rec["status"] == "cancelled":
            cancel.set()
            return
        await asyncio.sleep(CANCEL_POLL_S)


def _clean_partial(out: Path) -> None:
    """A killed attempt can leave its temp dir beside the output: remove it before retrying."""
    for p in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(p, ignore_errors=True)


def prune_device(setting: str) -> str:
    """The device a worker prunes on: NPC_WORKER_DEVICE, `auto` = the host's CUDA device if any."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


async def prune_npc(ctx: dict, npc_id: str) -> str:
    settings = ctx["settings"]
    store = NpcStore(ctx["redis"])
    rec = await store.get(npc_id)
    if rec is None or rec["status"] in ("ready", "cancelled", "failed"):
        return "skipped"
    tries = rec.get("attempts", 0)
    if tries >= settings.job_max_tries:  # each attempt's worker died or was stopped mid-job
        await store.update(npc_id, status="failed", stage="failed", eta_s=None,
                           error=f"gave up after {tries} attempts (NPC_JOB_MAX_TRIES): each one's worker "
                                 "stopped before the job ended")
        return "failed"
    loop = asyncio.get_running_loop()
    started = time.time()
    await store.update(npc_id, status="running", stage="loading", progress=0.0, started=started, eta_s=None,
                       attempts=rec.get("attempts", 0) + 1, worker=ctx.get("worker_id"))
    last = [0.0]
    stages: dict[str, float] = {}
    current = ["loading", started]
    cancel = threading.Event()

    def progress(frac: float, stage: str) -> None:
        if cancel.is_set():
            raise PruneCancelled(npc_id)
        now = time.time()
        if stage != current[0]:
            stages[current[0]] = round(now - current[1], 3)
            metrics.STAGE_DURATION.labels(stage=current[0]).observe(now - current[1])
            current[:] = [stage, now]
        if now - last[0] > 0.5 or frac >= 1.0:  # no need to write Redis for every prompt
            last[0] = now
            elapsed = now - started
            eta = round(elapsed / frac * (1 - frac), 1) if frac > 0.05 else None
            asyncio.run_coroutine_threadsafe(
                store.update(npc_id, progress=round(min(frac, 0.99), 3), stage=stage, eta_s=eta,
                             timings={**stages, current[0] + "_running": round(now - current[1], 3)}), loop)

    out = settings.npcs_dir / npc_id
    _clean_partial(out)
    watcher = asyncio.create_task(_watch_cancel(store, npc_id, cancel))
    try:
        from pruning.model_io import resolve_base
        from pruning.prune import prune

        base = resolve_base(rec["base"], settings.models)
        system = system_prompt_of(rec)
        evaluate = rec.get("evaluate", False)
        span = 0.85 if evaluate else 1.0

        async def work() -> dict:
            summary = await asyncio.to_thread(
                prune, base, rec["persona"], rec["sparsity"], rec["method"], out,
                seed=rec.get("seed", 0), n_calibration=settings.calibration_prompts,
                progress=lambda f, stage: progress(span * f, stage), options=rec.get("options") or {},
                system_prompt=system, cache_dir=settings.data / "cache", device=prune_device(settings.worker_device),
            )
            if evaluate:
                from pruning.eval.run import quick_eval

                summary["metrics"] = await asyncio.to_thread(
                    quick_eval, base, out, rec["persona"], system,
                    progress=lambda f: progress(span + (1 - span) * f * 0.99, "evaluating"))
            return summary

        try:
            summary = await asyncio.wait_for(work(), settings.job_timeout_s)
        except asyncio.TimeoutError:
            # the pruning thread stops at its next progress call (the cancel flag, set below)
            cancel.set()
            shutil.rmtree(out, ignore_errors=True)
            await store.update(npc_id, status="failed", stage="failed", eta_s=None,
                               error=f"timed out after {settings.job_timeout_s} s in stage {current[0]} "
                                     "(NPC_JOB_TIMEOUT_S)")
            return "failed"
    except PruneCancelled:
        shutil.rmtree(out, ignore_errors=True)
        await store.update(npc_id, stage="cancelled", eta_s=None)
        return "cancelled"
    except PruneError as e:
        await store.update(npc_id, status="failed", stage="failed", error=str(e), eta_s=None)
        return "failed"
    except Exception as e:
        log.exception("job for %s failed", npc_id)
        await store.update(npc_id, status="failed", stage="failed", error=f"{type(e).__name__}: {e}", eta_s=None)
        return "failed"
    finally:
        cancel.set()
        watcher.cancel()
    stages[current[0]] = round(time.time() - current[1], 3)
    ckpts = from_settings(settings)
    try:
        ref = await asyncio.to_thread(ckpts.publish, out, npc_id)
    except Exception as e:
        log.exception("publishing %s failed", npc_id)
        await store.update(npc_id, status="failed", stage="failed", error=f"checkpoint store: {e}", eta_s=None)
        return "failed"
    stages["total"] = round(time.time() - started, 3)
    done = await store.update(npc_id, _expect=("running",), status="ready", stage="ready", progress=1.0,
                              checkpoint=ref, eta_s=0, ready_at=time.time(), timings=stages,
                              kept_per_layer=summary["kept_per_layer"], metrics=summary.get("metrics"))
    if done is None:  # deleted or cancelled at the very end: leave nothing behind
        await asyncio.to_thread(ckpts.delete, ref)
        shutil.rmtree(out, ignore_errors=True)
        return "cancelled"
    return "ready"
