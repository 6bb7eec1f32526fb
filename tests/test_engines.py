"""Engine sharing: NPCs of one shape swap into one warm engine, and outputs stay exact."""

from __future__ import annotations

import json
import time
from pathlib import Path
import subprocess
import sys
import textwrap

import httpx
import pytest

from service.protocol import ChatCompletionRequest
from service.serving.chat import ChatServing

pytestmark = pytest.mark.slow

# > 128 tokens (the CPU prefix-cache block): a stale prefix cache would replay the other NPC
LONG = ("Listen closely, because I am going to describe the harbour town in detail before I ask. "
        "There is a crooked lighthouse, a fish market that opens at dawn, a tavern with a blue door, "
        "a chapel with a cracked bell, three piers, a shipwright's yard, a bakery that smells of "
        "cinnamon, a customs house full of bored clerks, and a hill with a windmill that never turns. "
        "The streets are narrow and wet, gulls argue on every roof, and the tide comes in fast. "
        "Children race wooden boats in the gutters and old sailors play dice under the awnings. ") * 2


def _chat(server, npc_id: str, question: str) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": npc_id, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": LONG + question}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _fresh_engine_output(rec: dict, question: str, top_logprobs: int = 0, trace: bool = False):
    """Greedy output of a brand-new vLLM engine on this NPC's checkpoint, same prompt tokens
    (with `top_logprobs`: the first token's top logprobs instead, {token text: logprob}; with
    `trace` as well: every generated position's [token id, {token id: logprob}] of its top)."""
    from transformers import AutoTokenizer

    from pruning.engine_args import engine_dtype

    tok = AutoTokenizer.from_pretrained(rec["checkpoint"])
    req = ChatCompletionRequest(model=rec["id"], messages=[{"role": "user", "content": LONG + question}])
    ids = ChatServing.assembled(rec, req, tok).ids
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={rec['checkpoint']!r}, enforce_eager=True, dtype={engine_dtype()!r}, max_model_len=2048,
                      kv_cache_memory_bytes={256 << 20}, seed=0)
            sp = SamplingParams(temperature=0, max_tokens=1 if {top_logprobs} and not {trace} else 24,
                                logprobs={top_logprobs} or None)
            out = llm.generate([{{"prompt_token_ids": {ids!r}}}], sp)[0].outputs[0]
            if {trace}:
                print("RESULT" + json.dumps([[t, {{k: v.logprob for k, v in lp.items()}}]
                                             for t, lp in zip(out.token_ids, out.logprobs)]))
            elif {top_logprobs}:
                print("RESULT" + json.dumps({{lp.decoded_token: lp.logprob for lp in out.logprobs[0].values()}}))
            else:
                print("RESULT" + json.dumps(out.text))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


def test_swaps_are_exact(server, npc_a, npc_b):
    q = "\nNow tell me: what would you do first in this town?"
    a1 = _chat(server, npc_a["id"], q)
    b1 = _chat(server, npc_b["id"], q)
    a2 = _chat(server, npc_a["id"], q)
    b2 = _chat(server, npc_b["id"], q)
    a3 = _chat(server, npc_a["id"], q)
    assert a1 == a2 == a3
    assert b1 == b2
    assert a1 != b1  # different channels kept: the swap really changed the weights
    engines = _engines_of(server, npc_a, npc_b)
    assert len(engines) == 1  # both NPCs share one engine (same shape)
    # swapped from the compact form: kept indices over the worker's mmapped base, no NPC file read
    assert engines[0]["last_swap"]["mode"] == "compact", engines
    metrics = httpx.get(server.url + "/metrics").text
    swaps = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("npc_weight_swaps_total")]
    assert swaps and swaps[0] >= 4
    # the swapped-in NPC answers exactly as a fresh engine of its own checkpoint does
    b_rec = httpx.get(f"{server.url}/v1/npcs/{npc_b['id']}").json() | {"checkpoint": _checkpoint(server, npc_b)}
    assert _fresh_engine_output(b_rec, q) == b1


