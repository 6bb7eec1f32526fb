"""Mixed batches (the default): compact NPCs of one base served together by one mask engine."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import PERSONA_A, PERSONA_B, Server
from test_engines import LONG, _checkpoint, _fresh_engine_output

pytestmark = pytest.mark.slow

PERSONA_C = ("A nervous young wizard's apprentice named Pip who keeps mixing up spells, "
             "worries about exams, and talks fast about potions and owls.")
Q = "\nNow tell me: what would you do first in this town?"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, models_dir):
    srv = Server(tmp_path_factory.mktemp("npc-mixed"), models_dir,
                 extra_env={"NPC_MIXED_BATCHES": "1", "NPC_ENGINE_SLOTS": "1",
                                "NPC_MIXED_BATCH_NPCS": "4", "NPC_MAX_WAITING": "8",
                                "NPC_INSTANT_NPCS": "1"}).start()
    ids = {
        "a": srv.create_npc("Rook", PERSONA_A, sparsity=0.25)["id"],
        "b": srv.create_npc("Bea", PERSONA_B, sparsity=0.5, method="activation-prompt")["id"],
        "c": srv.create_npc("Pip", PERSONA_C, sparsity=0.25, method="activation-prompt")["id"],
    }
    for i in ids.values():
        srv.wait_ready(i)
    yield srv, ids
    srv.stop()


def _chat(srv, npc: str, content: str, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": npc, "temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": content}], **kw})


def _engines(srv) -> list[dict]:
    return httpx.get(srv.url + "/v1/engines").json()["data"]


def _first_token_logprobs(resp: httpx.Response) -> dict[str, float]:
    first = resp.json()["choices"][0]["logprobs"]["content"][0]
    return {t["token"]: t["logprob"] for t in first["top_logprobs"]}


def _gap(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest logprob difference over the tokens both top lists hold (inf: different top tokens)."""
    common = set(a) & set(b)
    if max(a, key=a.get) != max(b, key=b.get) or len(common) < 3:
        return float("inf")
    return max(abs(a[t] - b[t]) for t in common)


def test_npcs_of_any_sparsity_share_one_engine_and_one_batch(mixed):
    srv, ids = mixed
    q = "Who are you, and what do you do all day?"
    kw = {"logprobs": True, "top_logprobs": 5, "max_tokens": 4}
    solo = {k: _first_token_logprobs(_chat(srv, v, q, **kw)) for k, v in ids.items()}
    keys = list(ids) * 3

    with cf.ThreadPoolExecutor(len(keys)) as ex:
        together = list(ex.map(lambda k: _chat(srv, ids[k], q, **kw), keys))
    assert [r.status_code for r in together] == [200] * len(keys)
    # each request got its own NPC's channels inside a shared batch: no mask leaks between NPCs.
    # Greedy text is not batch-invariant (GEMM shapes change with the batch), so compare the
    # first token's top logprobs: equal to the NPC's own within 0.1 nats ...
    for k, r in zip(keys, together):
        assert _gap(_first_token_logprobs(r), solo[k]) < 0.1, (k, _first_token_logprobs(r), solo[k])
    # ... while two different NPCs are further apart than that
    assert _gap(solo["a"], solo["c"]) > 0.1 and _gap(solo["a"], solo["b"]) > 0.1
    engines = _engines(srv)
    assert len(engines) == 1 and engines[0]["mode"] == "mixed"  # 0.25 and 0.5 NPCs, one engine
    assert {n["npc"] for n in engines[0]["npcs"]} == set(ids.values())
    metrics = httpx.get(srv.url + "/metrics").text
    swaps = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("npc_weight_swaps_total")]
    assert sum(swaps) == 0  # nothing was swapped
    loaded = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("npc_npcs_loaded ")]
    assert loaded == [3.0]


@pytest.mark.parametrize("which", ["a", "b"])
def test_mixed_output_equals_a_fresh_engine_of_the_checkpoint(mixed, which):
    """The mixed engine (dense FFN, the NPC's channels masked) computes the NPC's pruned model."""
    srv, ids = mixed
    assert_serves_its_checkpoint(srv, ids[which])


