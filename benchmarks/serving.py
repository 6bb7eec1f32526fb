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
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import ROOT
from benchmarks.serving_report import BASELINE, plots, report, write_doc
from service.devserver import DEFAULT_BASE, Server, default_models_dir

ROLES = ["pirate captain", "village baker", "blacksmith", "court wizard", "tavern keeper", "city guard",
         "travelling bard", "fisherwoman", "herbalist", "knight errant", "merchant prince", "shepherd"]
MOODS = ["grumpy", "cheerful", "nervous", "boastful", "wise", "suspicious", "dreamy", "stern"]
QUESTIONS = ["What brings you here today?", "Tell me about your work.", "Any news from the road?",
             "What do you fear most?", "Can you help me find the old mill?", "What is your favourite food?"]


SHARED_PERSONAS = ROOT.parent / "shared" / "data" / "personas" / "reference_personas_10.jsonl"


def persona(i: int, source: str = "short") -> str:
    """NPC i's persona. "short": a generated one-liner (~40 tokens); "long": a real persona
    description (~220 tokens, what users send), the shared reference personas when present (else
    the shipped ones), with a role added so that every NPC differs."""
    role, mood = ROLES[i % len(ROLES)], MOODS[(i * 5 + i // len(ROLES)) % len(MOODS)]
    if source == "long":
        from pruning.datasets import load_reference_personas

        texts = load_reference_personas(SHARED_PERSONAS if SHARED_PERSONAS.is_file() else None)
        return f"{texts[i % len(texts)]} Today this person works as a {mood} {role} (number {i})."
    return (f"A {mood} {role} (number {i}) who talks about daily chores, local gossip and the weather, "
            f"and answers every question in the voice of a {mood} {role}.")


def system_prompt(npc: dict) -> str:
    """What the server makes of the NPC's persona: the text the baseline sends as its system prompt."""
    from service.npcs.persona import system_prompt as build

    return build(npc["name"], npc["persona"])


# -- NPC checkpoints ---------------------------------------------------------------


def make_npcs(base: Path, out: Path, n: int, sparsities: tuple[float, ...], personas: str = "short",
              core: Path | None = None) -> list[dict]:
    """n NPCs at sparsities[0] with different personas, plus one at each other sparsity (with `core`:
    each NPC's channels chosen within that core, its compact form over it, as a server on it prunes)."""
    import torch
    from safetensors.torch import save_file

    from pruning.checkpoint import keep_count, kept_to_json, materialize, select_kept
    from pruning.datasets import calibration_prompts
    from pruning.manifest import MANIFEST, Manifest, checkpoint_sha256
    from pruning.methods import PruneContext, get_method
    from pruning.model_io import load_model

    from pruning.core import allowed_masks, inside, read_core, to_core_indexing

    model, tok = load_model(base, dtype=torch.float32)
    dense = model.config.intermediate_size
    info = read_core(core) if core else None
    allowed = allowed_masks(info, dense) if info else None
    home = core or base  # what the compact form indexes
    base_sha = checkpoint_sha256(home)
    calib = calibration_prompts(2)  # enough to make the NPCs differ; what is measured is serving
    score = get_method("activation-prompt")
    specs = [(i, sparsities[0]) for i in range(n)] + [(n + j, s) for j, s in enumerate(sparsities[1:])]
    npcs = []
    for i, sp in specs:
        d = out / f"npc{i:02d}"
        npc = {"i": i, "sparsity": sp, "dir": d, "persona": persona(i, personas), "name": f"Bench {i}"}
        if (d / MANIFEST).is_file() and Manifest.read(d).get("persona") == npc["persona"] \
                and Manifest.read(d).base_sha256 == base_sha:
            npcs.append(npc)  # kept from an earlier run (--workdir)
            continue
        with torch.no_grad():
            scores = score(model, tok, PruneContext(persona=npc["persona"], calibration=calib, seed=i))
        if allowed is not None:
            scores = inside(scores, allowed)
        kept = select_kept(scores, keep_count(dense, sp))
        if info is not None:
            kept = [torch.tensor(r) for r in to_core_indexing(kept, info)]
        d.mkdir(parents=True, exist_ok=True)
        save_file(materialize(home, kept), str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != MANIFEST:
                shutil.copy(f, d / f.name)
        cfg = json.loads((base / "config.json").read_text())
        cfg["intermediate_size"] = len(kept[0])
        (d / "config.json").write_text(json.dumps(cfg))
        Manifest({"format": "npc-pruned/1", "base_model": str(home), "base_sha256": base_sha,
                  "method": "activation-prompt", "sparsity": sp,
                  "dense_intermediate_size": len(info.kept[0]) if info else dense,
                  "intermediate_size": len(kept[0]), "kept_indices": kept_to_json(kept),
                  "persona": npc["persona"], "created": time.time()}).seal(d)
        npcs.append(npc)
    return npcs


async def register(redis_url: str, npcs: list[dict], base: Path) -> None:
    from redis.asyncio import Redis

    from service.npcs.records import NpcStore

    r = Redis.from_url(redis_url)
    store = NpcStore(r)
    for n in npcs:
        n["id"] = f"npc-bench{n['i']:02d}"
        await store.create({"id": n["id"], "name": n["name"], "persona": n["persona"],
                            "system_prompt": system_prompt(n),
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


async def client_load(url: str, targets: list[tuple[str, str | None]], pattern: str, n_requests: int,
                      concurrency: int, max_tokens: int, seed: int = 0, min_tokens: int = 0) -> dict:
    """`concurrency` streaming chat clients sending `n_requests` in all to `targets`: (model, system
    prompt or None; the server adds an NPC's own)."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(targets))]
    order = ([targets[k % len(targets)] for k in range(n_requests)] if pattern == "round-robin"
             else rng.choices(targets, weights, k=n_requests))
    ttft, itl, tokens, errors = [], [], [], []
    queue = list(enumerate(order))

    async def worker(client: httpx.AsyncClient):
        while queue:
            k, (model, system) = queue.pop(0)
            messages = [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": k,
                    **({"min_tokens": min_tokens} if min_tokens else {}),
                    "stream_options": {"include_usage": True}, "messages": messages}
            t = time.time()
            first = last = None
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append(r.status_code)
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    d = json.loads(line[5:])
                    if d.get("choices") and d["choices"][0]["delta"].get("content"):
                        now = time.time()
                        if first is None:
                            first = now - t
                        else:
                            itl.append(now - last)
                        last = now
                    if d.get("usage"):
                        tokens.append(d["usage"]["completion_tokens"])
            ttft.append(first if first is not None else time.time() - t)

    async with httpx.AsyncClient(timeout=600) as client:
        swaps0 = _swaps(await client.get(url + "/metrics"))
        t0 = time.time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.time() - t0
        swaps = _swaps(await client.get(url + "/metrics")) - swaps0
    return {"pattern": pattern, "npcs": len(targets), "requests": n_requests, "concurrency": concurrency,
            "tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(ttft), "ttft_p95": _p95(ttft),
            "itl_p50": statistics.median(itl) if itl else None, "itl_p95": _p95(itl) if itl else None,
            "swaps_s": swaps / wall, "swaps": swaps, "wall_s": wall, "errors": len(errors)}


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[18] if len(xs) > 1 else xs[0]


def _process_tree(pid: int):
    """(the process, its descendants), or None once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        return root, root.children(recursive=True)
    except psutil.NoSuchProcess:
        return None


def _each(procs, read) -> float:
    """Sum of `read(p)` over processes that still exist."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            total += read(p)
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of a server's own process (its API) and of its children
    (engines, workers): sampled around a load, where a server's CPU goes."""
    tree = _process_tree(pid)
    if tree is None:
        return 0.0, 0.0
    def cpu(p):
        return sum(p.cpu_times()[:2])  # user + system

    return _each([tree[0]], cpu), _each(tree[1], cpu)


def tree_rss_gib(pid: int) -> float:
    """Resident memory of a process and its children (the engines' workers)."""
    tree = _process_tree(pid)
    if tree is None:
        return 0.0
    return _each([tree[0], *tree[1]], lambda p: p.memory_info().rss) / 2 ** 30


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


LOADS = [(1, "round-robin"), (4, "round-robin"), (8, "round-robin"), (8, "zipf"), (32, "round-robin"), (32, "zipf")]


def loads(args) -> list[tuple[int, str]]:
    return [(n, p) for n, p in LOADS if n in args.npcs and p in args.patterns]


def run_loads(url: str, targets: list[tuple[str, str | None]], args, label: str, pid: int,
              full_warmup: bool = False) -> list[dict]:
    """`full_warmup`: one unmeasured run of the whole load first (torch.compile compiles each new
    batch shape on first sight: minutes of stalls that are start-up, not serving)."""
    runs = []
    for n_npcs, pattern in loads(args):
        if full_warmup:
            asyncio.run(client_load(url, targets[:n_npcs], pattern, args.requests, args.concurrency,
                                    args.max_tokens, min_tokens=args.min_tokens))
        if args.warmup:  # steady state: every NPC has been talked to once (loaded, persona prefix cached)
            asyncio.run(client_load(url, targets[:n_npcs], "round-robin", n_npcs, args.concurrency, 4))
        api0, rest0 = tree_cpu_s(pid)
        r = asyncio.run(client_load(url, targets[:n_npcs], pattern, args.requests, args.concurrency,
                                    args.max_tokens, min_tokens=args.min_tokens))
        api1, rest1 = tree_cpu_s(pid)
        r["slots"], r["rss_gib"] = label, tree_rss_gib(pid)
        r["cpu_api_s"], r["cpu_engines_s"] = round(api1 - api0, 2), round(rest1 - rest0, 2)
        print(json.dumps(r), flush=True)
        runs.append(r)
    return runs


def instant_ttft(srv: Server, n: int) -> list[float]:
    """POST a new NPC, then chat with it at once (served by its prompt while its prune runs): seconds
    from the POST to the first streamed token."""
    out = []
    for k in range(n):
        t = time.time()
        rec = srv.create_npc(f"Fresh {k}", persona(100 + k, "long"), sparsity=0.25)
        body = {"model": rec["id"], "stream": True, "max_tokens": 8,
                "messages": [{"role": "user", "content": "Good morning!"}]}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=300) as r:
            assert r.headers.get("x-npc-serving") == "prompt", (r.status_code, r.headers)
            for line in r.iter_lines():
                if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                    out.append(time.time() - t)
                    break
        httpx.delete(f"{srv.url}/v1/npcs/{rec['id']}")  # cancel its prune: not what is measured
    return out


def promote(srv: Server, ids: list[str], args, timeout: float = 300) -> list[str]:
    """Drive this load until the server has given a busy NPC its own engine, or for three rounds if
    no NPC is busy enough to be promoted (many NPCs share the clients); the NPCs hot at the end."""
    def hot(ready: bool) -> list[str]:
        return [e["npc"] for e in httpx.get(srv.url + "/v1/engines").json()["data"]
                if e["mode"] == "hot" and (e["state"] == "serving" or not ready)]

    deadline, rounds = time.time() + timeout, 0
    while time.time() < deadline and not hot(ready=True) and (rounds < 3 or hot(ready=False)):
        asyncio.run(client_load(srv.url, [(i, None) for i in ids], "round-robin", 4 * args.concurrency,
                                args.concurrency, args.max_tokens))
        rounds += 1
    return hot(ready=True)


def serve_runs(models: Path, redis_url: str, tmp: Path, npcs: list[dict], config: str, args) -> dict:
    """config: a slot count of swap engines, "-nobind" appended for vLLM's own CPU binding (every
    engine on core 0); "mixed-N": N mask engines, every NPC in the same batches (NPC_MIXED_BATCHES);
    "-c" appended to "mixed-N": its mask engines with torch.compile (NPC_MIXED_COMPILE);
    "-hot" appended: a busy NPC is promoted to an engine of its own (NPC_HOT_NPCS=1; "-hotc": that
    engine with torch.compile), and each load is measured once the promotion has happened."""
    mixed = config.startswith("mixed-")
    slots = int(config.removeprefix("mixed-").split("-")[0])
    hot = "-hot" in config
    env = {"NPC_REDIS_URL": redis_url, "NPC_ENGINE_SLOTS": str(slots), "NPC_MAX_ENGINES": str(slots),
           "NPC_MAX_WAITING": "256", "NPC_CPU_BIND": "false" if config.endswith("nobind") else "true",
           "NPC_MIXED_BATCHES": "1" if mixed else "0", "NPC_INSTANT_NPCS": "1" if mixed else "0",
           "NPC_CORE_SPARSITY": str(args.core), "NPC_HOT_NPCS": "1" if hot else "0",
           "NPC_HOT_COMPILE": "1" if config.endswith("-hotc") else "0", "NPC_HOT_AFTER_S": "5",
           "NPC_MIXED_COMPILE": "1" if "-c" in config.removesuffix("-hotc").removesuffix("-hot") else "0"}
    srv = Server(tmp / f"serve-{config}", models, extra_env=env).start()
    try:
        ids = [n["id"] for n in npcs if n["sparsity"] == args.sparsities[0]]
        wait_engines(srv, slots)
        if hot:
            res = {"slots": config, "runs": []}
            for n_npcs, pattern in loads(args):
                promoted = promote(srv, ids[:n_npcs], args)
                res["runs"] += run_loads(srv.url, [(i, None) for i in ids[:n_npcs]],
                                         argparse.Namespace(**{**vars(args), "npcs": {n_npcs}, "patterns": {pattern}}),
                                         config, srv.proc.pid)
                res["runs"][-1]["hot"] = promoted
            return res
        res = {"slots": config, "runs": []}
        if "b" in args.sections:  # cold first token: NPCs not in any slot (the first `slots` may hold prewarmed ones)
            res["cold_ttft"] = cold_ttft(srv, ids[slots + 1: slots + 1 + args.cold])
            if mixed:  # instant NPCs ride the mixed engine (an all-ones mask)
                res["instant_ttft"] = instant_ttft(srv, 4)
        # a compiled engine, like the baseline's, compiles each new batch shape on first sight
        res["runs"] = run_loads(srv.url, [(i, None) for i in ids], args, config, srv.proc.pid,
                                full_warmup="-c" in config)
        return res
    except Exception:
        # the server's log lives in the run's temporary folder: show why before it goes
        print(f"--- {config}: the server's log, last 6000 characters ---\n{srv.log.read_text()[-6000:]}",
              file=sys.stderr, flush=True)
        raise
    finally:
        srv.stop()


def baseline_runs(base: Path, npcs: list[dict], args) -> dict:
    """What a user would run instead of us: plain vLLM's OpenAI server on the dense base (its own
    defaults: torch.compile, its CPU binding; prefix caching on, the KV cache and dtype our engines
    get), every NPC's persona sent as the system prompt."""
    import subprocess

    from pruning.engine_args import engine_dtype
    from service.devserver import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1", "--dtype", engine_dtype(),
           "--max-model-len", "2048", "--enable-prefix-caching", "--kv-cache-memory-bytes", str(256 << 20)]
    log = tempfile.NamedTemporaryFile(prefix="vllm-baseline-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"vLLM baseline did not start: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        targets = [("base", system_prompt(n)) for n in npcs if n["sparsity"] == args.sparsities[0]]
        return {"slots": BASELINE, "runs": run_loads(url, targets, args, BASELINE, proc.pid, full_warmup=True)}
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--slots", default="2,mixed-1,mixed-2",
                    help='engine configs to compare: a swap-engine slot count ("2-nobind": without per-core '
                         'binding) or "mixed-N" (N mask engines, NPCs batched together)')
    ap.add_argument("--sections", default="a,b,c", help="which parts to run: a (decode), b (cold NPC), c (load)")
    ap.add_argument("--npcs", default="1,8,32", help="NPC counts of (c)")
    ap.add_argument("--patterns", default="round-robin,zipf", help="request patterns of (c)")
    ap.add_argument("--personas", choices=["short", "long"], default="long",
                    help="long: real persona descriptions (~220 tokens, as users send); short: one-liners")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="(c) without the dense-prompt baseline (plain vLLM, personas as system prompts)")
    ap.add_argument("--cold", type=int, default=8)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="(c) without a first unmeasured request to every NPC: first contacts included")
    ap.add_argument("--rounds", type=int, default=5, help="decode rounds per engine in (a)")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--min-tokens", type=int, default=0,
                    help="(c) every answer runs to at least this many tokens (vLLM's min_tokens; both servers): "
                         "equal work per request whatever a model's answer length")
    ap.add_argument("--core", type=float, default=0.0,
                    help="serve on the base's shared core at this sparsity (NPC_CORE_SPARSITY): NPCs are cut "
                         "within it and the mixed engines run it; --sparsities must be at or above it")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the pruned NPCs here for the next run")
    ap.add_argument("--no-doc", dest="doc", action="store_false", help="print only; leave docs/ as it is")
    args = ap.parse_args()
    args.sparsities = tuple(float(x) for x in args.sparsities.split(","))
    args.sections = set(args.sections.split(","))
    args.npcs = {int(x) for x in args.npcs.split(",")}
    args.patterns = set(args.patterns.split(","))
    t_start = time.time()
    from service import redis_embedded

    models = default_models_dir()
    base = models / DEFAULT_BASE
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        t = time.time()
        core = None
        if args.core:
            from service.basemodels import ensure_core

            core = ensure_core(base, models, args.core)
        npcs = make_npcs(base, (args.workdir or tmp) / "npcs", max(32, *args.npcs), args.sparsities, args.personas,
                         core)
        print(f"pruned {len(npcs)} NPCs in {time.time() - t:.0f}s", flush=True)

        decode = {}
        if "a" in args.sections:
            # the NPC's engine starts first: its start time is (b)'s fresh-engine number, and an engine
            # started beside running ones is slowed by them
            pruned = {f"pruned {n['sparsity']}": n["dir"] for n in npcs if n["i"] == 0 or n["i"] >= 32}
            decode = asyncio.run(engine_decode({**pruned, "dense": base}, 8, 64, args.rounds))
            print(json.dumps(decode), flush=True)

        serve = []
        if args.sections & {"b", "c"}:
            if args.baseline and "c" in args.sections:
                serve.append(baseline_runs(base, npcs, args))
            proc, redis_url = redis_embedded.start(tmp / "redis")
            try:
                # only the main shape: another shape's prewarmed engine would take one of the slots
                asyncio.run(register(redis_url, [n for n in npcs if n["sparsity"] == args.sparsities[0]],
                                     core or base))
                serve += [serve_runs(models, redis_url, tmp, npcs, s, args) for s in args.slots.split(",")]
            finally:
                redis_embedded.stop(proc)
    cold = {}
    with_cold = [r for r in serve if r.get("cold_ttft")]
    if with_cold:
        best = min(with_cold, key=lambda r: statistics.median(r["cold_ttft"]))
        cold = {"swap": best["cold_ttft"], "swap_p50": statistics.median(best["cold_ttft"]), "slots": best["slots"],
                "fresh_s": decode.get(f"pruned {args.sparsities[0]}", {}).get("engine_first_token_s")}
    raw = {"decode": decode, "cold": cold, "serve": serve}
    if args.doc:
        raw["plots"] = plots(ROOT / "docs", decode, cold, serve)
        write_doc(report(decode, cold, serve, args, time.time() - t_start))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    print(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
