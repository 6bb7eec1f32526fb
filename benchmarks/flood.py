"""One tenant floods the server with creates and chats; another tenant's chats keep their latency.

    .venv/bin/python -m benchmarks.flood                  # -> docs/flood.md and docs/flood.json

For each per-key cap (`--caps`, NPC_TENANT_MAX_STREAMS; 10000: none), one `npc serve --workers 0`
with the product's serving defaults (mixed engines, instant NPCs) and two API keys. Tenant B (the
victim) has one NPC and sends `--requests` streaming chats one after another; its TTFT is measured
alone first, then while tenant A floods: `--flood-clients` streaming chat clients round-robin over A's
NPCs (a refused one waits the Retry-After, as the openai client does), and a loop creating NPCs as fast
as the server answers (their jobs queue: no worker runs here, so the CPU the engines use is what is
measured; a pruning worker belongs on a GPU host). Every NPC is prompt-served, so nothing is pruned
before the run.

Reported per cap: B's TTFT p50/p95 alone and under the flood, the p95 ratio (the target: <= 2x), B's
errors, and how A's chats and creates were answered (200 or 202 / 429 counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import ROOT
from service.devserver import Server, default_models_dir

A, B = "key-flooder", "key-victim"
NO_CAP = 10_000
QUESTIONS = ["What do you do all day?", "Tell me about the place you live.", "What are you afraid of?",
             "Who is your oldest friend?", "What would you change about the world?", "Describe your morning."]


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)] if xs else float("nan")


async def chat(client: httpx.AsyncClient, url: str, key: str, npc: str, k: int, max_tokens: int) -> tuple[int, float]:
    """One streamed chat: (status, seconds to the first content token, or to the answer when refused)."""
    body = {"model": npc, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": k,
            "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]}
    t = time.time()
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, time.time() - t
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:") and '"content":"' in line.replace(" ", "") \
                    and '"content":""' not in line.replace(" ", ""):
                first = time.time() - t
        return 200, first if first is not None else time.time() - t


async def victim(url: str, npc: str, n: int, max_tokens: int) -> dict:
    ttft, errors = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        for k in range(n):
            status, s = await chat(client, url, B, npc, k, max_tokens)
            (ttft if status == 200 else errors).append(s if status == 200 else status)
    return {"ttft_p50": statistics.median(ttft) if ttft else None, "ttft_p95": _p95(ttft), "ok": len(ttft),
            "errors": errors}


async def flood(url: str, npcs: list[str], clients: int, max_tokens: int, stop: asyncio.Event) -> dict:
    counts: dict[str, dict[str, int]] = {"chat": {}, "create": {}}

    def count(kind: str, status: int) -> None:
        counts[kind][str(status)] = counts[kind].get(str(status), 0) + 1

    async def chatter(client, j: int) -> None:
        k = j
        while not stop.is_set():
            status, s = await chat(client, url, A, npcs[k % len(npcs)], k, max_tokens)
            count("chat", status)
            if status != 200:  # the server's Retry-After (1 s), as the openai client honours it
                await asyncio.sleep(1.0)
            k += clients

    async def creator(client) -> None:
        i = 0
        while not stop.is_set():
            r = await client.post(url + "/v1/npcs", headers={"Authorization": f"Bearer {A}"},
                                  json={"name": f"Flood {i}", "persona": f"A villager, number {i}, who gossips.",
                                        "sparsity": 0.25})
            count("create", r.status_code)
            i += 1
            if r.status_code != 202:
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(creator(client), *(chatter(client, j) for j in range(clients)))
    return counts


async def flooded(url: str, victim_npc: str, flood_npcs: list[str], args) -> tuple[dict, dict]:
    stop = asyncio.Event()
    task = asyncio.create_task(flood(url, flood_npcs, args.flood_clients, args.max_tokens, stop))
    await asyncio.sleep(args.ramp_s)  # the flood's streams are decoding before the victim starts
    v = await victim(url, victim_npc, args.requests, args.max_tokens)
    stop.set()
    return v, await task


def run(args, cap: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="npc-flood-") as tmp:
        env = {"NPC_API_KEYS": f"{A},{B}", "NPC_TENANT_MAX_STREAMS": str(cap)}
        for kv in args.env:
            k, _, v = kv.partition("=")
            env[k] = v
        srv = Server(Path(tmp), default_models_dir(), env, args=["--workers", "0"], base_env={}).start()
        try:
            def make(key: str, name: str) -> str:
                r = httpx.post(srv.url + "/v1/npcs", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                               json={"name": name, "persona": f"{name}, a character of the valley.", "sparsity": 0})
                r.raise_for_status()
                return r.json()["id"]

            v_npc = make(B, "Victim Vera")
            f_npcs = [make(A, f"Flooder {i}") for i in range(args.flood_npcs)]
            asyncio.run(victim(srv.url, v_npc, 3, args.max_tokens))  # engines up, caches warm
            solo = asyncio.run(victim(srv.url, v_npc, args.requests, args.max_tokens))
            under, counts = asyncio.run(flooded(srv.url, v_npc, f_npcs, args))
        finally:
            srv.stop()
    return {"cap": cap, "solo": solo, "flood": under, "flooder": counts,
            "ratio_p95": under["ttft_p95"] / solo["ttft_p95"]}


def report(runs: list[dict], args) -> str:
    rows = []
    for r in runs:
        s, f, c = r["solo"], r["flood"], r["flooder"]
        cap = "none" if r["cap"] >= NO_CAP else str(r["cap"])
        rows.append(f"| {cap} | {s['ttft_p50']:.3f} / {s['ttft_p95']:.3f} | {f['ttft_p50']:.3f} / {f['ttft_p95']:.3f} "
                    f"| **{r['ratio_p95']:.2f}x** | {len(f['errors'])} | {c['chat'].get('200', 0)} / "
                    f"{c['chat'].get('429', 0)} | {c['create'].get('202', 0)} / {c['create'].get('429', 0)} |")
    return "\n".join([
        "# One tenant's flood against another tenant's chats",
        "",
        f"`python -m benchmarks.flood --caps {','.join(str(r['cap']) for r in runs)}`: for each cap, one "
        "`npc serve --workers 0` with the product's serving defaults and two API keys. Tenant B sends "
        f"{args.requests} streaming chats one after another to its NPC, alone and then while tenant A runs "
        f"{args.flood_clients} streaming chat clients over {args.flood_npcs} NPCs (each waits the 429's "
        "Retry-After, as the openai client does) and a loop of creates; max_tokens "
        f"{args.max_tokens}. Extra settings: {', '.join(args.env) or 'none'}. The cap is "
        "`NPC_TENANT_MAX_STREAMS`, each key's requests generating at once. Target: B's p95 TTFT under the "
        "flood <= 2x alone.",
        "",
        "| cap | B alone: TTFT p50 / p95 s | B under A's flood | p95 ratio | B errors | A chats 200 / 429 "
        "| A creates 202 / 429 |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caps", default=f"{NO_CAP},8,4", help=f"NPC_TENANT_MAX_STREAMS of each run ({NO_CAP}: none)")
    ap.add_argument("--requests", type=int, default=30, help="tenant B's chats in each phase")
    ap.add_argument("--flood-clients", type=int, default=32)
    ap.add_argument("--flood-npcs", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ramp-s", type=float, default=5.0)
    ap.add_argument("--env", action="append", default=[], help="NPC_*=value for the server (repeatable)")
    ap.add_argument("--no-doc", dest="doc", action="store_false")
    args = ap.parse_args()
    runs = [run(args, int(c)) for c in args.caps.split(",")]
    print(report(runs, args))
    if args.doc:
        (ROOT / "docs" / "flood.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
        (ROOT / "docs" / "flood.md").write_text(report(runs, args))


if __name__ == "__main__":
    main()
