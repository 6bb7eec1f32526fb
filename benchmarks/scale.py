"""The control plane with many NPC records: listing pages, /metrics scrapes and chat routing.

    .venv/bin/python -m benchmarks.scale                 # 100,000 records vs 1,000 -> docs/scale.md

For each size, a fresh embedded Redis is filled with that many records through the store (90 %
ready, 5 % failed, 5 % queued; written as the API writes them, so the counts and indexes are the
ones a real server keeps), then one `npc serve --workers 0` answers `--requests` sequential calls
of each kind: `GET /v1/npcs?limit=100` (first pages and pages deep in the list), `GET /metrics`,
`GET /v1/npcs/{id}`, and a chat request for a failed NPC (the route, auth, record lookup and
refusal: everything before an engine). Latency p50 / p95 / max per kind, the smaller size as the
reference a small server would see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import ROOT, default_base
from service import redis_embedded
from service.api.deps import tenant_of
from service.devserver import Server
from service.npcs.records import NpcStore

BIG, SMALL, ADMIN = "key-big", "key-small", "key-admin"
SMALL_NPCS = 50  # the small tenant's NPCs, spread among the big one's


async def fill(url: str, n: int, seed: int = 0) -> dict[str, list[str]]:
    from redis.asyncio import Redis

    rng = random.Random(seed)
    r = Redis.from_url(url)
    store = NpcStore(r)
    ids: dict[str, list[str]] = {"ready": [], "failed": [], "queued": []}
    small = set(rng.sample(range(n), min(SMALL_NPCS, n)))
    try:
        for start in range(0, n, 500):
            batch = []
            for i in range(start, min(n, start + 500)):
                x = rng.random()
                status = "ready" if x < 0.9 else "failed" if x < 0.95 else "queued"
                npc_id = f"npc-{i:012x}"
                ids[status].append(npc_id)
                batch.append(store.create({"id": npc_id, "name": f"NPC {i}", "persona": "A villager of the valley.",
                                           "sparsity": 0.25, "method": "persona-pruner", "base": default_base().name,
                                           "status": status, "stage": status, "error": "x" if status == "failed" else None,
                                           "owner": tenant_of(SMALL if i in small else BIG)}))
            await asyncio.gather(*batch)
    finally:
        await r.aclose()
    return ids


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_ms": round(1000 * statistics.median(xs), 2), "p95_ms": round(1000 * xs[int(0.95 * (len(xs) - 1))], 2),
            "max_ms": round(1000 * xs[-1], 2), "n": len(xs)}


def measure(n: int, requests: int, tmp: Path) -> dict:
    proc, url = redis_embedded.start(tmp / f"redis-{n}")
    try:
        t0 = time.time()
        ids = asyncio.run(fill(url, n))
        fill_s = time.time() - t0
        env = {"REDIS_URL": url, "NPC_PREWARM": "false", "NPC_API_KEYS": f"{BIG},{SMALL}", "NPC_ADMIN_KEYS": ADMIN}
        server = Server(tmp / f"data-{n}", default_base().parent, env, args=["--workers", "0"]).start()
        try:
            rng = random.Random(1)
            c = httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"})
            small = {"Authorization": f"Bearer {SMALL}"}
            everyone = ids["ready"] + ids["failed"] + ids["queued"]
            calls = {
                "list first page": lambda: c.get("/v1/npcs", params={"limit": 100}),
                "list deep page": lambda: c.get("/v1/npcs", params={"limit": 100, "after": rng.choice(everyone)}),
                f"a small tenant's page ({SMALL_NPCS} NPCs)": lambda: c.get("/v1/npcs", params={"limit": 100},
                                                                             headers=small),
                "a small tenant's /v1/models": lambda: c.get("/v1/models", headers=small),
                "metrics scrape (admin key)": lambda: c.get("/metrics"),
                "get one record": lambda: c.get(f"/v1/npcs/{rng.choice(everyone)}"),
                "chat routing (failed NPC)": lambda: c.post("/v1/chat/completions", json={
                    "model": rng.choice(ids["failed"]), "messages": [{"role": "user", "content": "hi"}]}),
            }
            seen = c.get("/v1/npcs", params={"limit": 100}, headers=small).json()["data"]
            assert len(seen) == min(SMALL_NPCS, n), len(seen)  # the small tenant sees its own, all of them
            out = {}
            for name, call in calls.items():
                call()  # warm
                times = []
                for _ in range(requests):
                    t = time.perf_counter()
                    r = call()
                    times.append(time.perf_counter() - t)
                    assert r.status_code in (200, 409), (name, r.status_code, r.text[:300])
                out[name] = _stats(times)
            return {"records": n, "fill_s": round(fill_s, 1), "calls": out}
        finally:
            server.stop()
    finally:
        redis_embedded.stop(proc)


def write_md(results: list[dict], out: Path, cmd: str, seconds: float) -> None:
    names = list(results[0]["calls"])
    L = ["# The control plane with many NPC records (`benchmarks/scale.py`)", "",
         f"Generated {time.strftime('%Y-%m-%d')} by `python -m benchmarks.scale{' ' + cmd if cmd else ''}` "
         f"({seconds:.0f} s) on this "
         "2-core box: sequential requests from one client to one `npc serve --workers 0` on an embedded Redis "
         "(records written through the store, 90 % ready / 5 % failed / 5 % queued; all but 50 of one tenant, "
         "the 50 of another, read with an admin key unless named). Target (issue 22): under 100 ms "
         "p95 at 100,000 records.", "",
         "| call | " + " | ".join(f"{r['records']:,} records p50 / p95 / max (ms)" for r in results) + " |",
         "|---" * (len(results) + 1) + "|"]
    for name in names:
        L.append(f"| {name} | " + " | ".join(
            f"{r['calls'][name]['p50_ms']} / {r['calls'][name]['p95_ms']} / {r['calls'][name]['max_ms']}" for r in results)
            + " |")
    L += ["", "Filling Redis: " + ", ".join(f"{r['records']:,} records in {r['fill_s']} s" for r in results) + ".",
          "", "Raw numbers: `scale.json`."]
    (out / "scale.md").write_text("\n".join(L) + "\n")
    (out / "scale.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", default="1000,100000", help="comma-separated record counts")
    ap.add_argument("--requests", type=int, default=200, help="requests of each kind per size")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(int(n), a.requests, Path(tmp)) for n in a.records.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_md(results, out, " ".join(sys.argv[1:]), time.time() - t0)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
