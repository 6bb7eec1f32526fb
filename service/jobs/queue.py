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