def test_checkpoint_without_compact_form_swaps_the_same(server, npc_a, npc_b):
    """An NPC from elsewhere (no kept indices in its manifest) loads from its directory, same output."""
    q = "\nWhich street would you walk down first?"
    a_before = _chat(server, npc_a["id"], q)
    b_compact = _chat(server, npc_b["id"], q)
    manifest = Path(_checkpoint(server, npc_b)) / "manifest.json"
    original = manifest.read_text()
    try:
        m = json.loads(original)
        del m["kept_indices"]
        manifest.write_text(json.dumps(m))
        assert _chat(server, npc_a["id"], q) == a_before
        b_dir = _chat(server, npc_b["id"], q)
        assert _engines_of(server, npc_a, npc_b)[0]["last_swap"]["mode"] == "checkpoint"
        a_after = _chat(server, npc_a["id"], q)  # back to compact: the base's other weights restored
    finally:
        manifest.write_text(original)
    assert b_dir == b_compact
    assert a_after == a_before


def _engines_of(server, *npcs: dict) -> list[dict]:
    """The shared server's engines that hold these NPCs (other test files' prompt-only NPCs may
    have a dense-base engine of their own running beside them)."""
    ids = {n["id"] for n in npcs}
    return [e for e in httpx.get(server.url + "/v1/engines").json()["data"] if e["npc"] in ids]


def _checkpoint(server, npc: dict) -> str:
    return str(server.data_dir / "npcs" / npc["id"])


def test_concurrent_chats_to_two_npcs_all_complete(server, npc_a, npc_b):
    import concurrent.futures as cf

    def one(i: int) -> int:
        npc = (npc_a, npc_b)[i % 2]["id"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "model": npc, "max_tokens": 8, "messages": [{"role": "user", "content": f"Say hello #{i}"}]})
        return r.status_code

    with cf.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(one, range(12)))
    assert codes == [200] * 12


def _live_children(pid):
    """(process, command line + name) of every live descendant; an engine that just stopped can
    linger as a zombie until its parent reaps it, and a zombie has no command line to read."""
    import psutil

    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append((p, " ".join(p.cmdline()) + " " + p.name()))
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return out


def test_load_unload_and_engine_death(server, npc_a, npc_b):
    r = httpx.post(f"{server.url}/v1/npcs/{npc_b['id']}/load", json={"wait_s": 300}, timeout=300)
    assert r.status_code == 200 and r.json()["loaded"] is True
    engines = _engines_of(server, npc_a, npc_b)
    assert [e["npc"] for e in engines] == [npc_b["id"]]

    # kill the engine's core process: requests get a clear error or a restarted engine, never a hang
    cores = [p for p, cmd in _live_children(server.proc.pid) if "EngineCore" in cmd]
    assert cores, [cmd for _, cmd in _live_children(server.proc.pid)]
    for p in cores:
        p.kill()
    time.sleep(2)
    body = {"model": npc_a["id"], "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    first = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert first.status_code in (200, 503), first.text
    if first.status_code == 503:
        assert "engine" in first.json()["error"]["message"].lower()
    again = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert again.status_code == 200, again.text

    r = httpx.post(f"{server.url}/v1/npcs/{npc_a['id']}/unload", timeout=60)
    assert r.status_code == 200 and r.json()["unloaded"] is True
    assert _engines_of(server, npc_a, npc_b) == []
    assert httpx.post(f"{server.url}/v1/npcs/{npc_a['id']}/unload").json()["unloaded"] is False

    # with no engine, a load must start one: past wait_s it answers 202 and goes on, and asking
    # again waits for that same load (one engine)
    r = httpx.post(f"{server.url}/v1/npcs/{npc_a['id']}/load", json={"wait_s": 0}, timeout=60)
    assert r.status_code == 202 and r.json()["loaded"] is False, r.text
    r = httpx.post(f"{server.url}/v1/npcs/{npc_a['id']}/load", json={"wait_s": 300}, timeout=300)
    assert r.status_code == 200 and r.json()["loaded"] is True
    assert [e["npc"] for e in _engines_of(server, npc_a, npc_b)] == [npc_a["id"]]
    assert httpx.post(f"{server.url}/v1/npcs/npc-nope/load").status_code == 404
