"""Each API key's share of the engines (NPC_TENANT_MAX_STREAMS), on a real server and engine."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.slow
ALPHA, BETA, ROOT_KEY = "key-a", "key-b", "key-root"


@pytest.fixture(scope="module")
def capped(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("fair"), models_dir,
                 {"NPC_API_KEYS": f"{ALPHA},{BETA}", "NPC_ADMIN_KEYS": ROOT_KEY, "NPC_TENANT_MAX_STREAMS": "1",
                  "NPC_PREWARM": "false"}, args=["--workers", "0"]).start()
    yield srv
    srv.stop()


def _npc(srv, key: str) -> str:
    r = httpx.post(srv.url + "/v1/npcs", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"name": "Fair", "persona": "A patient ferryman.", "sparsity": 0})
    assert r.status_code == 202 and r.json()["status"] == "ready", r.text
    return r.json()["id"]


def test_a_key_past_its_share_gets_429_and_other_keys_do_not(capped):
    a_npc, b_npc = _npc(capped, ALPHA), _npc(capped, BETA)
    a = openai.OpenAI(base_url=capped.url + "/v1", api_key=ALPHA, max_retries=0)
    b = openai.OpenAI(base_url=capped.url + "/v1", api_key=BETA, max_retries=0)
    msgs = [{"role": "user", "content": "Tell me a long story about the river."}]
    a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=2)  # the engine is up
    first = a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=200, stream=True)
    next(iter(first))  # generating now
    with pytest.raises(openai.RateLimitError) as e:
        a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert e.value.body["code"] == "too_many_streams"
    # another key, and an admin, are not held back by this key's stream
    assert b.chat.completions.create(model=b_npc, messages=msgs, max_tokens=2).choices[0].message.content is not None
    admin = openai.OpenAI(base_url=capped.url + "/v1", api_key=ROOT_KEY, max_retries=0)
    admin.chat.completions.create(model=a_npc, messages=msgs, max_tokens=2)
    # a client that goes away mid-stream gives its share back
    first.close()
    for _ in range(150):  # 30 s: generous for a loaded 2-core box
        try:
            a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=2)
            break
        except openai.RateLimitError:
            threading.Event().wait(0.2)
    else:
        pytest.fail("the closed stream's share was never released")
    # a finished stream gives it back too, and a refused request took nothing
    list(a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=3, stream=True))
    assert a.chat.completions.create(model=a_npc, messages=msgs, max_tokens=2).choices
