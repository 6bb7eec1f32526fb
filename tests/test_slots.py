"""Several engine slots per shape, keep_alive residency (pin, release after idle), /v1/engines."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service import redis_embedded
from tests.conftest import Server

pytestmark = pytest.mark.slow


async def _register(url: str, recs: list[dict]) -> None:
    from redis.asyncio import Redis

    from service.npcs.records import NpcStore

    r = Redis.from_url(url)
    for rec in recs:
        await NpcStore(r).create(rec)
    await r.aclose()


@pytest.fixture(scope="module")
def slotted(tmp_path_factory, models_dir, server, npc_a, npc_b):
    """A second server with 2 slots for one shape, serving the main server's checkpoints (no pruning)."""
    tmp = tmp_path_factory.mktemp("slots")
    proc, url = redis_embedded.start(tmp)
    ids = {"a": "npc-slota", "b": "npc-slotb", "c": "npc-slotc"}
    src = {"a": npc_a, "b": npc_b, "c": npc_a}  # c: a's weights under another id
    recs = [{"id": ids[k], "name": f"Slot {k}", "persona": src[k]["persona"], "sparsity": 0.25,
             "method": src[k]["method"], "base": str(models_dir / src[k]["base"]), "status": "ready", "stage": "ready",
             "progress": 1.0, "checkpoint": str(server.data_dir / "npcs" / src[k]["id"])} for k in ids]
    asyncio.run(_register(url, recs))
    srv = Server(tmp / "data", models_dir, extra_env={
        "NPC_REDIS_URL": url, "NPC_ENGINE_SLOTS": "2", "NPC_MAX_ENGINES": "2", "NPC_MAX_WAITING": "3"}).start()
    try:
        deadline = time.time() + 240
        while len(_engines(srv)) < 2:  # prewarm starts both slots
            assert time.time() < deadline, "two engines did not start"
            time.sleep(1)
        yield srv, ids
    finally:
        srv.stop()
        redis_embedded.stop(proc)


def _engines(srv) -> list[dict]:
    return httpx.get(srv.url + "/v1/engines", timeout=30).json()["data"]


def _chat(srv, npc: str, **extra) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": npc, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}],
        **extra})


def _load(srv, npc: str, keep_alive) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/npcs/{npc}/load", json={"keep_alive": keep_alive, "wait_s": 300},
                      timeout=300)


def test_two_slots_hold_two_npcs(slotted):
    srv, ids = slotted
    for k in ("a", "b"):
        assert _load(srv, ids[k], 600).status_code == 200
    engines = _engines(srv)
    assert sorted(e["npc"] for e in engines) == sorted([ids["a"], ids["b"]])
    assert sorted(e["core"] for e in engines) == ["0", "1"]  # one core each
    swaps = sum(e["swaps"] for e in engines)
    for k in ("a", "b", "a", "b"):
        assert _chat(srv, ids[k]).status_code == 200
    assert sum(e["swaps"] for e in _engines(srv)) == swaps  # both stay resident: no swap at all
    e = _engines(srv)[0]
    assert {"slot", "in_flight", "waiting", "last_used", "pinned", "expires_at", "keep_alive"} <= set(e)


def test_pins_and_keep_alive(slotted):
    srv, ids = slotted
    assert _load(srv, ids["a"], -1).json()["keep_alive"] == -1
    r = _load(srv, ids["b"], "pin")  # 2 slots: a second pin would leave no slot for any other NPC
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "pins_full" and r.headers["retry-after"]
    pinned = {e["npc"]: e["pinned"] for e in _engines(srv)}
    assert pinned[ids["a"]] is True and not pinned.get(ids["b"])  # the refused pin changed nothing

    assert _load(srv, ids["b"], "10m").status_code == 200
    r = _chat(srv, ids["c"], keep_alive=0)  # the unpinned slot is taken, then left at once
    assert r.status_code == 200, r.text
    npcs = [e["npc"] for e in _engines(srv)]
    assert ids["a"] in npcs and ids["c"] not in npcs and ids["b"] not in npcs

    assert _load(srv, ids["b"], 1).status_code == 200
    deadline = time.time() + 10
    while ids["b"] in [e["npc"] for e in _engines(srv)]:  # released by the keep_alive reaper
        assert time.time() < deadline, _engines(srv)
        time.sleep(0.5)
    assert ids["a"] in [e["npc"] for e in _engines(srv)]  # the pinned one stays

    assert httpx.post(f"{srv.url}/v1/npcs/{ids['a']}/unload", timeout=60).json()["unloaded"] is True
    assert len(_engines(srv)) == 1
    r = _load(srv, ids["b"], -1)  # the unload gave a's pin back
    assert r.status_code == 200 and r.json()["keep_alive"] == -1, r.text
    assert _load(srv, ids["b"], 0).status_code == 200  # and b's own unpin gives it back again
    assert _load(srv, ids["a"], -1).status_code == 200
    assert httpx.post(f"{srv.url}/v1/npcs/{ids['a']}/unload", timeout=60).status_code == 200


def test_bad_keep_alive(slotted):
    srv, ids = slotted
    r = _chat(srv, ids["a"], keep_alive="soon")
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    assert _load(srv, ids["a"], [1]).status_code == 400


def test_flood_gets_429_never_a_hang(slotted):
    import concurrent.futures as cf

    srv, ids = slotted
    npcs = [ids["a"], ids["b"], ids["c"]]

    def one(i: int) -> httpx.Response:
        return _chat(srv, npcs[i % 3], max_tokens=16)

    with cf.ThreadPoolExecutor(18) as ex:
        rs = list(ex.map(one, range(18)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429}, [r.text for r in rs if r.status_code not in (200, 429)]
    assert 200 in codes and 429 in codes, codes
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] and "NPC_MAX_WAITING" in busy.json()["error"]["message"]
    assert all(e["waiting"] == 0 and e["in_flight"] == 0 for e in _engines(srv))
