"""Pruning jobs: plain importable coroutines that arq runs; the queue knows nothing of the work."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

from arq.worker import Retry

from pruning import PruneCancelled, PruneError
from pruning.options import MAX_EXTRA_INSTRUCTIONS
from service import metrics
from service.npcs.checkpoints import from_settings
from service.npcs.prompt import pruning_inputs
from service.npcs.records import NpcStore

log = logging.getLogger(__name__)
CANCEL_POLL_S = 1.0


async def _watch(store: NpcStore, npc_id: str, attempt: int, cancel: threading.Event, fenced: list) -> None:
    """Stop the attempt when the NPC is cancelled or deleted, or when a later attempt owns the job
    (this worker stalled past its heartbeat and the job was handed over)."""
    while not cancel.is_set():
        rec = await store.get(npc_id)
        if rec is not None and rec.get("attempts", 0) != attempt:
            fenced.append(rec.get("attempts", 0))
        if rec is None or rec["status"] == "cancelled" or fenced:
            cancel.set()
            return
        await asyncio.sleep(CANCEL_POLL_S)


# faults of the host or its disk, not of the job: another attempt (on any worker) can finish it
HOST_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def host_fault(e: BaseException) -> str | None:
    """What went wrong, when `e` is a fault of this host rather than of the job; else None."""
    if isinstance(e, OSError) and e.errno in HOST_ERRNOS:
        return e.strerror or str(e)
    m = re.search(r"os error (\d+)", str(e))  # safetensors' writer wraps the OS error in its own type
    if m and int(m.group(1)) in HOST_ERRNOS:
        return os.strerror(int(m.group(1)))
    return None


async def _again(store: NpcStore, npc_id: str, attempt: int, why: str, settings, worker: str | None) -> str:
    """Give the job back to the queue: the NPC waits for its next attempt instead of failing."""
    if await store.update(npc_id, _attempt=attempt, status="queued", stage="queued", progress=0.0, eta_s=None,
                          error=f"attempt {attempt} (worker {worker}): {why}; queued again") is None:
        return "superseded"  # a later attempt owns the job (or the NPC is gone): it is not ours to queue
    log.warning("job for %s, attempt %d: %s; queued again in %.0f s", npc_id, attempt, why, settings.job_retry_s)
    raise Retry(defer=settings.job_retry_s)


def _hold(settings, stage: str) -> float:
    """Seconds to wait on entering `stage` (NPC_FAULT_HOLD, the fault tests' window for a kill)."""
    name, _, secs = (settings.fault_hold or "").partition(":")
    return float(secs) if name == stage else 0.0


def _attempt_dir(npcs_dir: Path, npc_id: str, attempt: int) -> Path:
    """Where one attempt builds its checkpoint: its own, so a stale attempt cannot touch another's."""
    return npcs_dir / f".{npc_id}.a{attempt}"


def _clean_partial(npcs_dir: Path, npc_id: str) -> None:
    """Earlier attempts' dirs and temp dirs (a killed attempt leaves them) go before a new one."""
    for p in npcs_dir.glob(f"*{npc_id}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _commit_local(work: Path, final: Path) -> None:
    """The attempt's checkpoint becomes the NPC's local one (replacing what a stale attempt left)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


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
    if tries >= settings.job_max_tries:  # each attempt's worker died, was stopped, or hit a host fault
        last = f"; the last: {rec['error']}" if rec.get("error") else ": each one's worker stopped before the job ended"
        await store.update(npc_id, status="failed", stage="failed", eta_s=None,
                           error=f"gave up after {tries} attempts (NPC_JOB_MAX_TRIES){last}")
        return "failed"
    loop = asyncio.get_running_loop()
    started = time.time()
    # the attempt number is this run's fencing token: every write below is refused once a later
    # attempt has claimed the job
    mine = tries + 1
    if await store.update(npc_id, _attempt=tries, status="running", stage="loading", progress=0.0, started=started,
                          eta_s=None, attempts=mine, worker=ctx.get("worker_id")) is None:
        return "skipped"  # another attempt claimed it first, or it was deleted
    last = [0.0]
    stages: dict[str, float] = {}
    current = ["loading", started]
    held: set[str] = set()
    cancel = threading.Event()

    def progress(frac: float, stage: str) -> None:
        if cancel.is_set():
            raise PruneCancelled(npc_id)
        now = time.time()
        if stage != current[0]:
            stages[current[0]] = round(now - current[1], 3)
            metrics.STAGE_DURATION.labels(stage=current[0]).observe(now - current[1])
            current[:] = [stage, now]
        hold = _hold(settings, stage)
        if hold and stage not in held:
            held.add(stage)
            asyncio.run_coroutine_threadsafe(store.update(npc_id, _attempt=mine, stage=stage), loop).result()
            time.sleep(hold)
        if now - last[0] > 0.5 or frac >= 1.0:  # no need to write Redis for every prompt
            last[0] = now
            elapsed = now - started
            eta = round(elapsed / frac * (1 - frac), 1) if frac > 0.05 else None
            asyncio.run_coroutine_threadsafe(
                store.update(npc_id, _attempt=mine, progress=round(min(frac, 0.99), 3), stage=stage, eta_s=eta,
                             timings={**stages, current[0] + "_running": round(now - current[1], 3)}), loop)

    final = settings.npcs_dir / npc_id
    out = _attempt_dir(settings.npcs_dir, npc_id, mine)
    _clean_partial(settings.npcs_dir, npc_id)
    fenced: list[int] = []
    watcher = asyncio.create_task(_watch(store, npc_id, mine, cancel, fenced))
    try:
        from pruning.core import dense_of
        from pruning.model_io import resolve_base
        from pruning.prune import prune

        base = resolve_base(rec["base"], settings.models)
        # a card's lore and example dialogue shape the data as they shape its chats
        system, lore_questions = pruning_inputs(rec, await store.card(rec))
        options = dict(rec.get("options") or {})
        if lore_questions:
            options["extra_instructions"] = [*options.get("extra_instructions", []),
                                             *lore_questions][:MAX_EXTRA_INSTRUCTIONS]
        evaluate = rec.get("evaluate", False)
        span = 0.85 if evaluate else 1.0

        async def work() -> dict:
            summary = await asyncio.to_thread(
                prune, base, rec["persona"], rec["sparsity"], rec["method"], out,
                seed=rec.get("seed", 0), n_calibration=settings.calibration_prompts,
                progress=lambda f, stage: progress(span * f, stage), options=options,
                system_prompt=system, cache_dir=settings.data / "cache", device=prune_device(settings.worker_device),
            )
            if evaluate:
                from pruning.eval.run import quick_eval

                summary["metrics"] = await asyncio.to_thread(
                    quick_eval, dense_of(base), out, rec["persona"], system,
                    progress=lambda f: progress(span + (1 - span) * f * 0.99, "evaluating"))
            return summary

        try:
            summary = await asyncio.wait_for(work(), settings.job_timeout_s)
        except asyncio.TimeoutError:
            # the pruning thread stops at its next progress call (the cancel flag, set below)
            cancel.set()
            shutil.rmtree(out, ignore_errors=True)
            await store.update(npc_id, _attempt=mine, status="failed", stage="failed", eta_s=None,
                               error=f"timed out after {settings.job_timeout_s} s in stage {current[0]} "
                                     "(NPC_JOB_TIMEOUT_S)")
            return "failed"
    except PruneCancelled:
        shutil.rmtree(out, ignore_errors=True)
        if fenced:
            log.warning("job for %s: attempt %d superseded by attempt %d; its work is dropped", npc_id, mine, fenced[0])
            return "superseded"
        await store.update(npc_id, _attempt=mine, stage="cancelled", eta_s=None)
        return "cancelled"
    except PruneError as e:
        shutil.rmtree(out, ignore_errors=True)
        await store.update(npc_id, _attempt=mine, status="failed", stage="failed", error=str(e), eta_s=None)
        return "failed"
    except Exception as e:
        shutil.rmtree(out, ignore_errors=True)
        fault = host_fault(e)
        if fault:
            return await _again(store, npc_id, mine, f"{fault} in stage {current[0]}", settings, ctx.get("worker_id"))
        log.exception("job for %s failed", npc_id)
        await store.update(npc_id, _attempt=mine, status="failed", stage="failed", error=f"{type(e).__name__}: {e}",
                           eta_s=None)
        return "failed"
    finally:
        cancel.set()
        watcher.cancel()
    stages[current[0]] = round(time.time() - current[1], 3)
    ckpts = from_settings(settings)
    now = await store.get(npc_id)
    if now is None or now.get("attempts", 0) != mine or now["status"] != "running":
        shutil.rmtree(out, ignore_errors=True)
        return "superseded" if now is not None and now.get("attempts", 0) != mine else "cancelled"
    await store.update(npc_id, _attempt=mine, stage="publishing")
    await asyncio.sleep(_hold(settings, "publishing"))
    try:
        # a remote store gets the attempt's own name: a stale attempt's upload cannot mix with it
        ref = await asyncio.to_thread(ckpts.publish, out, f"{npc_id}.a{mine}" if ckpts.url else npc_id)
        await asyncio.to_thread(_commit_local, out, final)
        if not ckpts.url:
            ref = str(final)
    except Exception as e:
        log.exception("publishing %s failed", npc_id)
        shutil.rmtree(out, ignore_errors=True)
        # the store (or this disk) was down past the publish's own retries: a later attempt tries again
        return await _again(store, npc_id, mine, f"checkpoint store: {host_fault(e) or e}", settings,
                            ctx.get("worker_id"))
    stages["total"] = round(time.time() - started, 3)
    done = await store.update(npc_id, _expect=("running",), _attempt=mine, status="ready", stage="ready",
                              progress=1.0, checkpoint=ref, eta_s=0, ready_at=time.time(), timings=stages, error=None,
                              kept_per_layer=summary["kept_per_layer"], metrics=summary.get("metrics"))
    if done is None:  # deleted, cancelled or superseded at the very end: leave nothing of ours behind
        now = await store.get(npc_id)
        if ckpts.url:
            await asyncio.to_thread(ckpts.delete, ref)
        if now is None or now.get("attempts", 0) == mine:  # a later attempt replaces `final` itself
            shutil.rmtree(final, ignore_errors=True)
        return "cancelled" if now is None or now.get("attempts", 0) == mine else "superseded"
    return "ready"
