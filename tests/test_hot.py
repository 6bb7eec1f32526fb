"""Hot NPCs: sustained concurrent load promotes an NPC from the mixed engine to an engine of its
own (its pruned checkpoint, no mask), and it returns when the load drops; no request fails or is
moved mid-way."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import psutil
import pytest
from pydantic import ValidationError

from conftest import PERSONA_A, PERSONA_B, Server
from test_engines import _live_children
from test_mixed import _engines, assert_serves_its_checkpoint

pytestmark = pytest.mark.slow

HOT_ENV = {"NPC_MIXED_BATCHES": "1", "NPC_ENGINE_SLOTS": "1", "NPC_MAX_ENGINES": "1", "NPC_INSTANT_NPCS": "1",
           "NPC_HOT_NPCS": "1", "NPC_HOT_PROMOTE_AT": "2", "NPC_HOT_DEMOTE_AT": "0.5",
           "NPC_HOT_AFTER_S": "3", "NPC_HOT_IDLE_S": "4"}


@pytest.fixture(scope="module")
def hot(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("npc-hot"), models_dir, extra_env=HOT_ENV).start()
    ids = {"a": srv.create_npc("Rook", PERSONA_A, sparsity=0.5, method="activation-prompt")["id"],
           "b": srv.create_npc("Bea", PERSONA_B, sparsity=0.25, method="activation-prompt")["id"]}
    for i in ids.values():
        srv.wait_ready(i)
    yield srv, ids
    srv.stop()


def _stream(srv, npc: str, max_tokens: int = 24, on_first=None) -> dict:
    """One streamed chat: its status, text and finish reason."""
    body = {"model": npc, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": "Tell me about your day, in detail."}]}
    text, finish = "", None
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "text": r.read().decode(), "finish": None}
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            choice = json.loads(line[5:])["choices"][0]
            if choice["delta"].get("content"):
                if not text and on_first:
                    on_first()
                text += choice["delta"]["content"]
            finish = choice.get("finish_reason") or finish
    return {"status": 200, "text": text, "finish": finish}


def _hot_entries(srv) -> list[dict]:
    return [e for e in _engines(srv) if e["mode"] == "hot"]


def _metric(srv, name: str) -> float:
    lines = httpx.get(srv.url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(name + " ") or x.startswith(name + "{"))


def _workers(srv) -> int:
    """vLLM engine worker processes under the server (a stopped engine's zombie is not one)."""
    return sum("VLLM::Worker" in cmd for _, cmd in _live_children(srv.proc.pid))


def test_busy_npc_gets_its_own_engine_then_returns(hot):
    srv, ids = hot
    assert _stream(srv, ids["a"])["status"] == 200  # the mixed engine is up
    assert _hot_entries(srv) == [] and _workers(srv) == 1
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            results.append(_stream(srv, ids["a"]))

    with cf.ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(client) for _ in range(3)]
        deadline = time.time() + 240
        seen_starting = False
        while time.time() < deadline:
            entries = _hot_entries(srv)
            seen_starting |= any(e["state"] == "starting" for e in entries)
            if any(e["state"] == "serving" for e in entries):
                break
            time.sleep(0.5)
        time.sleep(3)  # requests go on across the switch
        stop.set()
        for f in futs:
            f.result()
    (entry,) = _hot_entries(srv)
    assert entry["npc"] == ids["a"] and entry["state"] == "serving" and entry["shape"]["intermediate_size"] == 768
    assert seen_starting  # visible while its engine started, the mixed engine serving meanwhile
    # every request across the promotion completed, none failed or was cut
    assert len(results) > 6 and all(r["status"] == 200 and r["finish"] and r["text"] for r in results), results
    assert _metric(srv, 'npc_hot_switches_total{direction="promote"}') == 1
    assert _metric(srv, 'npc_engines{mode="hot"}') == 1
    assert _metric(srv, f'npc_hot{{npc="{ids["a"]}"}}') == 1 and _metric(srv, f'npc_hot{{npc="{ids["b"]}"}}') == 0
    assert _workers(srv) == 2

    # the hot NPC's requests run on its own engine; another NPC's still on the mixed one
    seen = {}

    def look(key):
        def f():
            seen[key] = {e["mode"]: e["in_flight"] for e in _engines(srv)}
        return f

    assert _stream(srv, ids["a"], 64, on_first=look("a"))["status"] == 200
    assert _stream(srv, ids["b"], 64, on_first=look("b"))["status"] == 200
    assert seen["a"] == {"hot": 1, "mixed": 0} and seen["b"] == {"hot": 0, "mixed": 1}, seen
    # its own engine runs its exported checkpoint: greedy output is a fresh engine's on it. The hot
    # engine computes on both cores, the fresh one on one: bf16 sums split differently, so logprobs
    # drift by a few tenths over 20 tokens (seen: the first parting at token 22, a 0.125 vs 0.25 tie)
    assert_serves_its_checkpoint(srv, ids["a"], tie=0.3)

    # idle: back to the mixed engine, the hot engine's processes gone
    deadline = time.time() + 90
    while _hot_entries(srv) and time.time() < deadline:
        time.sleep(0.5)
    assert _hot_entries(srv) == []
    assert _metric(srv, 'npc_hot_switches_total{direction="demote"}') == 1
    assert _metric(srv, 'npc_engines{mode="hot"}') == 0 and _metric(srv, f'npc_hot{{npc="{ids["a"]}"}}') == 0
    deadline = time.time() + 60
    while _workers(srv) > 1 and time.time() < deadline:
        time.sleep(0.5)
    assert _workers(srv) == 1
    assert _stream(srv, ids["a"], 64, on_first=look("after"))["status"] == 200
    assert seen["after"] == {"mixed": 1}


def test_hysteresis_is_checked():
    from service.settings import Settings

    with pytest.raises(ValidationError, match="NPC_HOT_DEMOTE_AT"):
        Settings(hot_promote_at=2, hot_demote_at=2)


def _family(srv) -> list[psutil.Process]:
    return psutil.Process(srv.proc.pid).children(recursive=True)


def _alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigterm_on_a_busy_server_ends_every_process(hot):
    """SIGTERM while a hot engine and the mixed engine decode and a prune runs: every process of
    `npc serve` (engines, worker, Redis) ends within 10 s."""
    srv, ids = hot
    stop = threading.Event()

    def client(npc):
        while not stop.is_set():
            try:
                _stream(srv, npc, 48)
            except httpx.HTTPError:
                return  # the server went away: what this test does

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(client, ids["a"]) for _ in range(3)] + [ex.submit(client, ids["b"])]
        deadline = time.time() + 240
        while time.time() < deadline and not any(e["state"] == "serving" for e in _hot_entries(srv)):
            time.sleep(0.5)
        assert any(e["state"] == "serving" for e in _hot_entries(srv))
        job = srv.create_npc("Late", PERSONA_B + " She is new in town.", sparsity=0.25)
        deadline = time.time() + 60
        while httpx.get(f"{srv.url}/v1/npcs/{job['id']}").json()["status"] != "running" and time.time() < deadline:
            time.sleep(0.2)
        family = _family(srv)
        assert _workers(srv) == 2 and any("worker" in cmd for _, cmd in _live_children(srv.proc.pid))
        t0 = time.time()
        srv.proc.terminate()
        while _alive(family + [psutil.Process(srv.proc.pid)]) and time.time() - t0 < 30:
            time.sleep(0.2)
        took = time.time() - t0
        stop.set()
        for f in futs:
            f.result()
    assert not _alive(family), [(p.pid, p.name()) for p in family if p.pid in _alive(family)]
    assert took <= 10, took
