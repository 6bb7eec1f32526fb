"""End to end on a real `npc serve`: persona -> Redis job -> checkpoint -> vLLM -> OpenAI client."""

from __future__ import annotations

import json

import time

import httpx
import jsonschema
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow


def _validate(schemas: dict, name: str, obj: dict) -> None:
    jsonschema.Draft202012Validator(schemas[name]).validate(obj)


def test_healthz(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


def test_npc_becomes_ready_and_listed(server, npc_a):
    assert npc_a["status"] == "ready" and npc_a["progress"] == 1.0
    assert npc_a["kept_per_layer"] == 1152
    assert npc_a["base"] == "smollm2-135m-instruct" and npc_a["serving"] == "pruned"  # a name, no server path
    ids = [n["id"] for n in httpx.get(server.url + "/v1/npcs").json()["data"]]
    assert npc_a["id"] in ids


def test_npc_list_pages(server, npc_a, npc_b, openai_schemas):
    url = server.url + "/v1/npcs"
    first = httpx.get(url, params={"limit": 1}).json()
    assert len(first["data"]) == 1 and first["has_more"] is True and first["last_id"] == first["data"][0]["id"]
    rest = httpx.get(url, params={"limit": 1000, "after": first["last_id"]}).json()
    every = [n["id"] for n in httpx.get(url, params={"limit": 1000}).json()["data"]]
    assert [first["last_id"], *[n["id"] for n in rest["data"]]] == every and rest["has_more"] is False
    _error(httpx.get(url, params={"after": "npc-nosuchnpc"}), 400, openai_schemas)
    _error(httpx.get(url, params={"limit": 0}), 400, openai_schemas)


def test_models_list(oai, npc_a, server, openai_schemas):
    assert npc_a["id"] in [m.id for m in oai.models.list().data]
    _validate(openai_schemas, "ListModelsResponse", httpx.get(server.url + "/v1/models").json())


def test_chat_non_streamed(oai: OpenAI, npc_a, openai_schemas):
    r = oai.chat.completions.create(model=npc_a["id"], max_tokens=24, temperature=0,
                                    messages=[{"role": "user", "content": "Who are you?"}])
    assert r.choices[0].message.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 20  # persona applied server-side
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    _validate(openai_schemas, "CreateChatCompletionResponse", r.model_dump(exclude_unset=True))


def test_chat_raw_response_validates(server, npc_a, openai_schemas):
    body = {"model": npc_a["id"], "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
            "logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 0.8, "seed": 1}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    data = r.json()
    _validate(openai_schemas, "CreateChatCompletionResponse", data)
    assert [c["index"] for c in data["choices"]] == [0, 1]
    lp = data["choices"][0]["logprobs"]["content"]
    assert lp and len(lp[0]["top_logprobs"]) == 2


def test_chat_streamed(oai: OpenAI, server, npc_a, openai_schemas):
    stream = oai.chat.completions.create(model=npc_a["id"], max_tokens=16, stream=True,
                                         stream_options={"include_usage": True},
                                         messages=[{"role": "user", "content": "Describe your ship."}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    # raw SSE: every data line is a schema-valid chunk, the last is [DONE]
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      json={"model": npc_a["id"], "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "Ahoy!"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    for d in data[:-1]:
        _validate(openai_schemas, "CreateChatCompletionStreamResponse", json.loads(d))


def test_greedy_is_repeatable(oai, npc_a):
    msgs = [{"role": "user", "content": "What do you think of the navy?"}]
    a = oai.chat.completions.create(model=npc_a["id"], max_tokens=20, temperature=0, messages=msgs)
    b = oai.chat.completions.create(model=npc_a["id"], max_tokens=20, temperature=0, messages=msgs)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_min_tokens_holds_off_the_end_of_turn(oai, npc_a):
    """vLLM's `min_tokens` (what an equal-length benchmark sends): an answer that would end early
    runs to min_tokens; above max_tokens it is capped, not an error."""
    msgs = [{"role": "user", "content": "Answer with one word: yes or no?"}]
    short = oai.chat.completions.create(model=npc_a["id"], max_tokens=40, temperature=0, messages=msgs)
    assert short.usage.completion_tokens < 40 and short.choices[0].finish_reason == "stop"
    full = oai.chat.completions.create(model=npc_a["id"], max_tokens=40, temperature=0, messages=msgs,
                                       extra_body={"min_tokens": 40})
    assert full.usage.completion_tokens == 40 and full.choices[0].finish_reason == "length"
    capped = oai.completions.create(model=npc_a["id"], prompt="Yes", max_tokens=8, extra_body={"min_tokens": 99})
    assert capped.usage.completion_tokens == 8


def test_seeded_sampling_survives_a_prefill_in_pieces(oai, npc_a):
    """Six long prompts at once pass a step's 2048 tokens, so some are prefilled in pieces; a seeded,
    sampled request among them made vLLM-CPU rewind its generator, which a CPU generator cannot do,
    and the engine died with every request on it (service/engines/vllm_ext/seeds.py)."""
    from concurrent.futures import ThreadPoolExecutor

    long = "Tell me about the harbour, the ships and the tides there. " * 60

    def chat(seed: int) -> str:
        r = oai.chat.completions.create(model=npc_a["id"], max_tokens=8, temperature=0.9, seed=seed,
                                        messages=[{"role": "user", "content": f"Question {seed}. {long}"}])
        return r.choices[0].message.content

    with ThreadPoolExecutor(6) as ex:
        assert all(isinstance(t, str) for t in ex.map(chat, range(6)))
    assert chat(3) == chat(3)  # alone, a seed still gives the same sample


def _error(r: httpx.Response, status: int, openai_schemas) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    _validate(openai_schemas, "ErrorResponse", body)
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body,param", [
    ({"name": "A", "persona": ""}, "persona"),
    ({"name": "A", "persona": "   "}, "persona"),
    ({"name": "A", "persona": "x" * 4001}, "persona"),
    ({"name": "A", "persona": "a pirate", "sparsity": 0.95}, "sparsity"),
    ({"name": "A", "persona": "a pirate", "sparsity": -1}, "sparsity"),
    ({"name": "A", "persona": "a pirate", "method": "nope"}, "method"),
    ({"name": "", "persona": "a pirate"}, "name"),
    ({"persona": "a pirate"}, "name"),
    ({"name": "A", "persona": "a pirate", "colour": "red"}, "colour"),
])
def test_create_bad_input(server, body, param, openai_schemas):
    err = _error(httpx.post(server.url + "/v1/npcs", json=body), 400, openai_schemas)
    assert err["param"] == param, err


def test_malformed_json(server, openai_schemas):
    r = httpx.post(server.url + "/v1/npcs", content=b'{"name": "A", "persona": ',
                   headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400, openai_schemas)["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"not json",
                   headers={"content-type": "application/json"})
    _error(r, 400, openai_schemas)


def test_create_takes_json_or_a_card_upload_only(server, openai_schemas):
    body = b'{"name": "A", "persona": "a pirate"}'
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        r = httpx.post(server.url + "/v1/npcs", content=body, headers={"content-type": ctype} if ctype else {})
        assert "application/json" in _error(r, 415, openai_schemas)["message"]


def test_oversized_body(server, openai_schemas):
    r = httpx.post(server.url + "/v1/npcs", json={"name": "A", "persona": "x" * (2 << 20)})
    _error(r, 413, openai_schemas)

    def chunks(n: int):  # a chunked body declares no Content-Length: counted while it is read
        for _ in range(n):
            yield b" " * (64 << 10)

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(32), headers={"content-type": "application/json"})
    _error(r, 413, openai_schemas)
    # a card upload may be bigger than other bodies, up to the card limit (8 MiB): a 2 MiB file that
    # is no card reaches the card parser (400), a 9 MiB one does not (413)
    junk = b"\x89PNG\r\n\x1a\n" + b"\0" * (2 << 20)
    r = httpx.post(server.url + "/v1/npcs", files={"card": ("big.png", junk, "image/png")}, timeout=60)
    _error(r, 400, openai_schemas)
    r = httpx.post(server.url + "/v1/npcs", files={"card": ("huge.png", junk * 5, "image/png")}, timeout=60)
    _error(r, 413, openai_schemas)


def test_chat_unknown_npc(server, openai_schemas):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "npc-doesnotexist", "messages": [{"role": "user", "content": "hi"}]})
    assert _error(r, 404, openai_schemas)["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/npcs/npc-doesnotexist").status_code == 404
    assert httpx.delete(server.url + "/v1/npcs/npc-doesnotexist").status_code == 404