def assert_serves_its_checkpoint(srv, npc_id: str, tie: float = 0.1) -> None:
    """The NPC's greedy tokens through the server are a fresh engine's on its exported checkpoint,
    up to the first position where the two engines' top two tokens are a near-tie. The two sum the
    same products in a different GEMM order (1536 channels with zeros vs the kept ones), so a tie
    can tip either way (NPC b, at 0.5, has one at its third token here); a wrong mask would part
    them at a clear choice."""
    from transformers import AutoTokenizer

    r = _chat(srv, npc_id, LONG + Q, logprobs=True, top_logprobs=2).json()["choices"][0]
    got = r["message"]["content"]
    served = [(t["token"], {x["token"]: x["logprob"] for x in t["top_logprobs"]}) for t in r["logprobs"]["content"]]
    rec = httpx.get(f"{srv.url}/v1/npcs/{npc_id}").json()
    rec["checkpoint"] = _checkpoint(srv, {"id": npc_id})
    tok = AutoTokenizer.from_pretrained(rec["checkpoint"])
    fresh = [(tok.decode([int(t)]), {tok.decode([int(k)]): v for k, v in top.items()})
             for t, top in _fresh_engine_output(rec, Q, top_logprobs=2, trace=True)]
    assert got == "".join(t for t, _ in served)
    i = next((i for i, (a, b) in enumerate(zip(served, fresh)) if a[0] != b[0]), None)
    if i is None:  # the same tokens throughout
        assert len(served) == len(fresh)
        return
    for token, top in (served[i], fresh[i]):
        first, second = sorted(top.values(), reverse=True)[:2]
        assert first - second < tie, (i, served[i], fresh[i])  # a near-tie, not a different model
    assert served[i][0] in fresh[i][1] and fresh[i][0] in served[i][1], (i, served[i], fresh[i])


def test_residency_pin_keep_alive_and_unload(mixed):
    srv, ids = mixed
    r = httpx.post(f"{srv.url}/v1/npcs/{ids['a']}/load", json={"keep_alive": -1, "wait_s": 300}, timeout=300)
    assert r.status_code == 200 and r.json()["keep_alive"] == -1
    npcs = {n["npc"]: n for n in _engines(srv)[0]["npcs"]}
    assert npcs[ids["a"]]["pinned"] is True and npcs[ids["a"]]["expires_at"] is None
    assert _engines(srv)[0]["pinned"] is True

    # keep_alive 0: the NPC's mask leaves the engine right after its request
    assert _chat(srv, ids["b"], "Hello!", keep_alive=0).status_code == 200
    assert ids["b"] not in {n["npc"] for n in _engines(srv)[0]["npcs"]}

    # a short keep_alive: released by the reaper once idle
    assert _chat(srv, ids["c"], "Hello!", keep_alive=1).status_code == 200
    deadline = time.time() + 30
    while ids["c"] in {n["npc"] for n in _engines(srv)[0]["npcs"]}:
        assert time.time() < deadline, _engines(srv)
        time.sleep(0.5)

    r = httpx.post(f"{srv.url}/v1/npcs/{ids['a']}/unload", timeout=60)
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert _engines(srv)[0]["npcs"] == [] and _engines(srv)[0]["pinned"] is False
    # and it serves again, the same answer, after the unload
    assert _chat(srv, ids["a"], "Hello!").status_code == 200


def test_a_flood_gets_429_with_retry_after_never_a_hang(mixed):
    srv, ids = mixed
    keys = list(ids) * 10  # 30 at once; the engine takes NPC_MIXED_BATCH_NPCS + NPC_MAX_WAITING = 12

    with cf.ThreadPoolExecutor(len(keys)) as ex:
        rs = list(ex.map(lambda k: _chat(srv, ids[k], "Tell me a long story about your life.", max_tokens=48), keys))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(200) >= 4, codes
    limited = [r for r in rs if r.status_code == 429]
    assert limited and all(r.headers.get("retry-after") for r in limited)
    assert "NPC_MAX_WAITING" in limited[0].json()["error"]["message"]
    assert _chat(srv, ids["a"], "Hello!").status_code == 200  # and it serves on afterwards


