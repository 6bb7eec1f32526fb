"""What the service keeps in Redis, on a real (embedded) Redis: the job queue's wire format (JSON,
so a Redis writer cannot make a worker unpickle code), record counts, pages and the ready index."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import pytest

from service import redis_embedded
from service.jobs.queue import SERIALIZERS, enqueue_prune, loads


@pytest.fixture
def redis_url(tmp_path):
    proc, url = redis_embedded.start(tmp_path)
    yield url
    redis_embedded.stop(proc)


def _with_store(url: str, body):
    """Run `body(store, redis)` against a fresh NpcStore on `url`."""
    from redis.asyncio import Redis

    from service.npcs.records import NpcStore

    async def go():
        r = Redis.from_url(url)
        try:
            return await body(NpcStore(r), r)
        finally:
            await r.aclose()

    return asyncio.run(go())


class _Boom:
    def __reduce__(self):
        return (os.system, ("true",))


def test_jobs_are_json_in_redis_and_a_pickle_is_refused(redis_url):
    from arq import create_pool
    from arq.connections import RedisSettings

    async def go() -> bytes:
        pool = await create_pool(RedisSettings.from_dsn(redis_url), **SERIALIZERS)
        try:
            await enqueue_prune(pool, "npc-0123456789ab")
            return await pool.get("arq:job:prune:npc-0123456789ab")
        finally:
            await pool.aclose()

    job = json.loads(asyncio.run(go()))
    assert job["f"] == "prune_npc" and job["a"] == ["npc-0123456789ab"]
    with pytest.raises(ValueError):  # what the worker's deserializer does with a planted pickle
        loads(pickle.dumps({"f": "prune_npc", "a": [_Boom()]}))


def test_status_counts_follow_every_write_and_survive_an_upgrade(redis_url):
    """/metrics reads the per-status counts from one hash instead of loading every record."""
    from service.npcs.records import COUNTS

    async def body(store, r):
        for i in range(5):
            await store.create({"id": f"npc-{i}", "name": "N", "persona": "p"})
        await store.update("npc-0", status="running")
        await store.update("npc-0", status="ready")
        await store.update("npc-1", status="failed")
        await store.update("npc-1", progress=0.5)  # no status change: no count change
        await store.delete("npc-2")
        await store.delete("npc-2")  # already gone
        after_writes = await store.count_by_status()
        await r.delete(COUNTS)  # records from before the counts were kept
        return after_writes, await store.count_by_status()

    after_writes, rebuilt = _with_store(redis_url, body)
    expected = {"queued": 2, "running": 0, "ready": 1, "failed": 1, "cancelled": 0}
    assert after_writes == expected and rebuilt == expected


def test_pages_and_the_ready_index(redis_url):
    from service.npcs.records import COUNTS, READY

    async def body(store, r):
        for i in range(7):
            await store.create({"id": f"npc-{i}", "name": "N", "persona": "p", "owner": "a" if i % 2 else "b"})
        pages, after = [], None
        while True:
            recs, more = await store.page(after, 2, lambda rec: rec["owner"] == "b")
            pages.append([x["id"] for x in recs])
            if not more:
                break
            after = recs[-1]["id"]
        with pytest.raises(KeyError):
            await store.page("npc-missing", 2)
        await store.update("npc-3", status="ready", ready_at=1.0)
        t = (await store.get("npc-3"))["updated"]
        await store.create({"id": "npc-7", "name": "N", "persona": "p", "status": "ready"})
        newly = [x["id"] for x in await store.ready_since(t)]
        await store.update("npc-3", status="failed")
        after_fail = [x["id"] for x in await store.ready_since(0)]
        await r.delete(COUNTS, READY)  # as before the index existed: rebuilt from the records
        await store.count_by_status()
        return pages, newly, after_fail, [x["id"] for x in await store.ready_since(0)]

    pages, newly, after_fail, rebuilt = _with_store(redis_url, body)
    assert pages == [["npc-0", "npc-2"], ["npc-4", "npc-6"]]
    assert newly == ["npc-3", "npc-7"] and after_fail == ["npc-7"] and rebuilt == ["npc-7"]
