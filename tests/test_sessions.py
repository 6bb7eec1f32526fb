"""Sessions on the real server: the server keeps the conversation and folds old turns into a
memory written by the base model, so a long conversation never hits the context limit."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest

pytestmark = pytest.mark.slow

PERSONA = "Old Mara, a ferrywoman on the river Lune who remembers every traveller's name and debts."


@pytest.fixture(scope="module")
def mara(server) -> dict:
    return server.create_npc("Old Mara", PERSONA, sparsity=0)


def _session(server, npc, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/npcs/{npc['id']}/sessions", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def _say(server, npc, sid, content, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/npcs/{npc['id']}/sessions/{sid}/messages", timeout=300,
                      json={"content": content, "max_tokens": 8, "temperature": 0.7, **kw})


def test_a_100_turn_session_never_errors_and_its_memory_is_visible(server, mara):
    s = _session(server, mara, user="Tom", context_tokens=1024)
    assert s["memory"] == {"summary": None, "folded_messages": 0, "folds": 0}
    prompt_tokens = []
    for i in range(100):
        r = _say(server, mara, s["id"], f"Turn {i}: I am Tom, I owe you {i} coins. Take me across, please.",
                 seed=i, max_tokens=2)  # the memory is what is tested here, not the replies
        assert r.status_code == 200, (i, r.text)
        prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
    assert max(prompt_tokens) + 2 <= 1024
    got = httpx.get(f"{server.url}/v1/npcs/{mara['id']}/sessions/{s['id']}", timeout=30).json()
    assert len(got["messages"]) == 200  # nothing is dropped: folded turns stay listed
    memory = got["memory"]
    assert memory["folds"] >= 3 and memory["folded_messages"] >= 100 and memory["summary"].strip()
    assert [m["in_memory_only"] for m in got["messages"]].count(True) == memory["folded_messages"]
    assert [m["role"] for m in got["messages"][:2]] == ["user", "assistant"]  # a persona with no greeting
    print(f"\nmemory after 100 turns ({memory['folds']} folds): {memory['summary']!r}")


def test_turns_of_one_session_queue_and_stream(server, mara):
    s = _session(server, mara)
    with cf.ThreadPoolExecutor(2) as ex:
        codes = list(ex.map(lambda t: _say(server, mara, s["id"], t).status_code, ["Hello!", "Where to?"]))
    assert codes == [200, 200]
    with httpx.stream("POST", f"{server.url}/v1/npcs/{mara['id']}/sessions/{s['id']}/messages", timeout=300,
                      json={"content": "Tell me a river tale.", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200
        datas = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    text = "".join((c["delta"].get("content") or "") for d in datas[:-1] for c in json.loads(d)["choices"])
    got = httpx.get(f"{server.url}/v1/npcs/{mara['id']}/sessions/{s['id']}", timeout=30).json()
    contents = [m["content"] for m in got["messages"]]
    assert sorted(contents[0:4:2]) == ["Hello!", "Where to?"] and contents[4:] == ["Tell me a river tale.", text]


def test_session_errors(server, mara, npc_a):
    url = f"{server.url}/v1/npcs/{mara['id']}/sessions"
    assert httpx.get(url + "/sess-nope", timeout=30).status_code == 404
    other = _session(server, npc_a)
    assert httpx.get(url + "/" + other["id"], timeout=30).status_code == 404  # another NPC's session
    assert httpx.post(url, json={"context_tokens": 10}, timeout=30).status_code == 400
    s = _session(server, mara, context_tokens=256)
    r = _say(server, mara, s["id"], "word " * 400)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(f"{url}/{s['id']}/messages", json={"content": ""}, timeout=30).status_code == 400
    assert httpx.delete(f"{url}/{s['id']}", timeout=30).json()["deleted"] is True
    assert httpx.get(f"{url}/{s['id']}", timeout=30).status_code == 404
