"""Scenes on the real server: NPCs speak in turns, each in its own persona, hearing the others."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cast(server) -> list[dict]:
    return [server.create_npc(name, persona, sparsity=0) for name, persona in (
        ("Bram Ironfoot", "A dwarf smith, gruff and proud of his forge."),
        ("Lise Vane", "An elven archer who mocks dwarves and loves the forest."),
        ("Odo Finch", "A nervous halfling cook who worries about supper."))]


def test_a_scene_turns_addressed_first_then_round_robin(server, cast):
    ids = [n["id"] for n in cast]
    r = httpx.post(server.url + "/v1/scenes", timeout=30,
                   json={"npcs": ids, "setting": "A tavern on a stormy night.", "user": "Tom"})
    assert r.status_code == 201, r.text
    scene = r.json()["id"]
    turn = f"{server.url}/v1/scenes/{scene}/turns"

    out = httpx.post(turn, timeout=300, json={"speaker": "player", "content": "Lise, what do you think of Bram?",
                                              "stream": False, "max_tokens": 12}).json()
    assert [x["speaker"] for x in out["lines"]] == ["player", ids[1]]
    assert out["lines"][1]["content"]

    # four NPC turns, streamed: round-robin after the last speaker, deltas then a line_done each
    events = []
    with httpx.stream("POST", turn, json={"auto": 4, "max_tokens": 8}, timeout=300) as resp:
        assert resp.status_code == 200
        kind = None
        for line in resp.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    done = sorted((d for k, d in events if k == "line_done"), key=lambda d: d["index"])  # a round ends in any order
    assert [d["speaker"] for d in done] == [ids[2], ids[0], ids[1], ids[2]]
    for d in done:  # what streamed is what was kept
        assert d["content"] == "".join(e["delta"] for k, e in events if k == "line" and e["index"] == d["index"]).strip()
    assert events[-1][0] == "done"

    kept = httpx.get(f"{server.url}/v1/scenes/{scene}", timeout=30).json()["lines"]
    assert [x["speaker"] for x in kept] == ["player", ids[1], ids[2], ids[0], ids[1], ids[2]]
    assert [x["content"] for x in kept[2:]] == [d["content"] for d in done]

    # an NPC named as the next speaker, and a scripted line
    out = httpx.post(turn, timeout=300, json={"speaker": ids[0], "stream": False, "max_tokens": 6}).json()
    assert [x["speaker"] for x in out["lines"]] == [ids[0]]
    out = httpx.post(turn, timeout=60, json={"speaker": ids[2], "content": "Supper is ready!", "stream": False}).json()
    assert out["lines"] == [{"index": 7, "speaker": ids[2], "content": "Supper is ready!", "name": "Odo Finch"}]
    assert all(d["completion_tokens"] > 0 for d in done)


def test_scene_errors(server, cast):
    ids = [n["id"] for n in cast]
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=30)  # noqa: E731
    assert post("/v1/scenes", {"npcs": [ids[0], ids[0]], "setting": "x"}).status_code == 400
    assert post("/v1/scenes", {"npcs": [ids[0], "npc-nope"], "setting": "x"}).status_code == 404
    scene = post("/v1/scenes", {"npcs": ids[:2], "setting": "A road."}).json()["id"]
    r = post(f"/v1/scenes/{scene}/turns", {"speaker": ids[2]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "speaker"
    assert post(f"/v1/scenes/{scene}/turns", {"speaker": "player"}).status_code == 400
    assert post(f"/v1/scenes/{scene}/turns", {}).status_code == 400
    assert post("/v1/scenes/scene-nope/turns", {"auto": 1}).status_code == 404
