"""The job queue's wire format: JSON, so a Redis writer cannot make a worker unpickle code."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import pytest

from service import redis_embedded
from service.jobs.queue import SERIALIZERS, enqueue_prune, loads


class _Boom:
    def __reduce__(self):
        return (os.system, ("true",))


def test_jobs_are_json_in_redis_and_a_pickle_is_refused(tmp_path):
    from arq import create_pool
    from arq.connections import RedisSettings

    proc, url = redis_embedded.start(tmp_path)

    async def go() -> bytes:
        pool = await create_pool(RedisSettings.from_dsn(url), **SERIALIZERS)
        try:
            await enqueue_prune(pool, "npc-0123456789ab")
            return await pool.get("arq:job:prune:npc-0123456789ab")
        finally:
            await pool.aclose()

    try:
        job = json.loads(asyncio.run(go()))
    finally:
        redis_embedded.stop(proc)
    assert job["f"] == "prune_npc" and job["a"] == ["npc-0123456789ab"]
    with pytest.raises(ValueError):  # what the worker's deserializer does with a planted pickle
        loads(pickle.dumps({"f": "prune_npc", "a": [_Boom()]}))
