"""/v1/completions with the official openai client; client disconnects abort generation."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def test_completion_basic(oai, npc_a):
    r = oai.completions.create(model=npc_a["id"], prompt="The pirate raised his mug and said", max_tokens=12,
                               temperature=0, user="player-1")
    assert r.object == "text_completion" and r.model == npc_a["id"]
    assert len(r.choices) == 1 and r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens < 12  # raw text: no persona, no chat template (a chat is > 20)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = oai.completions.create(model=npc_a["id"], prompt="The pirate raised his mug and said",
                                   max_tokens=12, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_completion_options(oai, npc_a):
    r = oai.completions.create(model=npc_a["id"], prompt=["Once upon a time", "The ship sailed"], n=2,
                               max_tokens=6, temperature=0.9, seed=7, logprobs=2, presence_penalty=0.5,
                               frequency_penalty=0.5, top_p=0.9)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    # the same seed, one request at a time (the same batch shape): the same sampled text
    seeded = [oai.completions.create(model=npc_a["id"], prompt="Once upon a time", max_tokens=12, temperature=0.9,
                                     seed=7, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9).choices[0].text
              for _ in range(2)]
    assert seeded[0] and seeded[0] == seeded[1]

    e = oai.completions.create(model=npc_a["id"], prompt="Ahoy", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text.startswith("Ahoy")
    s = oai.completions.create(model=npc_a["id"], prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert " 7" not in s.choices[0].text


def test_completion_stream(oai, npc_a, server):
    chunks = list(oai.completions.create(model=npc_a["id"], prompt="The old sailor said", max_tokens=10,
                                         temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    full = oai.completions.create(model=npc_a["id"], prompt="The old sailor said", max_tokens=10, temperature=0)
    assert text == full.choices[0].text
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    with httpx.stream("POST", server.url + "/v1/completions", timeout=300,
                      json={"model": npc_a["id"], "prompt": "Hi", "max_tokens": 4, "stream": True}) as r:
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]" and all(json.loads(d)["object"] == "text_completion" for d in data[:-1])


def test_completion_errors(oai, npc_a, server):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="npc-nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=npc_a["id"], prompt="word " * 3000, max_tokens=2)
    assert "2048" in e.value.body["message"]
    for bad in ({"prompt": []}, {"prompt": "x", "best_of": 3}, {"prompt": "x", "suffix": "y"},
                {"prompt": "x", "logprobs": 9}, {"prompt": [10**9]}, {"prompt": "x", "temperature": 3}):
        r = httpx.post(server.url + "/v1/completions", json={"model": npc_a["id"], **bad}, timeout=60)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["message"]


def _in_flight(server) -> int:
    return sum(e["in_flight"] for e in httpx.get(server.url + "/v1/engines").json()["data"])


def _cancelled(server, npc: str) -> float:
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return sum(float(x.split()[-1]) for x in lines
               if x.startswith("npc_requests_total") and f'npc="{npc}"' in x and 'status="cancelled"' in x)


def _wait_idle(server, seconds: float) -> None:
    deadline = time.time() + seconds
    while _in_flight(server):
        assert time.time() < deadline, httpx.get(server.url + "/v1/engines").json()
        time.sleep(0.2)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Tell a very long story:"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell a very long story."}]}),
])
def test_disconnect_aborts(server, npc_a, path, body):
    # ~1900 tokens would take tens of seconds; a closed connection must free the slot at once
    body = {"model": npc_a["id"], "max_tokens": 1900, "temperature": 1.0, **body}
    before = _cancelled(server, npc_a["id"])
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    _wait_idle(server, 5)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + path, json=body, timeout=2)
    _wait_idle(server, 5)
    assert _cancelled(server, npc_a["id"]) == before + 2
