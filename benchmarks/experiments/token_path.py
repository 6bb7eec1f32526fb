"""Where a served token's time goes: the same chat workload on engines in this process, without
our HTTP server, one engine configuration at a time.

    .venv/bin/python -m benchmarks.experiments.token_path [--configs plain,plain-bound,mask,mask-lora]

Configurations (each a fresh AsyncLLM on the default base, 8 concurrent requests, 4 personas as
system prompts, max_tokens 48, after one warm-up round):
  plain        vLLM's own CPU binding (compute on one core, the other reserved for the front end)
  plain-bound  compute bound to every core (what NPC_CPU_BIND does for one engine)
  mask         a mask engine (enable_lora + the down_proj mask layer), requests without adapters
  mask-lora    a mask engine, every request carrying its NPC's mask adapter
  X+compiled   X with vLLM's torch.compile (what plain `vllm serve` does) instead of eager mode (mask
               engines too: `service.engines.launch.mask_compile`)
  X+fp32       X in float32 instead of bfloat16 (CPUs without AVX-512 bf16 fall back to slow bf16 GEMMs)
Prints one PROBE JSON line per configuration: tokens/s, ITL p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.serving import QUESTIONS, persona
from service.devserver import DEFAULT_BASE, default_models_dir


async def load(engine, prompts: list[list[int]], loras: list, max_tokens: int, rounds: int) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0.7, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    res = []
    for r in range(rounds):
        itl = []

        async def one(k: int, r=r, itl=itl):
            last, n = None, 0
            async for out in engine.generate({"prompt_token_ids": prompts[k % len(prompts)]}, params,
                                             f"r{r}-{k}", lora_request=loras[k % len(loras)]):
                now = time.time()
                if last is not None:
                    itl.append(now - last)
                last = now
                n += len(out.outputs[0].token_ids)
            return n

        t = time.time()
        n = sum(await asyncio.gather(*(one(k) for k in range(8))))
        res.append({"tok_s": n / (time.time() - t), "itl_p50": statistics.median(itl)})
        print(json.dumps({"round": r, **res[-1]}), flush=True)
    return {"tok_s": statistics.median(x["tok_s"] for x in res[1:]),
            "itl_p50": statistics.median(x["itl_p50"] for x in res[1:])}


async def run(config: str, base: Path, rounds: int) -> dict:
    from transformers import AutoTokenizer
    from vllm import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from pruning.chat import chat_ids
    from pruning.engine_args import binding_env, engine_kwargs
    from service.engines.launch import MASK_ENGINE_ENV, SWAP_WORKER, mask_compile
    from service.npcs.persona import system_prompt

    tok = AutoTokenizer.from_pretrained(str(base))
    prompts = [chat_ids(tok, [{"role": "system", "content": system_prompt(f"Bench {i}", persona(i, "long"))},
                              {"role": "user", "content": QUESTIONS[i]}]) for i in range(4)]
    name = config
    config, *flags = config.split("+")
    mask = config.startswith("mask")
    env = {MASK_ENGINE_ENV: "1" if mask else "0"}
    if config != "plain":
        env.update(binding_env(sorted(os.sched_getaffinity(0))))
    os.environ.update(env)
    extra = {}
    if mask:
        extra = dict(enable_lora=True, max_lora_rank=8, lora_target_modules=["down_proj"], max_loras=32,
                     max_cpu_loras=32, worker_extension_cls=SWAP_WORKER)
    with mask_compile(mask and "compiled" in flags):
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(
            str(base), kv_cache_bytes=256 << 20, **extra, **({"enforce_eager": False} if "compiled" in flags else {}),
            **({"dtype": "float32"} if "fp32" in flags else {}))))
    loras = [None]
    if config == "mask-lora":
        from service.engines.vllm_ext.masks import write_mask_adapter

        cfg = json.loads((base / "config.json").read_text())
        tmp = Path(tempfile.mkdtemp())
        keep = int(cfg["intermediate_size"] * 0.75)
        loras = []
        for i in range(4):
            kept = [list(range(i * 16, i * 16 + keep)) for _ in range(cfg["num_hidden_layers"])]
            d = write_mask_adapter(tmp / f"m{i}", kept, cfg["intermediate_size"], cfg["hidden_size"], str(base))
            loras.append(LoRARequest(f"m{i}", i + 1, str(d)))
    try:
        out = await load(engine, prompts, loras, 48, rounds)
    finally:
        engine.shutdown()
    return {"config": name, "base": base.name, "prompt_tokens": [len(p) for p in prompts], **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="plain,plain-bound,mask,mask-lora")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--base", type=Path, default=None, help="another model dir, e.g. a core (npc models core)")
    args = ap.parse_args()
    base = args.base or default_models_dir() / DEFAULT_BASE
    for config in args.configs.split(","):
        print("PROBE", json.dumps(asyncio.run(run(config, base, args.rounds))), flush=True)


if __name__ == "__main__":
    main()
