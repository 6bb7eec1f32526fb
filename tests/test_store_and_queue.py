"""What the service keeps in Redis, on a real (embedded) Redis: the job queue's wire format (JSON,
so a Redis writer cannot make a worker unpickle code), record counts, pages and the ready index."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import time

import pytest

from service.npcs.records import NpcStore
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
        await r.delete(COUNTS)  # records from before the counts were kept, read by a new server
        return after_writes, await NpcStore(r).count_by_status()

    after_writes, rebuilt = _with_store(redis_url, body)
    expected = {"queued": 2, "running": 0, "ready": 1, "failed": 1, "cancelled": 0}
    assert after_writes == expected and rebuilt == expected


def test_pages_and_the_ready_index(redis_url):
    from service.npcs.records import COUNTED, COUNTS, READY, TENANT_INDEX

    async def body(store, r):
        for i in range(7):
            await store.create({"id": f"npc-{i}", "name": "N", "persona": "p", "owner": "a" if i % 2 else "b"})
        pages, after = [], None
        while True:
            recs, more = await store.page(after, 2, "b")  # b's own index: a's NPCs are never read
            pages.append([x["id"] for x in recs])
            if not more:
                break
            after = recs[-1]["id"]
        with pytest.raises(KeyError):
            await store.page("npc-missing", 2)
        with pytest.raises(KeyError):  # another tenant's NPC is no cursor
            await store.page("npc-1", 2, "b")
        everyone = [x["id"] for x in (await store.page(None, 10))[0]]
        await store.delete("npc-2")
        await r.delete(TENANT_INDEX.format("b"), COUNTED)  # as before tenants had their own index
        b_rebuilt = [x["id"] for x in (await NpcStore(r).page(None, 10, "b"))[0]]
        await store.update("npc-3", status="ready", ready_at=1.0)
        t = (await store.get("npc-3"))["updated"]
        await store.create({"id": "npc-7", "name": "N", "persona": "p", "status": "ready"})
        newly = [x["id"] for x in await store.ready_since(t)]
        await store.update("npc-3", status="failed")
        after_fail = [x["id"] for x in await store.ready_since(0)]
        await r.delete(COUNTS, READY)  # as before the index existed: rebuilt from the records by a new server
        await NpcStore(r).count_by_status()
        return pages, everyone, b_rebuilt, newly, after_fail, [x["id"] for x in await store.ready_since(0)]

    pages, everyone, b_rebuilt, newly, after_fail, rebuilt = _with_store(redis_url, body)
    assert pages == [["npc-0", "npc-2"], ["npc-4", "npc-6"]]
    assert everyone == [f"npc-{i}" for i in range(7)] and b_rebuilt == ["npc-0", "npc-4", "npc-6"]
    assert newly == ["npc-3", "npc-7"] and after_fail == ["npc-7"] and rebuilt == ["npc-7"]


def test_tenant_caps_are_atomic_and_counted_per_owner(redis_url):
    """A tenant's NPCs and jobs, and the queue, are capped in the create's own transaction: 20
    concurrent creates against a cap of 3 make exactly 3."""
    from service.npcs.records import COUNTED, TENANT_COUNTS, Caps, LimitReached

    async def body(store, r):
        caps = Caps(npcs=5, jobs=3, queued=4)

        async def one(i):
            try:
                await store.create({"id": f"npc-a{i}", "name": "N", "persona": "p", "owner": "a"}, caps=caps)
                return f"npc-a{i}"
            except LimitReached as e:
                return e.code

        codes = await asyncio.gather(*(one(i) for i in range(20)))
        # a prompt-only NPC is ready at once: no job, only the NPC cap
        await store.create({"id": "npc-a-ready", "name": "N", "persona": "p", "owner": "a", "status": "ready"},
                           caps=caps)
        made = [c for c in codes if c.startswith("npc-")]
        await store.update(made[0], status="ready")  # a job done frees a job slot
        await store.create({"id": "npc-a-next", "name": "N", "persona": "p", "owner": "a"}, caps=caps)
        with pytest.raises(LimitReached) as npc_cap:  # 5 records: the NPC cap, ready or not
            await store.create({"id": "npc-a-more", "name": "N", "persona": "p", "owner": "a", "status": "ready"},
                               caps=caps)
        await store.create({"id": "npc-b0", "name": "N", "persona": "p", "owner": "b"}, caps=caps)
        with pytest.raises(LimitReached) as full:  # 4 queued in all: the queue cap holds for b too
            await store.create({"id": "npc-b1", "name": "N", "persona": "p", "owner": "b"}, caps=caps)
        await store.delete(made[1])
        counts = await store.tenant_counts("a")
        await r.delete(TENANT_COUNTS.format("a"), COUNTED)  # as before tenants were counted
        return codes, npc_cap.value, full.value, counts, await NpcStore(r).tenant_counts("a")

    codes, npc_cap, full, counts, rebuilt = _with_store(redis_url, body)
    assert len(set(codes) - {"job_limit"}) == 3 and "job_limit" in codes
    assert npc_cap.code == "npc_limit" and npc_cap.retry_after is None
    assert full.code == "queue_full" and full.retry_after
    assert counts == rebuilt == {"queued": 2, "running": 0, "ready": 2, "failed": 0, "cancelled": 0}


def test_pins_are_capped_per_tenant_and_in_all(redis_url):
    from service.npcs.records import COUNTED, PINS, LimitReached

    async def body(store, r):
        for i in range(4):
            await store.create({"id": f"npc-{i}", "name": "N", "persona": "p", "owner": "a" if i < 3 else "b"})
        await store.pin("npc-0", "a", 2, 3)
        await store.pin("npc-0", "a", 2, 3)  # the same pin twice counts once
        await store.pin("npc-1", "a", 2, 3)
        with pytest.raises(LimitReached) as mine:
            await store.pin("npc-2", "a", 2, 3)
        await store.pin("npc-3", "b", 2, 3)
        with pytest.raises(LimitReached) as server:
            await store.pin("npc-2", "a", None, 3)  # an admin has no tenant cap, but the server's holds
        await store.unpin("npc-1")
        await store.pin("npc-2", "a", 2, 3)
        await store.delete("npc-0")  # a deleted NPC's pin is given back
        held = sorted(k.decode() for k in await r.hkeys(PINS))
        await store.update("npc-2", keep_alive=-1)
        await r.delete(PINS, COUNTED)  # rebuilt from the records' keep_alive (by a new server)
        await NpcStore(r).count_by_status()
        return mine.value, server.value, held, sorted(k.decode() for k in await r.hkeys(PINS))

    mine, server, held, rebuilt = _with_store(redis_url, body)
    assert mine.code == "pin_limit" and server.code == "pins_full" and server.retry_after
    assert held == ["npc-2", "npc-3"] and rebuilt == ["npc-2"]


def test_a_record_whose_job_vanished_gets_its_job_again(redis_url):
    """A create that died between the record and its job (here: the record written, no job queued)
    is repaired by the reconciler; NPCs whose job is queued, in progress on a live worker, or done
    are left alone."""
    from arq import create_pool
    from arq.connections import RedisSettings

    from service.jobs.queue import HEARTBEAT, JOB_OWNERS, QUEUE, job_id
    from service.jobs.reconcile import reconcile

    async def go():
        pool = await create_pool(RedisSettings.from_dsn(redis_url), **SERIALIZERS)
        store = NpcStore(pool)
        try:
            for i in range(4):
                await store.create({"id": f"npc-{i}", "name": "N", "persona": "p"})
            await enqueue_prune(pool, "npc-1")                      # queued as it should be
            await store.update("npc-2", status="running")           # held by a live worker
            await pool.hset(JOB_OWNERS, job_id("npc-2"), "w-live")
            await pool.set(HEARTBEAT.format("w-live"), "{}", ex=60)
            await store.update("npc-3", status="ready")             # done: not active any more
            young = await reconcile(pool, grace_s=3600)             # within the grace period: nothing
            first = await reconcile(pool, grace_s=0)
            again = await reconcile(pool, grace_s=0)                 # now queued: not queued twice
            queued = sorted(x.decode() for x in await pool.zrange(QUEUE, 0, -1))
            await store.delete("npc-0")
            return young, first, again, queued, await store.active_before(time.time() + 1)
        finally:
            await pool.aclose()

    young, first, again, queued, active = asyncio.run(go())
    assert young == [] and first == ["npc-0"] and again == []
    assert queued == [job_id("npc-0"), job_id("npc-1")]
    assert active == ["npc-1", "npc-2"]