def test_keep_alive_given_at_creation_pins_and_survives_a_restart(mixed):
    srv, ids = mixed
    rec = srv.create_npc("Dora", "A stern lighthouse keeper named Dora who counts ships and distrusts gulls.",
                         sparsity=0.25, keep_alive="pin")
    assert rec["keep_alive"] == -1
    srv.wait_ready(rec["id"])

    def pinned_in_engine() -> bool:
        return any(n["npc"] == rec["id"] and n["pinned"] for e in _engines(srv) for n in e.get("npcs", []))

    def wait(cond, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not cond():
            assert time.time() < deadline, f"{what}: {_engines(srv)}"
            time.sleep(0.5)

    wait(pinned_in_engine, "a pinned NPC is loaded once ready, without a chat")
    # the latest keep_alive given is remembered on the record
    assert _chat(srv, ids["a"], "Hi", keep_alive="2m").status_code == 200
    assert httpx.get(f"{srv.url}/v1/npcs/{ids['a']}").json()["keep_alive"] == 120

    srv.stop()
    srv.start()
    wait(pinned_in_engine, "after a restart the pin is back")
    assert httpx.get(f"{srv.url}/v1/npcs/{rec['id']}").json()["keep_alive"] == -1
    # an explicit unload ends the pin for good
    assert httpx.post(f"{srv.url}/v1/npcs/{rec['id']}/unload", timeout=60).json()["unloaded"] is True
    assert httpx.get(f"{srv.url}/v1/npcs/{rec['id']}").json()["keep_alive"] is None


def test_bad_keep_alive_at_creation_is_a_400(mixed):
    srv, _ = mixed
    r = httpx.post(srv.url + "/v1/npcs", json={"name": "X", "persona": "a cat", "keep_alive": "soon"}, timeout=30)
    assert r.status_code == 400 and "keep_alive" in r.text


def test_channel_scales_ride_the_mask(mixed):
    """A persona-pruner NPC learns a scale per kept channel: the mixed engine multiplies it in with
    the mask (bf16) and answers like a fresh engine of the exported checkpoint, which folds it
    into down_proj."""
    srv, _ = mixed
    rec = srv.create_npc("Rook II", PERSONA_A, sparsity=0.25, method="persona-pruner",
                         options={"profile": "fast", "scale_lr": 0.05})
    rec = srv.wait_ready(rec["id"], timeout=900)
    ckpt = _checkpoint(srv, rec)
    scales = json.loads((Path(ckpt) / "manifest.json").read_text())["channel_scales"]
    assert max(abs(x - 1) for layer in scales for x in layer) > 0.05
    r = _chat(srv, rec["id"], LONG + Q, logprobs=True, top_logprobs=5, max_tokens=1)
    assert r.status_code == 200 and _engines(srv)[0]["mode"] == "mixed"
    want = _fresh_engine_output(rec | {"checkpoint": ckpt}, Q, top_logprobs=5)
    # same top token; logprobs within 0.2 nats: the engines' logits are bf16, whose steps are 0.125
    # at these magnitudes, and the mask rounds x * scale where the checkpoint rounds W * scale
    assert _gap(_first_token_logprobs(r), want) < 0.2, (_first_token_logprobs(r), want)


def _serving(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers["x-npc-serving"]


def test_prompt_only_npc_and_instant_npc_switch_to_their_pruned_mask(mixed):
    """sparsity 0 is a prompt-only NPC (ready at once, no job); an NPC whose prune still runs chats
    at once on the dense base with its persona prompt, and its pruned mask takes over between
    requests: no failed request, never back to the prompt, and the pruned answers are the mask's."""
    srv, _ = mixed
    persona = "A gruff dwarven miner named Brok who counts every coin and distrusts elves."
    kw = {"logprobs": True, "top_logprobs": 5, "max_tokens": 4}
    q = "Who are you, and what do you do all day?"
    prompt_only = srv.create_npc("Brok", persona, sparsity=0)
    assert (prompt_only["status"], prompt_only["serving"], prompt_only["method"]) == ("ready", "prompt", "prompt")
    r = _chat(srv, prompt_only["id"], q, **kw)
    assert _serving(r) == "prompt"
    dense = _first_token_logprobs(r)

    npc = srv.create_npc("Brok", persona, sparsity=0.5, method="activation-prompt")
    assert npc["status"] == "queued" and npc["serving"] == "prompt"
    seen, deadline = [], time.time() + 300
    while time.time() < deadline:
        r = _chat(srv, npc["id"], q, **kw)
        seen.append((_serving(r), _first_token_logprobs(r)))
        if seen[-1][0] == "pruned" and len(seen) > 1:
            break
    modes = [m for m, _ in seen]
    assert modes[-1] == "pruned" and modes == sorted(modes, key=["prompt", "pruned"].index), modes
    for mode, lp in seen:
        if mode == "prompt":  # the same base and system prompt as the prompt-only NPC
            assert _gap(lp, dense) < 0.1, (lp, dense)
        else:  # its own mask (a stale all-ones adapter would give the dense answer)
            assert _gap(lp, dense) > 0.1, (lp, dense)
    assert srv_get(srv, npc["id"])["serving"] == "pruned"


def srv_get(srv, npc_id: str) -> dict:
    return httpx.get(f"{srv.url}/v1/npcs/{npc_id}").json()


def test_json_answers_and_a_scene_in_one_mixed_batch(mixed):
    """Grammar-constrained decoding rides the mask engine too, and a scene's round decodes its NPCs
    together (one engine, nothing swapped)."""
    import jsonschema

    srv, ids = mixed
    schema = {"type": "object", "additionalProperties": False, "required": ["mood", "say"],
              "properties": {"mood": {"enum": ["calm", "angry"]}, "say": {"type": "string", "maxLength": 30}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "line", "schema": schema}}
    with cf.ThreadPoolExecutor(3) as ex:
        rs = list(ex.map(lambda k: _chat(srv, ids[k], "How are you?", response_format=fmt, max_tokens=40,
                                         temperature=0.8), ids))
    for r in rs:
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)

    scene = httpx.post(srv.url + "/v1/scenes", json={"npcs": list(ids.values()), "setting": "A market."},
                       timeout=30).json()["id"]
    out = httpx.post(f"{srv.url}/v1/scenes/{scene}/turns", json={"auto": 3, "max_tokens": 8, "stream": False},
                     timeout=300).json()
    assert sorted(x["speaker"] for x in out["lines"]) == sorted(ids.values())
    assert all(x["completion_tokens"] > 0 for x in out["lines"])
    engines = _engines(srv)
    assert len(engines) == 1 and engines[0]["mode"] == "mixed"
