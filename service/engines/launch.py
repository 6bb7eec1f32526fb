"""Starting one serving engine: vLLM arguments and CPU binding."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from pruning.engine_args import binding_env, engine_kwargs, spawn_env
from pruning.procs import guarded_children

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


@contextmanager
def mask_compile(on: bool):
    """Inside: vLLM's CPU platform keeps torch.compile for an engine with LoRA on. It turns
    compile off whenever LoRA is on, for its punica kernels; a mask engine's only LoRA layer is
    `MaskedDownProj` (vllm_ext/masks.py), plain tensor ops over buffers updated in place, so the
    platform's check runs as if LoRA were off and the config keeps its LoRA part."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if not on or "check_and_update_config" not in vars(cls) or not current_platform.is_cpu():
        yield
        return
    orig = vars(cls)["check_and_update_config"]

    def check(_cls, vllm_config) -> None:
        lora = vllm_config.lora_config
        object.__setattr__(vllm_config, "lora_config", None)
        try:
            orig.__func__(_cls, vllm_config)
        finally:
            object.__setattr__(vllm_config, "lora_config", lora)

    cls.check_and_update_config = classmethod(check)
    try:
        yield
    finally:
        cls.check_and_update_config = orig


def compiled(engine) -> bool:
    """Whether a started engine runs vLLM's torch.compile (its config after the platform's checks)."""
    cfg = getattr(getattr(engine, "vllm_config", None), "compilation_config", None)
    return cfg is not None and getattr(cfg.mode, "name", "NONE") != "NONE"


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
    with spawn_env(env), mask_compile(mask and compiled), guarded_children():
        engine = AsyncLLM.from_engine_args(engine_args(settings, ckpt, mask, compiled))
    log.info("engine for %s started in %.1fs (core %s)", ckpt, time.time() - t0, core or "vLLM default")
    return engine
