"""The job queue and the workers' presence in Redis: everything the API knows of jobs."""

from __future__ import annotations

import json

QUEUE = "npc:jobs"
HEARTBEAT = "npc:worker:{}"
WORKERS = "npc:workers"  # worker id -> last heartbeat (a sorted set: no keyspace SCAN to list them)
JOB_OWNERS = "npc:jobowners"  # running job id -> its worker id (a hash: the reaper reads it, not the keyspace)
IN_PROGRESS = "arq:in-progress:"
PRUNE_JOB = "prune_npc"


def dumps(job: dict) -> bytes:
    """arq's job and result serializer: JSON, not pickle (whoever can write the Redis would otherwise
    run code on every worker). A job is a function name and an NPC id; a failed job's exception is
    kept as its text."""
    return json.dumps(job, default=repr).encode()


def loads(raw: bytes) -> dict:
    return json.loads(raw)


SERIALIZERS = {"job_serializer": dumps, "job_deserializer": loads}
REDIS_OUTAGE_S = 30  # how long every Redis command keeps retrying a Redis that went away (a restart)


def redis_retry() -> dict:
    """Client options that ride out a Redis restart: each command retries a lost connection with
    backoff for about REDIS_OUTAGE_S instead of failing (an arq worker would exit on the first one)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    return {"retry": Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=REDIS_OUTAGE_S // 2 + 3),
            "retry_on_error": [ConnectionError, TimeoutError, OSError]}


def redis_settings(url: str):
    """arq's settings for `url`, with `redis_retry()`."""
    from arq.connections import RedisSettings

    settings = RedisSettings.from_dsn(url)
    for k, v in redis_retry().items():
        setattr(settings, k, v)
    return settings


def job_id(npc_id: str) -> str:
    return f"prune:{npc_id}"


async def enqueue_prune(queue, npc_id: str) -> None:
    """Queue the NPC's pruning job (arq: at most one job per id)."""
    await queue.enqueue_job(PRUNE_JOB, npc_id, _job_id=job_id(npc_id), _queue_name=QUEUE)


async def queue_depth(redis) -> int:
    return await redis.zcard(QUEUE)


async def live_workers(redis) -> list[dict]:
    ids = await redis.zrange(WORKERS, 0, -1)
    raws = await redis.mget([HEARTBEAT.format(i.decode() if isinstance(i, bytes) else i) for i in ids]) if ids else []
    return [json.loads(r) for r in raws if r]  # a heartbeat key that expired: that worker is gone