def test_chat_bad_messages(server, npc_a, openai_schemas):
    url = server.url + "/v1/chat/completions"
    _error(httpx.post(url, json={"model": npc_a["id"], "messages": []}), 400, openai_schemas)
    _error(httpx.post(url, json={"model": npc_a["id"], "messages": [{"role": "user", "content": "hi"}],
                                 "temperature": 5}), 400, openai_schemas)
    err = _error(httpx.post(url, timeout=60, json={
        "model": npc_a["id"], "messages": [{"role": "user", "content": "word " * 3000}]}), 400, openai_schemas)
    assert "2048" in err["message"]


def test_sparsity_0_is_a_prompt_only_npc_ready_at_once(server):
    rec = server.create_npc("Plain Pat", "A plain-spoken ferryman.", sparsity=0)
    assert (rec["status"], rec["serving"], rec["method"], rec["progress"]) == ("ready", "prompt", "prompt", 1.0)
    assert rec["id"] in {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    # no job: nothing is queued for it, and it stays ready
    time.sleep(1)
    assert httpx.get(f"{server.url}/v1/npcs/{rec['id']}").json()["status"] == "ready"
    assert httpx.delete(f"{server.url}/v1/npcs/{rec['id']}").json()["deleted"] is True


def test_chat_not_ready_is_409_then_delete(server, openai_schemas):
    """With NPC_INSTANT_NPCS=0 (the test server's): an NPC whose prune runs is not served yet."""
    rec = server.create_npc("Baker Bea", "A cheerful baker who loves bread.", sparsity=0.5)
    assert rec["status"] == "queued"
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": rec["id"], "messages": [{"role": "user", "content": "hi"}]})
    assert _error(r, 409, openai_schemas)["code"] == "npc_not_ready"
    r = httpx.delete(f"{server.url}/v1/npcs/{rec['id']}")  # queued or running: cancelled, record kept
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert httpx.get(f"{server.url}/v1/npcs/{rec['id']}").json()["status"] == "cancelled"
    r = httpx.delete(f"{server.url}/v1/npcs/{rec['id']}")  # then removed
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/npcs/{rec['id']}").status_code == 404


def test_metrics_count_chat(server, npc_a, oai):
    oai.chat.completions.create(model=npc_a["id"], max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(server.url + "/metrics").text
    label = f'npc="{npc_a["id"]}"'
    for name in ("npc_requests_total", "npc_completion_tokens_total", "npc_time_to_first_token_seconds_bucket",
                 "npc_e2e_request_latency_seconds_count"):
        assert any(line.startswith(name) and label in line for line in text.splitlines()), name


def test_an_io_error_opening_a_checkpoint_is_a_503_and_the_npc_stays_ready(server, npc_a, openai_schemas):
    """Only bytes that fail their hash mark an NPC failed; an I/O error (here: the manifest path is
    a directory, so reading it raises IsADirectoryError) is a 503 to retry, and the NPC serves again
    once the fault is gone."""
    ckpt = server.data_dir / "npcs" / npc_a["id"]
    manifest, aside = ckpt / "manifest.json", ckpt / "manifest.json.aside"
    manifest.rename(aside)
    try:
        manifest.mkdir()
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": npc_a["id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        err = _error(r, 503, openai_schemas)
        assert err["code"] == "checkpoint_unavailable" and r.headers["retry-after"]
        assert str(ckpt) not in err["message"]
        assert httpx.get(f"{server.url}/v1/npcs/{npc_a['id']}").json()["status"] == "ready"
    finally:
        manifest.rmdir()
        aside.rename(manifest)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"model": npc_a["id"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
