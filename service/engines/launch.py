"""Starting one serving engine: vLLM arguments and CPU binding."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from pruning.engine_args import binding_env, engine_kwargs, spawn_env

log = logging.getLogger(__name__)
MASK_ENGINE_ENV = "NPC_MASK_ENGINE"  # read in the engine's worker (vllm_ext/masks.py)
SWAP_WORKER = "service.engines.vllm_ext.swap.NpcSwapWorker"


def engine_args(settings, ckpt: Path, mask: bool = False, compiled: bool = False):
    from vllm import AsyncEngineArgs
    from vllm.config import StructuredOutputsConfig

    extra = {"enforce_eager": not compiled}
    if mask:
        # rank-1 "adapters" on down_proj only: the NPC channel masks (vllm_ext/masks.py)
        extra.update(enable_lora=True, max_lora_rank=8, lora_target_modules=["down_proj"],
                     max_loras=settings.mixed_batch_npcs,
                     max_cpu_loras=max(settings.mixed_batch_npcs, settings.mixed_loaded_npcs))
    return AsyncEngineArgs(**engine_kwargs(
        str(ckpt), max_model_len=settings.max_model_len, kv_cache_bytes=settings.kv_cache_bytes,
        memory_fraction=settings.engine_memory_fraction, dtype=settings.engine_dtype, worker_extension_cls=SWAP_WORKER,
        # JSON answers without free whitespace: given the freedom, a small model fills its budget with
        # newlines between keys (and the per-request switch is not read by vLLM's grammar backends)
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True), **extra))


def pick_core(settings, used: list[str | None]) -> str | None:
    """The least used core: vLLM would pin every engine's worker to core 0."""
    if not settings.cpu_bind:
        return None
    cores = sorted(os.sched_getaffinity(0))
    return str(min(cores, key=lambda c: used.count(str(c))))


def start_engine(settings, ckpt: Path, mask: bool, core: str | None, compiled: bool = False):
    """An AsyncLLM for one checkpoint dir; blocking (~20 s on CPU). `core`: one core or a list
    ("0,1") its worker computes on."""
    from vllm.v1.engine.async_llm import AsyncLLM

    t0 = time.time()
    env = {**binding_env(core), MASK_ENGINE_ENV: "1" if mask else "0"}
    with spawn_env(env):
        engine = AsyncLLM.from_engine_args(engine_args(settings, ckpt, mask, compiled))
    log.info("engine for %s started in %.1fs (core %s)", ckpt, time.time() - t0, core or "vLLM default")
    return engine
