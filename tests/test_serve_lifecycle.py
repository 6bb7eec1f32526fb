"""`npc serve` as a whole: state (NPCs, sessions) survives a restart; SIGTERM leaves no process behind."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest

from tests.conftest import PERSONA_B, Server

pytestmark = pytest.mark.slow


def _chat(srv: Server, npc_id: str) -> str:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": npc_id, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "What is your favourite bread?"}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _stop_and_check_no_orphans(srv: Server) -> None:
    parent = psutil.Process(srv.proc.pid)
    family = parent.children(recursive=True)
    cmds = []
    for p in family:
        try:
            cmds.append(p.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass  # an engine that just stopped, not yet reaped
    assert any("redis-server" in " ".join(c) for c in cmds)
    assert any("worker" in c for c in cmds)
    srv.stop()
    assert srv.proc.returncode is not None
    deadline = time.time() + 30
    while time.time() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        time.sleep(0.5)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


def test_restart_keeps_npcs_and_stops_cleanly(tmp_path, models_dir):
    srv = Server(tmp_path / "data", models_dir, {"NPC_PREWARM": "false"}).start()
    try:
        rec = srv.create_npc("Bea", PERSONA_B, sparsity=0.5)
        t0 = time.time()
        srv.wait_ready(rec["id"])
        post_to_ready = time.time() - t0
        before = _chat(srv, rec["id"])
        sessions = f"{srv.url}/v1/npcs/{rec['id']}/sessions"
        sid = httpx.post(sessions, json={"user": "Tom"}, timeout=30).json()["id"]
        said = httpx.post(f"{sessions}/{sid}/messages", json={"content": "Hello!", "max_tokens": 6},
                          timeout=300).json()["message"]
        workers = httpx.get(srv.url + "/v1/workers").json()["data"]
        assert len(workers) == 1 and workers[0]["device"] == "cpu"
    finally:
        _stop_and_check_no_orphans(srv)

    again = Server(tmp_path / "data", models_dir, {"NPC_PREWARM": "false"}).start()
    try:
        listed = httpx.get(again.url + "/v1/npcs").json()["data"]
        assert [n["id"] for n in listed] == [rec["id"]] and listed[0]["status"] == "ready"
        assert _chat(again, rec["id"]) == before
        kept = httpx.get(f"{again.url}/v1/npcs/{rec['id']}/sessions/{sid}", timeout=30).json()
        assert [(m["role"], m["content"]) for m in kept["messages"]] == [("user", "Hello!"),
                                                                         ("assistant", said["content"])]
        assert kept["user"] == "Tom"
        r = httpx.post(f"{again.url}/v1/npcs/{rec['id']}/sessions/{sid}/messages", json={"content": "Again.", "max_tokens": 6},
                       timeout=300)
        assert r.status_code == 200, r.text
    finally:
        _stop_and_check_no_orphans(again)
    print(f"POST->ready {post_to_ready:.1f}s")
