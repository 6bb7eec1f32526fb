"""`npc worker`: an arq worker that runs pruning jobs (needs only REDIS_URL and the store)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import time

from arq.worker import Worker

from service.jobs.prune_job import prune_device, prune_npc
from service.jobs.queue import HEARTBEAT, IN_PROGRESS, JOB_OWNERS, QUEUE, SERIALIZERS, WORKERS, redis_settings
from service.jobs.reconcile import reconcile
from service.settings import Settings

HEARTBEAT_EVERY = 5.0
HEARTBEAT_TTL = 15
RECONCILE_EVERY = 12  # heartbeats: once a minute

log = logging.getLogger(__name__)
_RELEASE_OWN = """if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0"""


def _device(settings) -> str:
    """Where this worker's jobs run (NPC_WORKER_DEVICE), as /v1/workers shows it."""
    dev = prune_device(settings.worker_device)
    if dev == "cpu":
        return dev
    import torch

    return f"cuda:{torch.cuda.get_device_name(torch.device(dev))}"


async def _heartbeat(ctx: dict) -> None:
    info = {"id": ctx["worker_id"], "host": socket.gethostname(), "pid": os.getpid(),
            "device": _device(ctx["settings"]), "started": time.time()}
    beats = 0
    while True:
        try:
            now = time.time()
            async with ctx["redis"].pipeline(transaction=True) as p:
                p.set(HEARTBEAT.format(ctx["worker_id"]),
                      json.dumps({**info, "seen": now, "job": ctx["state"]["job"]}), ex=HEARTBEAT_TTL)
                p.zadd(WORKERS, {ctx["worker_id"]: now})
                p.zremrangebyscore(WORKERS, "-inf", now - 10 * HEARTBEAT_TTL)  # long gone
                await p.execute()
            await reap_orphaned_jobs(ctx["redis"])
            if beats % RECONCILE_EVERY == 0:
                await reconcile(ctx["redis"])
            beats += 1
        except Exception:  # Redis away for a moment: try again next beat
            log.warning("heartbeat failed", exc_info=True)
        await asyncio.sleep(HEARTBEAT_EVERY)


async def reap_orphaned_jobs(redis) -> list[str]:
    """Release jobs whose worker stopped heartbeating (killed, preempted) so another runs them.

    arq marks a running job with an in-progress key that lives as long as the job
    timeout; a worker killed mid-job would hold its job for that long. A job whose
    recorded owner has no live heartbeat gets its in-progress key removed, and arq
    hands it to the next worker that polls (the job itself stays in the queue).
    """
    released = []
    for job_id, owner in (await redis.hgetall(JOB_OWNERS)).items():
        job_id, owner = (x.decode() if isinstance(x, bytes) else x for x in (job_id, owner))
        if not await redis.exists(HEARTBEAT.format(owner)):
            async with redis.pipeline(transaction=True) as p:
                p.delete(IN_PROGRESS + job_id)
                p.hdel(JOB_OWNERS, job_id)
                await p.execute()
            log.warning("worker %s is gone; job %s released for another worker", owner, job_id)
            released.append(job_id)
    return released


def build_worker(settings: Settings, redis_url: str) -> Worker:
    async def startup(ctx: dict) -> None:
        ctx["settings"] = settings
        ctx["state"] = {"job": None}  # job contexts are copies of ctx; this dict is shared
        ctx["worker_id"] = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx))

    async def shutdown(ctx: dict) -> None:
        ctx["heartbeat"].cancel()
        await ctx["redis"].delete(HEARTBEAT.format(ctx["worker_id"]))
        await ctx["redis"].zrem(WORKERS, ctx["worker_id"])

    async def job_start(ctx: dict) -> None:
        ctx["state"]["job"] = ctx.get("job_id")
        await ctx["redis"].hset(JOB_OWNERS, ctx["job_id"], ctx["worker_id"])

    async def job_end(ctx: dict) -> None:
        ctx["state"]["job"] = None
        # only this worker's claim: a stalled worker's job may have been handed to another since
        await ctx["redis"].eval(_RELEASE_OWN, 1, JOB_OWNERS, ctx["job_id"], ctx["worker_id"])

    return Worker(
        functions=[prune_npc],
        redis_settings=redis_settings(redis_url),
        queue_name=QUEUE,
        on_startup=startup,
        on_shutdown=shutdown,
        on_job_start=job_start,
        on_job_end=job_end,
        max_jobs=1,            # one pruning job at a time: it uses every core
        # the job keeps its own deadline (settings.job_timeout_s) and reports it on the record;
        # arq's is the backstop
        job_timeout=settings.job_timeout_s + 120,
        keep_result=24 * 3600,
        # one more than the job's own limit: that call marks the NPC failed instead of arq dropping it
        max_tries=settings.job_max_tries + 1,
        handle_signals=True,
        **SERIALIZERS,
    )


def run(settings: Settings, redis_url: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.worker_metrics_port)
        except OSError as e:
            log.warning("worker metrics port %s unavailable: %s", settings.worker_metrics_port, e)
    build_worker(settings, redis_url).run()
