"""Scene benchmark: a 4-NPC scene of 8 turns against 4 independent chats of 2 turns each, on one
server and one engine budget, same NPCs, same reply length. Tokens/s is completion tokens over
wall time; the two alternate `--rounds` times and the median of each is reported.

    .venv/bin/python -m benchmarks.scenes [--tokens 48] [--rounds 3] [--sparsity 0]

A scene speaks in rounds (every NPC once, decoded together); the chats are what a game would run
instead: one conversation per NPC, each waiting for its own reply before the next.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from service.devserver import Server, default_models_dir

CAST = [("Bram Ironfoot", "A dwarf smith, gruff and proud of his forge, who hates the rain."),
        ("Lise Vane", "An elven archer who mocks dwarves and loves the old forest."),
        ("Odo Finch", "A nervous halfling cook who worries about supper and the larder."),
        ("Mara Quill", "A sharp-tongued travelling scribe who collects rumours and sells maps.")]
SETTING = "A crowded tavern on a stormy night; a stranger has just come in, dripping wet."
LINES = ["Who are you, stranger?", "What news from the road?"]


def scene_run(url: str, ids: list[str], tokens: int, seed: int) -> tuple[int, float]:
    scene = httpx.post(url + "/v1/scenes", json={"npcs": ids, "setting": SETTING}, timeout=60).json()["id"]
    t0 = time.perf_counter()
    out = httpx.post(f"{url}/v1/scenes/{scene}/turns", timeout=900, json={
        "auto": 2 * len(ids), "max_tokens": tokens, "temperature": 0.8, "seed": seed, "stream": False}).json()
    wall = time.perf_counter() - t0
    return sum(x["completion_tokens"] for x in out["lines"]), wall


def chats_run(url: str, ids: list[str], tokens: int, seed: int) -> tuple[int, float]:
    def one(npc: str) -> int:
        msgs, used = [{"role": "system", "content": SETTING}], 0
        for line in LINES:
            msgs.append({"role": "user", "content": line})
            r = httpx.post(url + "/v1/chat/completions", timeout=900, json={
                "model": npc, "messages": msgs, "max_tokens": tokens, "temperature": 0.8, "seed": seed}).json()
            msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            used += r["usage"]["completion_tokens"]
        return used

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(ids)) as ex:
        used = sum(ex.map(one, ids))
    return used, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.0, help="0: prompt-only NPCs (no prune job)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp), default_models_dir(), base_env={}).start(timeout=300)
        try:
            ids = [srv.wait_ready(srv.create_npc(n, p, sparsity=args.sparsity)["id"], timeout=3600)["id"]
                   for n, p in CAST]
            scene_run(srv.url, ids, 8, 0)  # warm-up: engine start, adapters loaded, batch shapes
            chats_run(srv.url, ids, 8, 0)
            rows = {"scene": [], "chats": []}
            for k in range(args.rounds):
                for name, run in (("scene", scene_run), ("chats", chats_run)):
                    n, wall = run(srv.url, ids, args.tokens, k + 1)
                    rows[name].append({"tokens": n, "seconds": round(wall, 2), "tok_s": round(n / wall, 2)})
        finally:
            srv.stop()
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in rows.items()}
    print(json.dumps({"runs": rows, "median_tok_s": med, "scene_vs_chats": round(med["scene"] / med["chats"], 3),
                      "tokens": args.tokens, "sparsity": args.sparsity}, indent=1))


if __name__ == "__main__":
    main()
