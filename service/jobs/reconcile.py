"""Repair NPCs whose job vanished: queued or running records that no job will ever finish.

A create that crashed between writing the record and queueing its job, or a queue lost while
the records survived, leaves an NPC `queued` for ever. Workers run `reconcile` now and then: an
NPC queued or running for longer than the grace period whose job is neither in the queue, nor in
progress, nor held by a live worker gets its job queued again (arq keeps one job per id, so
workers reconciling at once queue it once)."""

from __future__ import annotations

import logging
import time

from service.jobs.queue import HEARTBEAT, IN_PROGRESS, JOB_OWNERS, QUEUE, enqueue_prune, job_id
from service.npcs.records import NpcStore

log = logging.getLogger(__name__)
GRACE_S = 60.0  # a create queues its job within milliseconds; a worker claims a released one within seconds
RESULT = "arq:result:"


async def _has_job(redis, jid: str) -> bool:
    if await redis.zscore(QUEUE, jid) is not None or await redis.exists(IN_PROGRESS + jid):
        return True
    owner = await redis.hget(JOB_OWNERS, jid)
    return owner is not None and bool(await redis.exists(HEARTBEAT.format(owner.decode() if isinstance(owner, bytes)
                                                                            else owner)))


async def reconcile(redis, grace_s: float = GRACE_S) -> list[str]:
    """Queue again the job of every NPC whose job is gone; returns their ids."""
    store = NpcStore(redis)
    requeued = []
    for npc_id in await store.active_before(time.time() - grace_s):
        jid = job_id(npc_id)
        if await _has_job(redis, jid):
            continue
        rec = await store.get(npc_id)
        if rec is None or rec["status"] not in ("queued", "running"):
            continue
        await redis.delete(RESULT + jid)  # an earlier run's result would make arq refuse the id
        await enqueue_prune(redis, npc_id)
        log.warning("NPC %s was %s with no job: its job is queued again", npc_id, rec["status"])
        requeued.append(npc_id)
    return requeued
